"""GPTModel: attention paths, KV cache, initialization, parameter counts, memory estimates, layer
table, and dozero's own model folder (save -> load, run folders, bad files)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dozero.config import MODEL_PRESETS, PUBLISHED_PARAMETER_COUNTS, ModelConfig, get_model_config
from dozero.errors import DozeroError
from dozero.model.checkpoint import load_config, load_model, resolve_model_dir, save_model
from dozero.model.gpt import FeedForward, GPTModel
from dozero.model.info import activation_bytes, layer_summary, memory_estimate, parameter_breakdown

ODD = ModelConfig(vocab_size=1000, context_length=64, emb_dim=96, n_heads=6, n_layers=3, qkv_bias=True)


def random_model(cfg=ODD, seed=0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ----------------------------------------------------------------------------- attention


def test_explicit_attention_equals_sdpa():
    model = random_model()
    x = torch.randint(0, ODD.vocab_size, (2, 40))
    with torch.no_grad():
        fast = model(x)
        slow, weights = model(x, return_attention=True)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)
    assert len(weights) == ODD.n_layers
    for w in weights:
        assert w.shape == (2, ODD.n_heads, 40, 40)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, ODD.n_heads, 40))
        assert torch.all(w.triu(diagonal=1) == 0)  # causal: nothing attends to the future
        assert torch.all(w.diagonal(dim1=-2, dim2=-1) > 0)


def test_padding_mask_equals_unpadded():
    """attn_mask + position_ids: a left-padded row gives the logits of the unpadded sequence."""
    model = random_model()
    seq = torch.randint(0, ODD.vocab_size, (1, 10))
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], dim=1)  # (1, 13)
    keep = torch.arange(13) >= pad
    mask = (torch.ones(13, 13).tril().bool() & keep[None, :])[None, None]  # (1, 1, T, S)
    positions = (torch.arange(13) - pad).clamp(min=0)[None]
    with torch.no_grad():
        expected = model(seq)
        for explicit in (False, True):
            out = model(padded, position_ids=positions, attn_mask=mask, return_attention=explicit)
            out = out[0] if explicit else out
            torch.testing.assert_close(out[:, pad:], expected, atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_full_forward():
    model = random_model()
    x = torch.randint(0, ODD.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(x)
        model.setup_kv_cache(batch_size=2, max_len=32)
        steps = [model(x[:, :12], input_pos=torch.arange(12))]  # prompt
        for t in range(12, 20):  # then one token at a time
            steps.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="exceed the context length"):
        random_model()(torch.zeros(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------- init and counts


def test_gpt2_initialization():
    cfg = ModelConfig(vocab_size=2000, context_length=128, emb_dim=256, n_heads=4, n_layers=4, qkv_bias=True)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("att.out_proj.weight", "ff.proj.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif name.endswith("weight") and p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        elif name.endswith(("bias", "shift")):
            assert torch.all(p == 0), name
        elif name.endswith("scale"):
            assert torch.all(p == 1), name
        else:
            raise AssertionError(f"unchecked parameter {name}")
    assert model.out_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("preset", list(PUBLISHED_PARAMETER_COUNTS))
def test_published_parameter_counts(preset):
    cfg = get_model_config(preset)
    with torch.device("meta"):  # shapes only: gpt2-xl would take 6 GB
        model = GPTModel(cfg)
    assert model.num_parameters() == PUBLISHED_PARAMETER_COUNTS[preset]
    assert parameter_breakdown(cfg)["total"] == PUBLISHED_PARAMETER_COUNTS[preset]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("preset", ["shakespeare-char", "gpt2"])
def test_parameter_breakdown_by_part(preset, tie):
    cfg = get_model_config(preset, tie_weights=tie, qkv_bias=not tie)
    with torch.device("meta"):
        model = GPTModel(cfg)
    counts = {"embeddings": 0, "attention": 0, "feed_forward": 0, "norms": 0, "head": 0}
    part = {"tok_emb": "embeddings", "pos_emb": "embeddings", "att": "attention", "ff": "feed_forward",
            "norm1": "norms", "norm2": "norms", "final_norm": "norms", "out_head": "head"}  # fmt: skip
    for name, p in model.named_parameters():  # named_parameters() lists a tied tensor once
        key = name.split(".")[2] if name.startswith("trf_blocks") else name.split(".")[0]
        counts[part[key]] += p.numel()
    breakdown = parameter_breakdown(cfg)
    assert {k: breakdown[k] for k in counts} == counts
    assert breakdown["head_tied"] is tie and breakdown["total"] == model.num_parameters()


def test_emb_dim_not_divisible_by_heads():
    with pytest.raises(DozeroError, match=r"emb_dim \(100\) must be divisible by n_heads \(3\); try n_heads=2"):
        ModelConfig(emb_dim=100, n_heads=3)


def test_gelu_choice():
    """'none' is the exact erf GELU, 'tanh' GPT-2's approximation: the feed-forward computes the one
    its config names, and anything else is a one-line error."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 3
    for choice in ("none", "tanh"):
        ff = FeedForward(ModelConfig(emb_dim=16, n_heads=2, gelu_approximation=choice))
        hidden = ff.fc(x)
        exact = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        tanh = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
        torch.testing.assert_close(ff(x), ff.proj(exact if choice == "none" else tanh))
    assert get_model_config("shakespeare-char").gelu_approximation == "none"  # nanoGPT's nn.GELU()
    assert get_model_config("gpt2").gelu_approximation == "tanh"  # what OpenAI's weights were trained with
    with pytest.raises(DozeroError, match="gelu_approximation must be 'tanh' or 'none', got 'erf'"):
        ModelConfig(gelu_approximation="erf")


