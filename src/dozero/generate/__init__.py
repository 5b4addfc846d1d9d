"""Text generation: bring a trained model to life.

    >>> from dozero.generate import generate, stream
    >>> generate(model, tokenizer, "Once upon a time", max_new_tokens=50, temperature=0.8, seed=1)
    ' there was a ...'
    >>> generate(model, tokenizer, ["To be", "or not"], temperature=0)   # a batch, greedy
    >>> for piece in stream(model, tokenizer, "ROMEO:", max_new_tokens=100):
    ...     print(piece, end="", flush=True)

A model loaded only to generate on a CPU decodes faster laid out once, as `dozero generate` does
(1.3x at GPT-2 124M; for a model that is done training):

    >>> from dozero.generate.layout import use_decoding_layout
    >>> use_decoding_layout(model)

Settings are the fields of `GenerationConfig` (temperature, top_k, top_p, min_p,
repetition_penalty, frequency_penalty, max_new_tokens, seed, stop, stop_at_eot, compile), given as keyword
arguments or as `config=GenerationConfig(...)`. The returned text is the continuation only, without
the prompt. Modules: `config` (the settings), `sampling` (choosing a token), `engine` (KV-cache
loop, batching, sliding window), `layout` (weights laid out for CPU decoding), `stream` (incremental
text), `commands` (`dozero generate`). Importing this package does not import torch (the engine is
loaded at the first call), so `dozero --help` starts fast.
"""

from __future__ import annotations

from collections.abc import Iterator

from dozero.generate.config import GenerationConfig, SamplingConfig

__all__ = ["GenerationConfig", "SamplingConfig", "generate", "stream"]


def _config(config: GenerationConfig | None, settings: dict) -> GenerationConfig:
    if config is None:
        return GenerationConfig(**settings)
    import dataclasses

    return dataclasses.replace(config, **settings)


def generate(model, tokenizer, prompt: str | list[str], config: GenerationConfig | None = None, **settings):
    """The continuation of `prompt` (a str), or of each prompt in a list (a list of str, one batch)."""
    from dozero.generate.stream import stream_batch

    config = _config(config, settings)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list | tuple) else [prompt]
    texts = [""] * len(prompts)
    for b, piece in stream_batch(model, tokenizer, prompts, config):
        texts[b] += piece
    return texts[0] if isinstance(prompt, str) else texts


def stream(model, tokenizer, prompt: str, config: GenerationConfig | None = None, **settings) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece, as the tokens are produced."""
    from dozero.generate.stream import stream_batch

    config = _config(config, settings)
    for _, piece in stream_batch(model, tokenizer, [prompt], config):
        yield piece
