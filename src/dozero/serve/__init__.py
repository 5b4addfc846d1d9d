"""Serving: `dozero serve`, an OpenAI-compatible HTTP API over a continuous-batching engine.

The engine follows nano-vllm's shape, one small file per job; the HTTP layer sits on top and knows
nothing of blocks:

    sequence.py       one request's state: its tokens, settings, block table, where its text goes
    block_manager.py  the paged KV pool: fixed-size blocks handed out and taken back
    runner.py         a step as tensors: paged attention over each sequence's blocks, the model call
    scheduler.py      who runs this step: a decode token for every running sequence, one prefill chunk,
                      admission, and preemption when the pool runs dry
    engine.py         the loop, in a background thread: admit, schedule, run, sample, stream out
    app.py            FastAPI: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics, /
    protocol.py       OpenAI's request bodies (pydantic) and error schema
    chat.py           messages -> prompt text (the tokenizer's template, or ChatML)
    metrics.py        counters and histograms in Prometheus' text format

Python use, without HTTP:

    >>> from dozero.serve.engine import Engine
    >>> from dozero.serve.config import ServeConfig
    >>> engine = Engine(model, tokenizer, ServeConfig(kv_cache_mb=64))
    >>> engine.generate_text("Once upon a time", GenerationConfig(temperature=0, max_new_tokens=20))
"""