# ----------------------------------------------------------------------------- memory and layer table


def saved_activation_bytes(cfg, batch_size, tokens, precision) -> int:
    """Bytes autograd really keeps for backward (one training step), excluding weights and the
    bf16 copies of weights that autocast makes (counted under weights by memory_estimate)."""
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        is_weight_copy = t.dtype == torch.bfloat16 and t.dim() == 2 and tuple(t.shape) in weight_shapes
        if s.data_ptr() not in param_storages and not is_weight_copy:
            storages[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch_size, tokens))
    y = torch.randint(0, cfg.vocab_size, (batch_size, tokens))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten())
    storages[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()  # the loop holds them
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_autograd(precision):
    cfg = ModelConfig(vocab_size=1000, context_length=64, emb_dim=96, n_heads=6, n_layers=3)
    measured = saved_activation_bytes(cfg, 4, 64, precision)
    estimated = activation_bytes(cfg, 4, 64, precision)
    assert estimated == pytest.approx(measured, rel=0.05)


def test_memory_estimate_arithmetic():
    cfg = get_model_config("gpt2")
    N = 124_439_808
    mem = memory_estimate(cfg, batch_size=8, context_length=1024)
    assert mem["parameters"] == N and mem["context_length"] == 1024
    fp32, bf16 = mem["fp32"], mem["bf16"]
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"]) == (4 * N, 4 * N, 8 * N)
    assert (bf16["weights"], bf16["gradients"], bf16["optimizer"]) == (6 * N, 4 * N, 8 * N)
    for row in (fp32, bf16):
        assert row["training"] == row["weights"] + row["gradients"] + row["optimizer"] + row["activations"]
    assert bf16["activations"] < fp32["activations"] and bf16["inference_weights"] == 2 * N
    assert fp32["kv_cache"] == 2 * 12 * 8 * 1024 * 768 * 4
    assert fp32["inference"] == 4 * N + fp32["kv_cache"] + 8 * 1024 * 50257 * 4
    # activations grow linearly with the batch; the default context is the model's
    assert memory_estimate(cfg, 16)["fp32"]["activations"] == 2 * fp32["activations"]


def test_layer_summary_shapes_match_forward():
    cfg = MODEL_PRESETS["shakespeare-char"]
    B, T = 2, 16
    model = GPTModel(cfg).eval()
    seen = {}
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
    with torch.no_grad():
        model(torch.zeros(B, T, dtype=torch.long))
    rows = layer_summary(cfg, B, T, expand_blocks="all")
    checked = 0
    for row in rows:
        out = seen.get(row.name)
        if out is not None:
            out = out[0] if isinstance(out, tuple) else out
            assert tuple(out.shape) == row.shape, row.name
            checked += 1
    assert checked >= 4 + 6 * cfg.n_layers
    assert sum(r.params for r in rows if r.depth == 0) == model.num_parameters()
    assert rows[-1].shape == (B, T, cfg.vocab_size) and rows[-1].dims == "(B, T, V)"
    inner = [r for r in rows if r.depth == 1 and r.name.startswith("trf_blocks.0.")]
    assert sum(r.params for r in inner) == rows[4].params  # the block row = its steps


# ----------------------------------------------------------------------------- dozero folders


class FakeTokenizer:
    """Duck-typed stand-in for dozero.tokenizer (only `save` and `eot_id` are used)."""

    eot_id = 3

    def save(self, folder):
        (folder / "fake_tokenizer.json").write_text('{"kind": "fake"}')


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    cfg = ModelConfig(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, tie_weights=tie)
    model = random_model(cfg)
    save_model(model, tmp_path / "m", tokenizer=FakeTokenizer(), metadata={"step": 7, "val_loss": 1.5})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "dozero" and config["step"] == 7 and config["model"]["tie_weights"] is tie
    assert (tmp_path / "m" / "fake_tokenizer.json").is_file()
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.endswith(".tmp")]  # atomic writes cleaned up
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == cfg and not loaded.training
    assert (loaded.out_head.weight is loaded.tok_emb.weight) is tie
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    half = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert half.tok_emb.weight.dtype == torch.bfloat16


def test_run_folder_prefers_best(tmp_path):
    a, b = random_model(seed=1), random_model(seed=2)
    save_model(a, tmp_path / "run" / "latest")
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "latest"
    save_model(b, tmp_path / "run" / "best")
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "best"
    assert torch.equal(load_model(tmp_path / "run").tok_emb.weight, b.tok_emb.weight)
    assert load_config(tmp_path / "run") == ODD


def test_bad_folders(tmp_path):
    with pytest.raises(DozeroError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(DozeroError, match="holds no model"):
        load_model(tmp_path)
    save_model(random_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(DozeroError, match="truncated or corrupt"):
        load_model(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text('{"format": "dozero", "model": {"emb_dim": "96"}}')
    with pytest.raises(DozeroError, match="'emb_dim' should be int"):
        load_model(tmp_path / "m")
    config.write_text("{not json")
    with pytest.raises(DozeroError, match="not valid JSON"):
        load_model(tmp_path / "m")
