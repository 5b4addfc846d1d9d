"""Llama-style options of GPTModel (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases): the
parts against their formulas, KV cache and batched generation against full forwards, and the
Hugging Face LlamaForCausalLM both ways."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dozero.config import MODEL_PRESETS, ModelConfig, get_model_config
from dozero.errors import DozeroError
from dozero.generate.engine import BatchState, GenerationConfig, generate_ids
from dozero.generate.layout import DecodingLinear, use_decoding_layout
from dozero.model.checkpoint import load_model, model_config_from_dict, save_model
from dozero.model.gpt import FeedForward, GPTModel, RMSNorm, apply_rope, explicit_attention, rope_tables
from dozero.model.info import activation_bytes, layer_summary, memory_estimate, parameter_breakdown

LLAMA = ModelConfig(
    vocab_size=97, context_length=32, emb_dim=48, n_heads=6, n_layers=2, n_kv_heads=2,
    norm="rmsnorm", pos_emb="rope", ff="swiglu", ff_hidden_dim=80, bias=False,
)  # fmt: skip
# Grouped-query attention, plain multi-head attention with biases, one key/value head.
SHAPES = {
    "gqa": LLAMA,
    "mha-bias": ModelConfig(**{**LLAMA.to_dict(), "n_kv_heads": 0, "qkv_bias": True, "bias": True}),
    "mqa-untied": ModelConfig(**{**LLAMA.to_dict(), "n_kv_heads": 1, "tie_weights": False, "rope_theta": 500.0}),
}
GREEDY = {"temperature": 0.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds waiting on 2 shared cores
    yield
    torch.set_num_threads(threads)


def random_model(cfg=LLAMA, seed=0, scale=0.05) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


# ----------------------------------------------------------------------------- the parts


def test_rmsnorm_swiglu_and_rope_follow_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48) * 3
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.scale.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.scale
    torch.testing.assert_close(norm(x), expected)

    ff = FeedForward(LLAMA)
    assert ff.fc.weight.shape == (2 * 80, 48) and ff.proj.weight.shape == (48, 80) and ff.fc.bias is None
    gate, up = ff.fc.weight[:80], ff.fc.weight[80:]  # stacked: gate rows first, then up
    torch.testing.assert_close(ff(x), ff.proj(F.silu(x @ gate.T) * (x @ up.T)))

    # RoPE turns pair (i, i + hs/2) of position p by p * theta^(-2i/hs), as a complex multiplication.
    hs, theta = 8, 100.0
    cos, sin = rope_tables(hs, 16, theta)
    q = torch.randn(1, 1, 16, hs)
    turned = apply_rope(q, cos[None, None], sin[None, None])
    angle = torch.arange(16.0)[:, None] * theta ** (-torch.arange(0, hs, 2) / hs)  # (16, hs/2)
    z = torch.complex(q[..., : hs // 2], q[..., hs // 2 :]) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(turned, torch.cat([z.real, z.imag], dim=-1))
    # ... so q.k depends on the distance between positions only.
    k = torch.randn(1, 1, 1, hs).expand(1, 1, 16, hs)
    q = q[:, :, :1].expand(1, 1, 16, hs)
    dots = (apply_rope(q, cos, sin)[..., :-3, :] * apply_rope(k, cos, sin)[..., 3:, :]).sum(-1)  # distance 3
    torch.testing.assert_close(dots, dots[..., :1].expand_as(dots))


def test_config_validation_and_old_configs():
    for bad, message in [
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"pos_emb": "alibi"}, "pos_emb must be one of"),
        ({"ff": "relu"}, "ff must be one of"),
        ({"n_kv_heads": 5}, r"n_kv_heads \(5\) must divide n_heads \(12\)"),
        ({"n_kv_heads": -1}, "n_kv_heads"),
        ({"ff_hidden_dim": -4}, "ff_hidden_dim must be >= 0"),
        ({"pos_emb": "rope", "rope_theta": 0.0}, "rope_theta > 0"),
        ({"pos_emb": "rope", "emb_dim": 30, "n_heads": 2}, "even head size"),
    ]:
        with pytest.raises(DozeroError, match=message):
            ModelConfig(**bad)
    # A config saved before these options existed is GPT-2: learned positions, LayerNorm, GELU, biases.
    old = {"vocab_size": 65, "context_length": 64, "emb_dim": 128, "n_heads": 4, "n_layers": 4, "drop_rate": 0.0,
           "qkv_bias": False, "tie_weights": True, "layer_norm_eps": 1e-5, "gelu_approximation": "none"}  # fmt: skip
    cfg = model_config_from_dict(old, "old.json")
    assert cfg == MODEL_PRESETS["shakespeare-char"] and cfg.kv_heads == 4 and cfg.hidden_dim == 512
    with pytest.raises(DozeroError, match="old.json: model config: norm must be one of"):
        model_config_from_dict({**old, "norm": 5}, "old.json")


def test_module_shapes():
    model = GPTModel(LLAMA)
    assert model.pos_emb is None and "rope_cos" not in model.state_dict()  # a buffer, not saved
    assert model.trf_blocks[0].att.qkv.weight.shape == ((6 + 2 * 2) * 8, 48)  # q 6 heads, k and v 2 each
    assert model.trf_blocks[0].att.out_proj.bias is None and isinstance(model.final_norm, RMSNorm)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(("bias", "shift")) for n in names)


@pytest.mark.parametrize("preset", ["llama-char", "smollm2-135m"])
def test_parameter_breakdown_and_layer_table(preset):
    cfg = get_model_config(preset)
    with torch.device("meta"):
        model = GPTModel(cfg)
    breakdown = parameter_breakdown(cfg)
    assert breakdown["total"] == model.num_parameters()
    assert breakdown["embeddings"] == cfg.vocab_size * cfg.emb_dim  # RoPE: no position parameters
    rows = layer_summary(cfg, 1, 8)
    assert sum(r.params for r in rows if r.depth == 0) == model.num_parameters()
    qkv = next(r for r in rows if r.name == "trf_blocks.0.att.qkv")
    assert qkv.shape == (1, 8, cfg.emb_dim + 2 * cfg.kv_heads * cfg.head_dim)
    # The KV cache holds the key/value heads only: SmolLM2 stores 3 of its 9 heads' worth.
    kv_bytes = memory_estimate(cfg, batch_size=2, context_length=16)["fp32"]["kv_cache"]
    assert kv_bytes == 2 * cfg.n_layers * 2 * 16 * cfg.kv_heads * cfg.head_dim * 4


def test_layer_table_matches_forward():
    B, T = 2, 16
    model = GPTModel(LLAMA).eval()
    seen = {}
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
    with torch.no_grad():
        model(torch.zeros(B, T, dtype=torch.long))
    checked = 0
    for row in layer_summary(LLAMA, B, T, expand_blocks="all"):
        out = seen.get(row.name)
        if out is not None:
            out = out[0] if isinstance(out, tuple) else out
            assert tuple(out.shape) == row.shape, row.name
            checked += 1
    assert checked >= 3 + 6 * LLAMA.n_layers


# ----------------------------------------------------------------------------- attention and the KV cache


@pytest.mark.parametrize("shape", list(SHAPES))
def test_explicit_attention_equals_sdpa_with_padding(shape):
    """Left padding + position_ids give the unpadded logits, with the fused and the explicit path."""
    model = random_model(SHAPES[shape])
    seq = torch.randint(0, 97, (1, 10))
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], dim=1)  # (1, 13)
    keep = torch.arange(13) >= pad
    mask = (torch.ones(13, 13).tril().bool() & keep[None, :])[None, None]  # (1, 1, T, S)
    positions = (torch.arange(13) - pad).clamp(min=0)[None]
    with torch.no_grad():
        expected = model(seq)
        slow, weights = model(seq, return_attention=True)
        torch.testing.assert_close(slow, expected, atol=1e-5, rtol=0)
        assert weights[0].shape == (1, 6, 10, 10)
        for explicit in (False, True):
            out = model(padded, position_ids=positions, attn_mask=mask, return_attention=explicit)
            out = out[0] if explicit else out
            torch.testing.assert_close(out[:, pad:], expected, atol=1e-5, rtol=0)


def test_explicit_attention_groups_heads_as_repeat():
    """Key/value head j serves query heads j*g .. j*g+g-1 (Hugging Face's repeat_kv)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    y, _ = explicit_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kv_cache_decoding_equals_full_forward(shape):
    model = random_model(SHAPES[shape])
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(x)
        model.setup_kv_cache(batch_size=2, max_len=32)
        cache = model.trf_blocks[0].att.kv_cache
        assert cache.k.shape == (2, SHAPES[shape].kv_heads, 32, 8)  # only the key/value heads are stored
        steps = [model(x[:, :12], input_pos=torch.arange(12))]  # prompt
        for t in range(12, 20):  # then one token at a time
            steps.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_engine_logits_equal_full_forward_in_a_padded_batch():
    model = random_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (7, 3, 11)]  # left-padded batch
    new = torch.randint(0, 97, (3, 10), generator=g)
    reference = copy.deepcopy(model)
    with torch.inference_mode():
        state = BatchState(model, prompts, cache_len=11 + 10)
        logits = state.prefill()
        for step in range(new.shape[1] + 1):
            for b, prompt in enumerate(prompts):
                ids = torch.tensor([prompt + new[b, :step].tolist()])
                torch.testing.assert_close(logits[b], reference(ids)[0, -1], atol=1e-5, rtol=0)
            if step < new.shape[1]:
                logits = state.decode_one_token(new[:, step])
    model.clear_kv_cache()


