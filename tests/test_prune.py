"""Pruning (compress/prune.py): exact sparsity, Wanda's activation-aware choice, narrower feed-forward
layers that save/load and compute what the kept neurons computed, bad input, the CLI."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from dozero.cli import main
from dozero.compress.prune import PruneConfig, block_linears, lowest, prune, sparsity_of
from dozero.config import get_model_config
from dozero.errors import DozeroError
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.model.info import layer_summary


def _tiny(preset="shakespeare-char", seed=0):
    torch.manual_seed(seed)
    return GPTModel(get_model_config(preset)).eval()


def _ids(n=200, seed=1):
    return torch.randint(0, 65, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_unstructured_sparsity_is_exact_in_every_layer(method, sparsity):
    model = prune(_tiny(), PruneConfig(method=method, sparsity=sparsity), _ids())
    for name, module in block_linears(model):
        w = module.weight
        if method == "magnitude":
            assert int((w == 0).sum()) == round(sparsity * w.numel()), name
        else:  # per output row
            assert ((w == 0).sum(dim=1) == round(sparsity * w.shape[1])).all(), name
    assert sparsity_of(model) == pytest.approx(sparsity, abs=0.005)  # wanda rounds per row


def test_magnitude_removes_the_smallest_weights():
    model = _tiny()
    before = model.trf_blocks[0].ff.fc.weight.detach().clone()
    prune(model, PruneConfig(method="magnitude", sparsity=0.5))
    after = model.trf_blocks[0].ff.fc.weight
    removed, kept = before[after == 0].abs(), before[after != 0].abs()
    assert removed.max() <= kept.min()


def test_wanda_weighs_each_weight_by_its_input_norm():
    """Hand-made: row [1, 2, 3, 4] with inputs whose norms are [10, 1, 1, 0.1]: scores [10, 2, 3, 0.4];
    at 50% Wanda drops inputs 3 and 1 (scores 0.4 and 2), magnitude would drop 0 and 1."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 0.1])
    assert lowest(w.abs() * norms, 2, dim=1).tolist() == [[False, True, False, True]]
    assert lowest(w.abs(), 2).tolist() == [[True, True, False, False]]
    # Through a model, the calibration activations change the choice (per-row magnitude would not).
    wanda = prune(_tiny(), PruneConfig(method="wanda", sparsity=0.5), _ids())
    w = _tiny().trf_blocks[1].ff.proj.weight
    by_magnitude = lowest(w.abs(), w.shape[1] // 2, dim=1)
    by_wanda = wanda.trf_blocks[1].ff.proj.weight == 0
    assert (by_wanda != by_magnitude).float().mean() > 0.05


@pytest.mark.parametrize("preset", ["shakespeare-char", "llama-char"])
def test_neurons_shrink_the_matrices_and_keep_the_kept_function(tmp_path, preset):
    model = _tiny(preset)
    H = model.cfg.hidden_dim
    dead = torch.arange(0, H, 4)  # a quarter of the neurons: make them contribute nothing
    with torch.no_grad():
        for block in model.trf_blocks:
            block.ff.proj.weight[:, dead] = 0.0
    x = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        expected = model(x)
    small = prune(model, PruneConfig(method="neurons", sparsity=0.25))
    assert small.cfg.ff_hidden_dim == H - len(dead)
    fc_rows = (2 if small.cfg.ff == "swiglu" else 1) * (H - len(dead))
    assert small.trf_blocks[0].ff.fc.weight.shape == (fc_rows, small.cfg.emb_dim)
    assert small.trf_blocks[3].ff.proj.weight.shape == (small.cfg.emb_dim, H - len(dead))
    assert small.num_parameters() < model.num_parameters()
    with torch.no_grad():  # the removed neurons were the dead ones: same function
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)
    save_model(small, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.ff_hidden_dim == H - len(dead)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_bad_sparsity_is_one_line(sparsity):
    model = _tiny()
    before = model.trf_blocks[0].ff.fc.weight.detach().clone()
    with pytest.raises(DozeroError, match=r"sparsity must be in \[0, 1\)"):
        prune(model, PruneConfig(method="magnitude", sparsity=sparsity))
    assert torch.equal(model.trf_blocks[0].ff.fc.weight, before)


def test_cli_prune(tmp_path, capsys):
    from dozero.tokenizer.char import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-&$3")
    save_model(_tiny(), tmp_path / "fp32", tokenizer=tok)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    args = ["compress", "prune", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "w50")]
    assert main([*args, "--method", "wanda", "--sparsity", "0.5", "--calibration", str(text)]) == 0
    assert "50.0% of the blocks' weights are zero" in capsys.readouterr().out
    assert sparsity_of(load_model(tmp_path / "w50")) == pytest.approx(0.5, abs=1e-3)
    args = ["compress", "prune", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "x")]
    assert main([*args, "--method", "magnitude", "--sparsity", "1"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # six models saved, measured and decoded in fresh processes: ~60-200 s on the shared 2 cores
def test_cli_report_writes_the_table_and_the_plot(tmp_path, capsys):
    """`dozero compress report` on a small model: one row per setting, sizes that shrink as they should."""
    import json

    from dozero.tokenizer.char import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-&$3")
    save_model(_tiny(), tmp_path / "fp32", tokenizer=tok)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 30)
    task = tmp_path / "quiz.jsonl"
    task.write_text('{"question": "the quick brown", "choices": ["fox", "dog"], "answer": 0}\n' * 3)
    args = ["compress", "report", "--model", str(tmp_path / "fp32"), "--text", str(text), "--out", str(tmp_path / "r")]
    settings = ["fp32", "int8", "int4-g32", "int8-fbgemm-smooth", "wanda-50%", "neurons-25%", "heads-33%"]
    flags = ["--calibration", str(text), "--max-tokens", "200", "--new-tokens", "4", "--tasks", str(task)]
    assert main([*args, *flags, "--limit", "3", "--settings", *settings]) == 0
    rows = {r["setting"]: r for r in json.loads((tmp_path / "r" / "report.json").read_text())["rows"]}
    assert list(rows) == settings
    assert rows["int8"]["weights_mb"] < rows["fp32"]["weights_mb"] / 3  # int8 + fp16 scales, fp32 norms
    assert rows["int4-g32"]["weights_mb"] < rows["int8"]["weights_mb"]
    assert rows["neurons-25%"]["weights_mb"] < rows["fp32"]["weights_mb"] == rows["wanda-50%"]["weights_mb"]
    assert rows["heads-33%"]["weights_mb"] < rows["fp32"]["weights_mb"]  # 4 -> 3 heads: qkv and out_proj shrink
    assert all(r["perplexity"] > 1 and r["tokens_per_second"] > 0 for r in rows.values())
    assert all(r["weights_mb"] < r["disk_mb"] < r["weights_mb"] + 0.1 for r in rows.values())  # + config, vocab
    assert all(r["peak_memory_mb"] > r["weights_mb"] for r in rows.values())  # a fresh process each
    assert all(list(r["tasks"]) == ["quiz"] and 0 <= r["tasks"]["quiz"] <= 1 for r in rows.values())
    assert (tmp_path / "r" / "quality_vs_size.png").stat().st_size > 1000
    assert "| int8 |" in (tmp_path / "r" / "report.md").read_text()
    assert main([*args, "--settings", "int3"]) == 2
    assert "unknown setting 'int3'" in capsys.readouterr().err


# Attention heads (structured): which heads go, the shapes, the function of the kept heads, the file.


def _head_cols(heads, hs):
    return torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in heads])


