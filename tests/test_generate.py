"""The generation engine (dozero.generate.engine): KV cache = full forward, Hugging Face parity, batching,
sliding window, stopping, and the prompt edge cases."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.generate import generate, stream
from dozero.generate.engine import BatchState, GenerationConfig, generate_ids, generation_mode
from dozero.generate.layout import DecodingBlock, DecodingLinear, use_decoding_layout
from dozero.model.gpt import GPTModel
from dozero.tokenizer import CharTokenizer

GREEDY = {"temperature": 0.0}
# Several tests run past the 32-token context on purpose; the sliding test checks the warning itself.
pytestmark = pytest.mark.filterwarnings("ignore:generation reached the context length")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only adds waiting, badly so on a busy machine (measured:
    5 s vs 40-70 s for this file on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(context_length=32, vocab_size=97, seed=0, qkv_bias=True, weight_scale=5.0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size, context_length=context_length, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=qkv_bias
    )
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: peaked distributions, no near-ties in greedy tests
        for p in model.parameters():
            p.mul_(weight_scale)
    return model


class CountCalls(TorchDispatchMode):
    """Records every aten operation run inside it, as (op, args): `with CountCalls() as calls: ...`."""

    def __enter__(self):
        self.calls = []
        super().__enter__()
        return self.calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def char_tokenizer():
    return CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-0123456789")


@pytest.fixture(scope="module")
def char_model(char_tokenizer):
    return tiny_model(context_length=32, vocab_size=char_tokenizer.vocab_size)


def full_forward_greedy(model, ids: list[int], steps: int, keep: int | None = None) -> list[int]:
    """Reference: no cache, the whole window through the model at every step (the course's loop).
    When the window would pass the context, it restarts from the last `keep` tokens, as the engine does."""
    ctx = model.cfg.context_length
    tokens, start = list(ids), 0
    with torch.no_grad():
        for _ in range(steps):
            if len(tokens) - start > ctx:
                start = len(tokens) - keep
            logits = model(torch.tensor([tokens[start:]]))[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(ids) :]


def test_kv_cache_logits_equal_full_forward_at_every_step():
    model = tiny_model(weight_scale=1.0)  # GPT-2's init: logits of order 1, so 1e-5 is a tight bound
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (7, 3, 11)]  # left-padded batch
    new = torch.randint(0, 97, (3, 15), generator=g)  # tokens fed one at a time
    reference = copy.deepcopy(model)  # no KV cache
    with torch.inference_mode():
        state = BatchState(model, prompts, cache_len=11 + 15)
        logits = state.prefill()  # (B, V)
        for step in range(new.shape[1] + 1):
            for b, prompt in enumerate(prompts):
                full = reference(torch.tensor([prompt + new[b, :step].tolist()]))[0, -1]  # no cache, no padding
                torch.testing.assert_close(logits[b], full, atol=1e-5, rtol=0)
            if step < new.shape[1]:
                logits = state.decode_one_token(new[:, step])
    model.clear_kv_cache()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random Hugging Face GPT-2 and the same weights loaded into dozero through the HF interop."""
    transformers = pytest.importorskip("transformers")
    from dozero.model.checkpoint import load_model

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return hf, load_model(folder)


def test_greedy_equals_hugging_face_generate(hf_pair):
    hf, model = hf_pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 12, 1)]
    config = GenerationConfig(max_new_tokens=30, stop_at_eot=False, **GREEDY)
    ours_batched = generate_ids(model, prompts, config)
    for prompt, ours in zip(prompts, ours_batched, strict=True):
        with torch.no_grad():
            theirs = hf.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=30, min_new_tokens=30, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert ours == theirs
        assert generate_ids(model, [prompt], config)[0] == theirs  # batched = one by one


