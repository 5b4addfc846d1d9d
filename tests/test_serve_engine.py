"""The serving engine without HTTP: continuous batching over a paged KV cache gives exactly what
`dozero generate` gives, one request at a time or many at once, and every KV block goes back."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.generate import GenerationConfig, generate
from dozero.generate.engine import generate_ids
from dozero.model.gpt import GPTModel
from dozero.serve.block_manager import BlockPool
from dozero.serve.config import ServeConfig
from dozero.serve.engine import Engine, QueueFull
from dozero.tokenizer import load_tokenizer

PROMPTS = ["Hello world", "The meaning of life is", "a", "Once upon a time there was a little girl who lived in"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


def small_model(**llama) -> GPTModel:
    """Random weights, scaled up so greedy choices have no near-ties (GPT-2's vocabulary)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=96, emb_dim=64, n_heads=4, n_layers=2, **llama)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model


LLAMA = {"norm": "rmsnorm", "pos_emb": "rope", "ff": "swiglu", "n_kv_heads": 2, "bias": False}


def run_engine(model, tokenizer, **serve):
    engine = Engine(model, tokenizer, ServeConfig(kv_cache_mb=2, block_size=8, **serve))
    return engine


def all_at_once(engine, prompts, configs) -> list[tuple[str, str]]:
    out = [None] * len(prompts)

    def one(i):
        out[i] = engine.generate_text(prompts[i], configs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama-gqa"])
def test_concurrent_greedy_and_seeded_equal_dozero_generate(tokenizer, arch):
    model = small_model(**arch)
    greedy = GenerationConfig(temperature=0, max_new_tokens=24, stop_at_eot=False)
    sampling = {"temperature": 1.0, "top_k": None, "max_new_tokens": 24, "stop_at_eot": False}
    seeded = [GenerationConfig(seed=s, **sampling) for s in (1, 2)]
    configs = [greedy] * len(PROMPTS) + seeded
    prompts = PROMPTS + PROMPTS[1:3]
    expected = [generate(model, tokenizer, p, config=c) for p, c in zip(prompts, configs, strict=True)]
    # A chunk of 3 tokens: long prompts are read over several steps while the others decode.
    engine = run_engine(model, tokenizer, prefill_chunk=3)
    try:
        got = all_at_once(engine, prompts, configs)
        assert [text for text, _ in got] == expected
        assert {reason for _, reason in got} == {"length"}
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()


def test_stop_string_and_end_of_text_finish_with_stop(tokenizer, monkeypatch):
    model = small_model()
    full = generate(model, tokenizer, "Hello", temperature=0, max_new_tokens=24, stop_at_eot=False)
    stop = full[5:9]
    engine = run_engine(model, tokenizer)
    try:
        text, reason = engine.generate_text("Hello", GenerationConfig(temperature=0, max_new_tokens=24, stop=(stop,)))
        assert (text, reason) == (full[: full.index(stop)], "stop")
        # End-of-text: say the third greedy token is it; the text ends before it.
        (ids,) = generate_ids(model, [tokenizer.encode("Hello")], GenerationConfig(temperature=0, max_new_tokens=3))
        monkeypatch.setattr(tokenizer, "eot_id", ids[2])
        text, reason = engine.generate_text("Hello", GenerationConfig(temperature=0, max_new_tokens=24))
        assert (text, reason) == (tokenizer.decode(ids[:2]), "stop")
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()


def test_cancelled_request_frees_its_blocks_and_the_queue_has_a_limit(tokenizer):
    model = small_model()
    engine = run_engine(model, tokenizer, max_batch=1, max_queue=2)
    long = GenerationConfig(temperature=0, max_new_tokens=80, stop_at_eot=False)
    try:
        events = queue.Queue()
        first = engine.submit(tokenizer.encode("Hi"), long, events.put)
        events.get(timeout=30)  # it is running
        waiting = [engine.submit(tokenizer.encode("Hi"), long, lambda e: None) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(tokenizer.encode("Hi"), long, lambda e: None)
        for seq in (first, *waiting):
            seq.cancel()
        while (event := events.get(timeout=30)).finish_reason is None:
            pass
        assert event.finish_reason == "cancelled"
        for _ in range(200):  # the waiting ones are dropped at the next step
            if engine.pool.num_free == engine.pool.num_blocks and not engine.scheduler.has_work():
                break
            threading.Event().wait(0.05)
        assert engine.pool.num_free == engine.pool.num_blocks
        assert engine.metrics.finished == {"cancelled": 3}
    finally:
        engine.close()


def test_requests_that_cannot_fit_are_refused(tokenizer, monkeypatch):
    model = small_model()
    with pytest.raises(DozeroError, match="--kv-cache-mb"):
        Engine(model, tokenizer, ServeConfig(kv_cache_mb=0.01))
    # Without --kv-cache-mb the pool is 256 MiB, or one full context when that needs more (here: the
    # default made tiny, as if the model's context needed more than 256 MiB).
    monkeypatch.setattr("dozero.serve.engine.DEFAULT_KV_CACHE_MB", 0.01)
    engine = Engine(model, tokenizer, ServeConfig(block_size=8))
    assert engine.pool.num_blocks == 96 // 8
    engine.close()
    engine = run_engine(model, tokenizer)
    try:
        with pytest.raises(DozeroError, match="context of 96"):
            engine.submit([1] * 90, GenerationConfig(max_new_tokens=10), lambda e: None)
        with pytest.raises(DozeroError, match="penalties"):
            engine.submit([1], GenerationConfig(repetition_penalty=1.2, max_new_tokens=1), lambda e: None)
    finally:
        engine.close()


def test_block_pool_hands_out_and_takes_back():
    pool = BlockPool(num_blocks=4, block_size=16)
    table = pool.allocate(33)  # 3 blocks
    assert table == [0, 1, 2] and pool.num_free == 1
    assert not pool.can_allocate(17) and pool.can_allocate(16)
    pool.check([table])
    pool.release(table)
    pool.release(table)  # a second release gives nothing back twice
    assert pool.num_free == 4 and table == []
    pool.check([])


def test_block_accounting_check_catches_leaks_and_double_use(tokenizer):
    pool = BlockPool(num_blocks=4, block_size=16)
    a, b = pool.allocate(20), pool.allocate(10)  # blocks [0, 1] and [2]
    pool.check([a, b])
    with pytest.raises(AssertionError, match="KV block 2: 1 users counted, held by 0"):
        pool.check([a])  # a sequence forgot to give its block back
    with pytest.raises(AssertionError, match="KV block 0: 1 users counted, held by 2"):
        pool.check([a, b, [0]])  # one block in two tables with one user counted
    pool.free.append(0)
    with pytest.raises(AssertionError, match="1 times on the free list"):
        pool.check([a, b])  # held and free at once
    # The engine checks the books each time it falls idle, and counts a mismatch in /metrics.
    engine = run_engine(small_model(), tokenizer)
    try:
        engine.generate_text("Hello", GenerationConfig(temperature=0, max_new_tokens=3))
        engine.pool.users[5] = 1  # a block counted as held that no sequence holds
        engine.generate_text("Hello", GenerationConfig(temperature=0, max_new_tokens=3))
        for _ in range(200):
            if engine.metrics.counters["kv_accounting_errors_total"]:
                break
            threading.Event().wait(0.02)
        # 1 or 2: the idle check after the first request may run before or after the bad count.
        assert engine.metrics.counters["kv_accounting_errors_total"] in (1, 2)
    finally:
        engine.close()


def test_a_small_pool_preempts_and_the_text_is_unchanged(tokenizer):
    """Room for one context (96 tokens) only: 6 requests of up to 60 tokens must take turns and
    preempt one another, yet each gets exactly its `dozero generate` text."""
    model = small_model()
    configs = [GenerationConfig(temperature=0, max_new_tokens=40, stop_at_eot=False)] * 4 + [
        GenerationConfig(temperature=1.0, top_k=None, seed=s, max_new_tokens=40, stop_at_eot=False) for s in (3, 4)
    ]
    prompts = PROMPTS + PROMPTS[:2]
    expected = [generate(model, tokenizer, p, config=c) for p, c in zip(prompts, configs, strict=True)]
    per_token = 2 * model.cfg.n_layers * model.cfg.emb_dim * 4
    engine = Engine(model, tokenizer, ServeConfig(kv_cache_mb=96 * per_token / 2**20, block_size=8, prefill_chunk=5))
    try:
        assert engine.pool.num_blocks == 12
        got = all_at_once(engine, prompts, configs)
        assert [text for text, _ in got] == expected
        assert engine.scheduler.preemptions > 0
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()


@pytest.mark.parametrize("caching", [True, False])
def test_shared_prompt_beginnings_reuse_blocks_and_give_the_same_text(tokenizer, caching):
    model = small_model()
    system = "You are a helpful assistant who answers questions about the sea, ships and old maps. "
    prompts = [system + "Where is", system + "Why do", system + "Where is", "Unrelated start"]
    config = GenerationConfig(temperature=0, max_new_tokens=12, stop_at_eot=False)
    expected = [generate(model, tokenizer, p, config=config) for p in prompts]
    engine = run_engine(model, tokenizer, prefix_caching=caching)
    try:
        first = engine.generate_text(prompts[0], config)  # its blocks are now named in the pool
        got = all_at_once(engine, prompts, [config] * len(prompts))
        assert [first[0], *(text for text, _ in got)] == [expected[0], *expected]
        cached = engine.metrics.counters["prompt_tokens_cached_total"]
        assert cached >= 3 * 16 if caching else cached == 0  # 18 system tokens: two full blocks of 8 each
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()


def test_padded_model_rows_are_never_drawn(tokenizer):
    # Padded to 50,304 rows (a multiple of 64, as GPT-2 is trained fast), the 47 extra rows scaled up
    # so that, unlimited, they would win every greedy step and most draws: only the tokenizer's ids come out.
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50304, context_length=96, emb_dim=64, n_heads=4, n_layers=2)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight[tokenizer.vocab_size :] *= 1000.0
    (unlimited,) = generate_ids(model, [tokenizer.encode("Hello")], GenerationConfig(temperature=0, max_new_tokens=4))
    assert all(t >= tokenizer.vocab_size for t in unlimited)  # the premise: padding rows win without the limit
    configs = [GenerationConfig(temperature=0, max_new_tokens=12, stop_at_eot=False)]
    configs += [
        GenerationConfig(temperature=1.0, top_k=None, seed=s, max_new_tokens=12, stop_at_eot=False) for s in (1, 2)
    ]
    prompts = ["Hello", "Hello", "The"]
    expected = [generate(model, tokenizer, p, config=c) for p, c in zip(prompts, configs, strict=True)]
    engine = run_engine(model, tokenizer)
    try:
        assert all_at_once(engine, prompts, configs) == [(text, "length") for text in expected]
    finally:
        engine.close()


def test_requests_arriving_together_are_prefilled_in_one_call(tokenizer):
    """Four prompts of different lengths queued in the same instant: one padded prefill call reads
    them all (not one per step), a decode call then serves the four rows, and the text is unchanged."""
    model = small_model(**LLAMA)
    config = GenerationConfig(temperature=0, max_new_tokens=6, stop_at_eot=False)
    expected = [generate(model, tokenizer, p, config=config) for p in PROMPTS]
    engine = run_engine(model, tokenizer, prefill_chunk=64)
    calls, run = [], engine.runner.run
    engine.runner.run = lambda seqs, num_new: calls.append(list(num_new)) or run(seqs, num_new)
    try:
        queues = [queue.Queue() for _ in PROMPTS]
        with engine._wake:  # the engine thread waits for this lock: all four join in the same step
            for p, q in zip(PROMPTS, queues, strict=True):
                engine.submit(tokenizer.encode(p), config, q.put)
        texts = []
        for q in queues:
            events = [q.get(timeout=60)]
            while events[-1].finish_reason is None:
                events.append(q.get(timeout=60))
            texts.append("".join(e.text for e in events))
        assert texts == expected
        assert calls[0] == [len(tokenizer.encode(p)) for p in PROMPTS]
        assert calls[1] == [1, 1, 1, 1]
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()