@pytest.mark.parametrize(
    "preset, sparsity, dead, n_heads, n_kv",
    [
        ("shakespeare-char", 0.5, [1, 2], 2, 2),  # 4 heads, no GQA: whole heads (queries, keys, values) go
        ("llama-char", 0.5, [0, 3], 2, 2),  # 4 query heads in 2 key/value groups: one query head per group
    ],
)
def test_heads_shrink_the_matrices_and_keep_the_kept_function(tmp_path, preset, sparsity, dead, n_heads, n_kv):
    """Heads whose out_proj columns are zero add nothing: they are the ones removed, and the logits stay."""
    from dozero.generate.engine import GenerationConfig, generate_ids
    from dozero.generate.layout import use_decoding_layout

    model = _tiny(preset)
    C, hs = model.cfg.emb_dim, model.cfg.head_dim
    with torch.no_grad():
        for block in model.trf_blocks:
            block.att.out_proj.weight[:, _head_cols(dead, hs)] = 0.0
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    small = prune(model, PruneConfig(method="heads", sparsity=sparsity), _ids())
    assert (small.cfg.n_heads, small.cfg.kv_heads, small.cfg.head_dim) == (n_heads, n_kv, hs)
    assert small.trf_blocks[0].att.qkv.weight.shape == ((n_heads + 2 * n_kv) * hs, C)
    assert small.trf_blocks[3].att.out_proj.weight.shape == (C, n_heads * hs)
    assert small.num_parameters() < model.num_parameters()
    rows = {row.name: row.params for row in layer_summary(small.cfg, expand_blocks="all")}  # `dozero model info`
    assert rows["trf_blocks.0.att.out_proj"] == sum(p.numel() for p in small.trf_blocks[0].att.out_proj.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)
    save_model(small, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert (loaded.cfg.n_heads, loaded.cfg.head_size) == (n_heads, hs)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    # generate (KV cache, the decoding layout) gives what repeated full forwards give
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=8, stop_at_eot=False)
    use_decoding_layout(loaded)  # as `dozero generate` runs a model on the CPU
    out = generate_ids(loaded, [x[0, :5].tolist()], greedy)[0]
    ids = x[0, :5]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, small(ids[None])[0, -1].argmax()[None]])
    assert out[-8:] == ids[5:].tolist()