def test_decoding_layout_keeps_values_tying_and_hugging_face_parity(hf_pair, monkeypatch):
    """`use_decoding_layout` (the CLI's one-time re-layout) changes how weights sit in memory and how
    few-row products are split over the threads, nothing else: the same greedy tokens as Hugging Face."""
    hf, model = hf_pair
    # Lay out and split every product over 2 threads, however small (this model's matrices are below
    # the threshold).
    monkeypatch.setattr(DecodingLinear, "SPLIT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    laid_out = copy.deepcopy(model)
    use_decoding_layout(laid_out)
    for (name, p), q in zip(laid_out.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert laid_out.state_dict().keys() == model.state_dict().keys()
    assert laid_out.out_head.weight is laid_out.tok_emb.weight and not laid_out.tok_emb.weight.is_contiguous()
    assert isinstance(laid_out.trf_blocks[0].ff.fc, DecodingLinear)
    assert not laid_out.trf_blocks[0].ff.fc.weight.is_contiguous()
    prompt = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    config = GenerationConfig(max_new_tokens=30, stop_at_eot=False, **GREEDY)
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=30, min_new_tokens=30, pad_token_id=0
        )[0, len(prompt) :].tolist()
    with CountCalls() as calls:
        assert generate_ids(laid_out, [prompt], config)[0] == theirs
    # 2 layers x 4 matrices + the head, split in 2, for the prompt and each of the 29 decoded tokens (this
    # model's attention products have 4 heads, so a batch of 4).
    products = ("aten.bmm", "aten.baddbmm")
    assert sum(str(f).startswith(products) and a[1].shape[0] == 2 for f, a in calls) == 9 * 30


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 40, 200])
def test_decoding_linear_equals_linear(rows, bias):
    """The split product sums in another order: equal to nn.Linear to fp32 rounding, at every row count
    (200 rows take one plain product), for a matrix big enough to be split."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(768, 384, bias=bias)
    assert 768 * 384 >= DecodingLinear.SPLIT_MIN_WEIGHTS
    holder = torch.nn.Sequential(copy.deepcopy(linear))
    use_decoding_layout(holder)
    x = torch.randn(2, rows, 768) if rows > 1 else torch.randn(1, 1, 768)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            with torch.no_grad():
                torch.testing.assert_close(holder[0](x), linear(x), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_one_token_product_is_four_calls_and_its_kept_view_stays_right(monkeypatch):
    """DecodingLinear keeps its weight's split view between calls: a one-token product is 4 tensor
    operations (7 when the view was built each time; SmolLM2 makes 121 products per token). The kept view
    must follow in-place changes and new storage, and never stand in for the weight when gradients flow
    (a view kept from inference mode carries none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    torch.manual_seed(0)
    linear = torch.nn.Linear(768, 384, bias=False)
    holder = torch.nn.Sequential(copy.deepcopy(linear))
    use_decoding_layout(holder)
    x = torch.randn(1, 1, 768)
    with torch.inference_mode():
        holder(x)  # keeps the view
        calls = []
        with Count():
            holder(x)
    assert len(calls) == 4 and "aten.bmm.default" in calls, calls
    y = holder(x)  # gradients on: the weight itself, so the gradient reaches it
    y.square().sum().backward()
    linear(x).square().sum().backward()
    torch.testing.assert_close(holder[0].weight.grad, linear.weight.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        holder[0].weight.mul_(2)  # in place: the kept view sees it
        torch.testing.assert_close(holder(x), 2 * linear(x), atol=1e-5, rtol=1e-5)
        holder[0].weight.data = linear.weight.data.t().contiguous().t() * 3  # new storage: a new view
        torch.testing.assert_close(holder(x), 3 * linear(x), atol=1e-5, rtol=1e-5)


def test_batched_equals_one_by_one_text(char_model, char_tokenizer):
    prompts = ["The quick brown fox", "a", "Hello, world! How are you"]
    settings = {**GREEDY, "max_new_tokens": 20}
    batched = generate(char_model, char_tokenizer, prompts, **settings)
    assert batched == [generate(char_model, char_tokenizer, p, **settings) for p in prompts]
    assert len(set(batched)) == 3 and all(len(t) == 20 for t in batched)


def test_same_seed_same_text(char_model, char_tokenizer):
    settings = {"temperature": 1.0, "top_k": None, "max_new_tokens": 40}
    a = generate(char_model, char_tokenizer, "Once", seed=123, **settings)
    assert a == generate(char_model, char_tokenizer, "Once", seed=123, **settings)
    assert a != generate(char_model, char_tokenizer, "Once", seed=124, **settings)
    # Samples in one batch draw different tokens from one generator.
    samples = generate(char_model, char_tokenizer, ["Once"] * 3, seed=123, **settings)
    assert len(set(samples)) == 3


def test_sliding_window_past_the_context(char_model):
    ctx = char_model.cfg.context_length  # 32; the window keeps the last 24 tokens when it slides
    prompt = list(range(10, 30))
    config = GenerationConfig(max_new_tokens=3 * ctx, stop_at_eot=False, **GREEDY)
    with pytest.warns(UserWarning, match="sliding the window"):
        ours = generate_ids(char_model, [prompt, prompt[:5]], config)
    assert ours[0] == full_forward_greedy(char_model, prompt, 3 * ctx, keep=ctx - ctx // 4)
    assert ours[1] == full_forward_greedy(char_model, prompt[:5], 3 * ctx, keep=ctx - ctx // 4)


def test_prompt_longer_than_context_keeps_its_last_tokens(char_model, char_tokenizer):
    long_prompt = "abcdefghij" * 5  # 50 characters, context 32
    with pytest.warns(UserWarning, match="keeping its last 32 tokens"):
        text = generate(char_model, char_tokenizer, long_prompt, max_new_tokens=5, **GREEDY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert text == generate(char_model, char_tokenizer, long_prompt[-32:], max_new_tokens=5, **GREEDY)
    assert not [w for w in caught if "keeping its last" in str(w.message)]  # the cut prompt fits


def test_empty_prompt(char_model, char_tokenizer):
    # A character vocabulary has no end-of-text token: an empty prompt starts from a newline.
    assert char_tokenizer.eot_id is None
    assert generate(char_model, char_tokenizer, "", max_new_tokens=8, **GREEDY) == generate(
        char_model, char_tokenizer, "\n", max_new_tokens=8, **GREEDY
    )
    no_newline = CharTokenizer.from_text("ab")
    with pytest.raises(DozeroError, match="prompt is empty"):
        generate(tiny_model(vocab_size=2), no_newline, "", max_new_tokens=3)


def test_empty_prompt_starts_from_end_of_text():
    from dozero.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    config = GenerationConfig(max_new_tokens=6, stop_at_eot=False, **GREEDY)
    expected = tokenizer.decode(generate_ids(model, [[tokenizer.eot_id]], config)[0])
    assert generate(model, tokenizer, "", config=config) == expected


def test_each_row_stops_on_its_own_at_end_of_text(char_model, char_tokenizer):
    prompts = ["The quick brown fox", "Hello"]
    full = generate(char_model, char_tokenizer, prompts, max_new_tokens=12, **GREEDY)
    # Pretend that a character of the first continuation (not its first) is end-of-text.
    eot_char = next(c for c in full[0] if c != full[0][0])
    eot_tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-0123456789")
    eot_tokenizer.eot_id = char_tokenizer.encode(eot_char)[0]
    stopped = generate(char_model, eot_tokenizer, prompts, max_new_tokens=12, **GREEDY)
    assert stopped[0] == full[0][: full[0].index(eot_char)] and stopped[0]
    assert stopped[1] == (full[1][: full[1].index(eot_char)] if eot_char in full[1] else full[1])
    assert generate(char_model, eot_tokenizer, prompts, max_new_tokens=12, stop_at_eot=False, **GREEDY) == full


def test_stop_strings(char_model, char_tokenizer):
    full = generate(char_model, char_tokenizer, "Hello", max_new_tokens=30, seed=0, temperature=1.0, top_k=None)
    stop = full[10:12]
    expected = full[: full.index(stop)]
    assert generate(char_model, char_tokenizer, "Hello", max_new_tokens=30, seed=0, temperature=1.0, top_k=None,
                    stop=(stop, "never appears")) == expected  # fmt: skip
    pieces = list(stream(char_model, char_tokenizer, "Hello", max_new_tokens=30, seed=0, temperature=1.0, top_k=None,
                         stop=stop))  # fmt: skip
    assert "".join(pieces) == expected


def test_max_new_tokens_zero_and_model_left_as_found(char_model, char_tokenizer):
    assert generate(char_model, char_tokenizer, "abc", max_new_tokens=0) == ""
    char_model.train()
    generate(char_model, char_tokenizer, "abc", max_new_tokens=3)
    assert char_model.training  # training mode restored, so a training loop can print samples
    assert all(block.att.kv_cache is None for block in char_model.trf_blocks)
    assert char_model.out_head.weight is char_model.tok_emb.weight  # the original head, still tied
    with generation_mode(char_model):  # a model in training mode is switched to eval for generation
        assert not char_model.training
    assert char_model.training
    char_model.eval()


def test_compiled_decode_path_gives_the_same_tokens(char_model, monkeypatch):
    """compile=True decodes over the whole (masked) cache; here the same function runs uncompiled
    (compiling would take longer than this test budget), so the full-cache arithmetic is what is checked."""
    from dozero.generate import engine

    monkeypatch.setattr(engine, "compiled_decode_step", lambda device_type: engine.decode_step_full_cache)
    prompts = [list(range(3, 20)), [7, 8]]  # padded batch, sliding past the context of 32
    config = GenerationConfig(max_new_tokens=40, stop_at_eot=False, **GREEDY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = generate_ids(char_model, prompts, config)
        assert generate_ids(char_model, prompts, GenerationConfig(**{**config.__dict__, "compile": True})) == expected


def test_decode_step_traces_as_one_graph(char_model, monkeypatch):
    """torch.compile must see the decode step whole: a graph break puts Python back between the
    kernels (one in DecodingLinear cost 25% of the compiled speed). Dynamo only (backend="eager"),
    fullgraph=True so that a break raises, on a model laid out for decoding as the CLI does."""
    from dozero.generate import engine

    monkeypatch.setattr(DecodingLinear, "SPLIT_MIN_WEIGHTS", 0)  # lay out this small model's matrices too
    model = copy.deepcopy(char_model)
    use_decoding_layout(model)
    assert isinstance(model.trf_blocks[0].att.qkv, DecodingLinear)
    step = torch.compile(engine.decode_step_full_cache, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(engine, "compiled_decode_step", lambda device_type: step)
    config = GenerationConfig(max_new_tokens=6, stop_at_eot=False, **GREEDY)
    expected = generate_ids(model, [[5, 6, 7]], config)
    assert generate_ids(model, [[5, 6, 7]], GenerationConfig(**{**config.__dict__, "compile": True})) == expected


LLAMA_GQA = {"norm": "rmsnorm", "pos_emb": "rope", "ff": "swiglu", "bias": False, "n_kv_heads": 2, "qkv_bias": False}


@pytest.mark.parametrize("options", [{}, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
def test_decoding_block_equals_the_block_in_a_padded_batch(options, monkeypatch):
    """`use_decoding_layout` turns every block into a `DecodingBlock`, whose one-token path (its own
    attention over the cache, queries and keys rotated together) gives the logits of the model's own
    block at every step of a left-padded batch, and never calls the fused attention kernel."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, **options)
    model = GPTModel(cfg).eval()
    laid_out = copy.deepcopy(model)
    use_decoding_layout(laid_out)
    assert all(type(block) is DecodingBlock for block in laid_out.trf_blocks)
    assert laid_out.state_dict().keys() == model.state_dict().keys()
    prompts, new = [[5, 6, 7, 8, 9], [3], [40, 41]], torch.randint(0, 97, (3, 8))
    logits = {}
    fused_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1) or real_sdpa(*a, **k)
    )
    with torch.inference_mode():
        for name, m in (("block", model), ("decoding", laid_out)):
            state = BatchState(m, prompts, cache_len=5 + 8)
            steps = [state.prefill()]
            fused_calls.clear()
            steps += [state.decode_one_token(new[:, i]) for i in range(new.shape[1])]
            logits[name] = torch.stack(steps)  # (steps, B, V)
            m.clear_kv_cache()
            assert len(fused_calls) == (cfg.n_layers * new.shape[1] if name == "block" else 0)
    torch.testing.assert_close(logits["decoding"], logits["block"], atol=1e-5, rtol=0)


def test_compiled_decoding_rounds_the_cache_to_few_lengths(char_model, monkeypatch):
    """compile=True specializes the step to the cache's length; calls of other prompt and output lengths
    get a cache rounded up to COMPILED_CACHE_STEP slots (at most the context), so they share one compiled
    step instead of compiling again (minutes at 135M)."""
    from dozero.generate import engine

    lengths = []

    def step(*args):
        lengths.append(args[-1].numel())  # slots (S,): the cache length the step was specialized to
        return engine.decode_step_full_cache(*args)

    monkeypatch.setattr(engine, "compiled_decode_step", lambda device_type: step)
    monkeypatch.setattr(engine, "COMPILED_CACHE_STEP", 16)
    config = GenerationConfig(stop_at_eot=False, compile=True, **GREEDY)
    for prompt, new_tokens in (([1, 2, 3], 5), ([4] * 10, 3), ([5] * 7, 9)):
        generate_ids(char_model, [prompt], GenerationConfig(**{**config.__dict__, "max_new_tokens": new_tokens}))
    assert set(lengths) == {16}
    lengths.clear()
    generate_ids(char_model, [[1] * 20], GenerationConfig(**{**config.__dict__, "max_new_tokens": 5}))
    assert set(lengths) == {32}  # 25 slots round up to 32, the context


def test_changed_weights_are_seen_by_the_next_generation():
    """The transposed output head is cached between calls; a training step must invalidate it."""
    model, fresh = tiny_model(seed=3), tiny_model(seed=4)
    config = GenerationConfig(max_new_tokens=10, stop_at_eot=False, **GREEDY)
    assert generate_ids(model, [[1, 2, 3]], config) != generate_ids(fresh, [[1, 2, 3]], config)
    with torch.no_grad():  # in place, as an optimizer step does
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            p.copy_(q)
    assert generate_ids(model, [[1, 2, 3]], config) == generate_ids(fresh, [[1, 2, 3]], config)


def test_model_in_training_sees_its_fused_adamw_steps():
    """Fused AdamW writes weights in place without bumping `_version`: a model in training must not
    sample from a head copy cached before the step (RL rollouts and training samples did)."""
    model = tiny_model(seed=3)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    config = GenerationConfig(max_new_tokens=10, stop_at_eot=False, **GREEDY)
    generate_ids(model, [[1, 2, 3]], config)  # caches a head copy if the cache is used
    version = model.out_head.weight._version
    model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).sum().backward()
    optimizer.step()
    assert model.out_head.weight._version == version  # the trap: no cheap way to see the change
    reference = copy.deepcopy(model)  # a fresh object: no cached copy
    assert generate_ids(model, [[1, 2, 3]], config) == generate_ids(reference, [[1, 2, 3]], config)


def test_tokenizer_larger_than_the_model_is_one_clear_error():
    """A tokenizer whose ids the model has no rows for fails at once, naming both sizes (it was an
    IndexError inside the embedding)."""
    from dozero.tokenizer import load_tokenizer

    model = tiny_model(vocab_size=97)
    with pytest.raises(DozeroError, match=r"tokenizer has 50,257 tokens but the model has only 97 \(its vocab_size\)"):
        generate(model, load_tokenizer("gpt2"), "Hello", max_new_tokens=3)


def test_model_padded_past_the_tokenizer_draws_only_its_ids():
    """GPT-2 models padded to 50,304 rows have ids no tokenizer decodes; generation never draws them,
    even when (as here, on purpose) the padding rows would win."""
    tokenizer = CharTokenizer.from_text("abcdefgh \n")
    n = tokenizer.vocab_size
    model = tiny_model(vocab_size=2 * n)
    with torch.no_grad():  # tied head: padding row n + j = 10 x row j, so the padding copy of the best id wins
        model.tok_emb.weight[n:] = 10.0 * model.tok_emb.weight[:n]
    with torch.inference_mode():
        assert model(torch.tensor([[0, 1, 2]]))[0, -1].argmax() >= tokenizer.vocab_size
    for settings in (GREEDY, {"temperature": 1.0, "seed": 0, "repetition_penalty": 1.3}):
        text = generate(model, tokenizer, "abc", max_new_tokens=20, **settings)
        assert len(text) == 20 and set(text) <= set(tokenizer.chars)


def test_prompts_that_are_not_text_are_one_clear_error(char_model, char_tokenizer):
    for prompt, shown in [(123, "prompt 0 is a int"), ([char_tokenizer.encode("ab")], "prompt 0 is a list"),
                          (["ab", None], "prompt 1 is a NoneType")]:  # fmt: skip
        with pytest.raises(DozeroError, match=f"{shown}, not text; prompts are strings .for token ids"):
            generate(char_model, char_tokenizer, prompt, max_new_tokens=2)
    with pytest.raises(DozeroError, match="prompt 0 is a bytes"):
        list(stream(char_model, char_tokenizer, b"ab", max_new_tokens=2))