def full_forward_greedy(model, ids: list[int], steps: int, keep: int) -> list[int]:
    """No cache: the whole window through the model at every step, restarting from the last `keep`
    tokens (re-read from position 0) when the window would pass the context, as the engine does."""
    tokens, start = list(ids), 0
    with torch.no_grad():
        for _ in range(steps):
            if len(tokens) - start > model.cfg.context_length:
                start = len(tokens) - keep
            tokens.append(int(model(torch.tensor([tokens[start:]]))[0, -1].argmax()))
    return tokens[len(ids) :]


def test_batched_generation_and_sliding_window_equal_one_by_one():
    """With RoPE only distances matter, so re-reading the kept window from position 0 when it slides
    is exactly what a model given that window from the start computes; batched rows (left-padded)
    generate what they generate alone."""
    model = random_model(scale=1.0)  # large weights: peaked distributions, no near-ties in greedy
    ctx = LLAMA.context_length
    prompts = [list(range(10, 30)), [5, 6, 7]]
    config = GenerationConfig(max_new_tokens=2 * ctx, stop_at_eot=False, **GREEDY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sliding the window"
        batched = generate_ids(model, prompts, config)
        alone = [generate_ids(model, [p], config)[0] for p in prompts]
    assert batched == alone
    for prompt, ours in zip(prompts, batched, strict=True):
        assert ours == full_forward_greedy(model, prompt, 2 * ctx, keep=ctx - ctx // 4)


def test_decoding_layout_keeps_the_logits(monkeypatch):
    monkeypatch.setattr(DecodingLinear, "SPLIT_MIN_WEIGHTS", 0)  # lay out this small model's matrices too
    model = random_model(SHAPES["mqa-untied"])
    laid_out = copy.deepcopy(model)
    use_decoding_layout(laid_out)
    assert isinstance(laid_out.trf_blocks[0].ff.fc, DecodingLinear)
    config = GenerationConfig(max_new_tokens=12, stop_at_eot=False, **GREEDY)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(laid_out(x), model(x), atol=1e-5, rtol=0)
    assert generate_ids(laid_out, [[1, 2, 3], [4]], config) == generate_ids(model, [[1, 2, 3], [4]], config)


def test_full_cache_decode_step_traces_as_one_graph(monkeypatch):
    """compile=True decodes over the whole masked cache; Dynamo (backend="eager", fullgraph=True, so a
    graph break raises) must see the RoPE lookup and grouped-query attention whole, and the tokens
    must equal the eager path's in a padded batch."""
    from dozero.generate import engine

    monkeypatch.setattr(DecodingLinear, "SPLIT_MIN_WEIGHTS", 0)
    model = random_model(scale=1.0)
    use_decoding_layout(model)
    step = torch.compile(engine.decode_step_full_cache, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(engine, "compiled_decode_step", lambda device_type: step)
    config = GenerationConfig(max_new_tokens=8, stop_at_eot=False, **GREEDY)
    prompts = [[5, 6, 7, 8, 9], [3]]
    expected = generate_ids(model, prompts, config)
    assert generate_ids(model, prompts, GenerationConfig(**{**config.__dict__, "compile": True})) == expected


# ----------------------------------------------------------------------------- saving and training


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dozero_folder_round_trip(tmp_path, shape):
    model = random_model(SHAPES[shape])
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg and loaded.rope_cos.device.type == "cpu"  # tables rebuilt, not meta
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_initialization():
    model = GPTModel(get_model_config("llama-char"))
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            assert torch.all(p == 1), name
        elif name.endswith(("out_proj.weight", "ff.proj.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.1), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_autograd(precision):
    from test_model import saved_activation_bytes  # the same counting of what autograd keeps

    # (H = 160 so that no activation (B*T = 256 rows) has the shape of a weight, which the count skips)
    cfg = ModelConfig(**{**LLAMA.to_dict(), "vocab_size": 1000, "context_length": 64, "emb_dim": 96, "n_layers": 3,
                         "ff_hidden_dim": 160})  # fmt: skip
    measured = saved_activation_bytes(cfg, 4, 64, precision)
    assert activation_bytes(cfg, 4, 64, precision) == pytest.approx(measured, rel=0.05)


# ----------------------------------------------------------------------------- Hugging Face Llama both ways

# (layers, heads, kv heads, hidden, intermediate, vocab, positions, tied, attention_bias, mlp_bias)
HF_SHAPES = {
    "gqa-tied": (2, 6, 2, 48, 80, 97, 32, True, False, False),
    "mha-untied": (2, 4, 4, 32, 64, 50, 24, False, False, False),
    "mqa-attention-bias": (1, 4, 1, 32, 40, 61, 16, False, True, False),
    "mlp-bias": (2, 2, 1, 16, 24, 33, 16, True, False, True),
}


def hf_llama(shape, seed=0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, heads, kv, hidden, inter, vocab, ctx, tied, attention_bias, mlp_bias = HF_SHAPES[shape]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, hidden_size=hidden,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=ctx, tie_word_embeddings=tied,
        attention_bias=attention_bias, mlp_bias=mlp_bias, rms_norm_eps=1e-5, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
        **extra,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initializes norms to 1 and biases to 0; random values test the mapping
        for name, p in model.named_parameters():
            if not name.endswith("embed_tokens.weight"):
                p.add_(torch.randn_like(p) * 0.05)
    return model


def assert_same_logits(ours, theirs) -> None:
    vocab, ctx = ours.cfg.vocab_size, ours.cfg.context_length
    torch.manual_seed(1)
    for B, T in [(2, ctx), (3, max(1, ctx // 3))]:
        x = torch.randint(0, vocab, (B, T))
        with torch.no_grad():
            expected = theirs(x).logits
            got = ours(x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_hf_llama_folder_loads_with_equal_logits(tmp_path, shape):
    pytest.importorskip("transformers")
    theirs = hf_llama(shape)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    layers, heads, kv, hidden, inter, vocab, ctx, tied, attention_bias, mlp_bias = HF_SHAPES[shape]
    cfg = ours.cfg
    assert (cfg.norm, cfg.pos_emb, cfg.ff, cfg.rope_theta) == ("rmsnorm", "rope", "swiglu", 500.0)
    assert (cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.emb_dim, cfg.hidden_dim) == (layers, heads, kv, hidden, inter)
    assert cfg.tie_weights is tied and (ours.out_head.weight is ours.tok_emb.weight) is tied
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_dozero_saves_hf_llama_loads(tmp_path, shape):
    transformers = pytest.importorskip("transformers")
    ours = load_model_from(hf_llama(shape, seed=3), tmp_path / "src")
    save_model(ours, tmp_path / "out", format="hf")
    theirs, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    # No missing, unexpected or mismatched keys: transformers initialized nothing at random.
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert theirs.config.rope_parameters == {"rope_theta": 500.0, "rope_type": "default"}
    assert_same_logits(ours, theirs.eval())
    assert_same_logits(load_model(tmp_path / "out"), theirs)  # ...and back into dozero


def load_model_from(hf_model, folder):
    hf_model.save_pretrained(folder)
    return load_model(folder)


def test_dozero_trained_llama_exports(tmp_path):
    """A model built by dozero (llama-char's shape, no biases) goes out and comes back unchanged."""
    transformers = pytest.importorskip("transformers")
    ours = random_model(SHAPES["mha-bias"])  # qkv and out/ff biases: attention_bias and mlp_bias on
    save_model(ours, tmp_path, format="hf")
    theirs, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert theirs.config.attention_bias and theirs.config.mlp_bias
    assert_same_logits(ours, theirs.eval())


def test_unsupported_llama_folders_are_refused(tmp_path):
    import json

    hf_llama("gqa-tied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling 'linear'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
        ({"head_dim": 16}, "config.json does not match the weights"),  # a head_dim the weights do not have
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(DozeroError, match=message):
            load_model(tmp_path)
    # The 4.x layout: rope_theta beside the config, no rope_parameters.
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    (tmp_path / "config.json").write_text(json.dumps({**old, "rope_theta": 250.0, "rope_scaling": None}))
    assert load_model(tmp_path).cfg.rope_theta == 250.0


def test_mixed_shape_has_no_hf_export(tmp_path):
    mixed = GPTModel(ModelConfig(**{**LLAMA.to_dict(), "norm": "layernorm", "bias": True}))
    with pytest.raises(DozeroError, match="no Hugging Face architecture holds this model"):
        save_model(mixed, tmp_path, format="hf")


@pytest.mark.slow  # ~25 s on 2 shared cores
def test_cli_trains_the_llama_preset_and_generates(tmp_path, capsys):
    """`dozero train --preset llama-char --max-steps 20`: the loss starts at ln(65) and falls; the run
    folder holds a Llama-shaped model that `dozero generate` reads."""
    import json

    from dozero.cli import main

    run = tmp_path / "run"
    argv = ["train", "--preset", "llama-char", "--max-steps", "20", "--out-dir", str(run), "--threads", "1"]
    assert main(argv + ["--sample-tokens", "0", "--tensorboard", "off"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[0] == pytest.approx(math.log(65), abs=0.15)
    assert losses[-1] < losses[0] - 0.3 and val[-1] < losses[0] - 0.3
    model = load_model(run)
    assert model.cfg == get_model_config("llama-char") and model.pos_emb is None
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.strip()) > len("ROMEO:")