def test_head_importance_is_the_energy_each_head_adds():
    """Against the definition, computed directly: sum over tokens of ||W_o[:, h] y_h||^2."""
    from dozero.compress.prune import head_importance

    model, ids = _tiny("llama-char"), _ids(150)
    hs, inputs = model.cfg.head_dim, []
    hook = model.trf_blocks[2].att.out_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0][0]))
    with torch.no_grad():
        model(ids[:64][None]), model(ids[64:128][None]), model(ids[128:][None])  # the windows of context 64
    hook.remove()
    y, w = torch.cat(inputs), model.trf_blocks[2].att.out_proj.weight.detach()  # (150, nh * hs), (C, nh * hs)
    direct = torch.stack([(y[:, _head_cols([h], hs)] @ w[:, _head_cols([h], hs)].T).square().sum() for h in range(4)])
    torch.testing.assert_close(head_importance(model, ids)[2], direct, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "preset, sparsity, message",
    [
        ("shakespeare-char", 0.9, "removes all 4 attention heads of every block; use a sparsity below 0.875"),
        ("llama-char", 0.8, "removes all 2 query heads of each key/value group of every block"),
    ],
)
def test_pruning_every_head_is_one_line(preset, sparsity, message):
    with pytest.raises(DozeroError, match=message):
        prune(_tiny(preset), PruneConfig(method="heads", sparsity=sparsity), _ids())
    with pytest.raises(DozeroError, match="heads needs calibration text"):
        prune(_tiny(preset), PruneConfig(method="heads", sparsity=0.5))


def test_cli_prune_heads(tmp_path, capsys):
    from dozero.tokenizer.char import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-&$3")
    save_model(_tiny("llama-char"), tmp_path / "fp32", tokenizer=tok)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    args = ["compress", "prune", "--model", str(tmp_path / "fp32"), "--calibration", str(text), "--method", "heads"]
    assert main([*args, "--sparsity", "0.5", "--out", str(tmp_path / "h50")]) == 0
    assert "heads: 4 -> 2 attention heads per block" in capsys.readouterr().out
    assert load_model(tmp_path / "h50").cfg.n_heads == 2
    assert main([*args, "--sparsity", "0.8", "--out", str(tmp_path / "x")]) == 2
    assert "removes all 2 query heads" in capsys.readouterr().err
    assert main([*args, "--finetune-steps", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--finetune-steps needs --data TEXT" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    tuned = ["--sparsity", "0.5", "--finetune-steps", "3", "--data", str(text), "--out", str(tmp_path / "h50ft")]
    assert main([*args, *tuned]) == 0
    out = capsys.readouterr().out
    assert "fine-tune step 3/3" in out and "held-out loss: unpruned" in out and ", finetuned " in out
    assert load_model(tmp_path / "h50ft").cfg.n_heads == 2


# The short fine-tune after pruning (--finetune-steps): it recovers loss, and pruned zeros stay zero.


def _markov_tokens(n=6000, seed=0):
    """A text the tiny model can learn in a few dozen steps: each of 20 symbols has 2 likely successors."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, 20, (20, 2))
    tokens = [0]
    for _ in range(n - 1):
        tokens.append(int(successors[tokens[-1], rng.integers(0, 2)]) if rng.random() < 0.9 else int(rng.integers(20)))
    return np.array(tokens)


@contextlib.contextmanager
def one_thread():
    """Tiny models train ~50x faster on one thread than on two spinning against other jobs (measured: 3 s
    against 190 s for 40 steps on the loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    from dozero.compress.distill import DistillConfig, distill

    model, tokens = _tiny("llama-char"), _markov_tokens()
    with one_thread():
        distill(model, None, tokens, DistillConfig(steps=40, batch_size=8, context_length=64, alpha=0.0, lr=3e-3))
    return model, tokens


@pytest.mark.parametrize("method", ["magnitude", "neurons"])
def test_finetune_after_pruning_lowers_the_held_out_loss(trained, method):
    """A model trained on a bigram text (measured: held-out loss 1.21; uniform 4.17), pruned to 90%: 1.50
    (magnitude) or 1.61 (neurons); 20 fine-tune steps bring it back to 1.20 / 1.21. (Heads barely matter to a
    bigram text: 1.211 -> 1.211 at 50%; their pruning is checked above.)"""
    import copy

    from dozero.compress.prune import finetune

    original, tokens = trained
    config = PruneConfig(method=method, sparsity=0.9, finetune_steps=20, finetune_lr=2e-3)
    pruned = prune(copy.deepcopy(original), config, torch.from_numpy(tokens[:512]))
    zeros = sparsity_of(pruned)
    with one_thread():
        losses = finetune(pruned, original, tokens, config)
    assert losses["unpruned"] < 1.3 and losses["pruned"] > losses["unpruned"] + 0.2
    assert losses["finetuned"] < losses["pruned"] - 0.2
    assert sparsity_of(pruned) == zeros  # magnitude's zeros are still exactly zero (neurons: none to keep)


# Pruned heads in Hugging Face and GGUF files, there and back: tests/test_pruned_roundtrip.py.
