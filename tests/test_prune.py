"""Pruning (compress/prune.py): exact sparsity, Wanda's activation-aware choice, narrower feed-forward
layers that save/load and compute what the kept neurons computed, bad input, the CLI."""

from __future__ import annotations

import pytest
import torch

from dozero.cli import main
from dozero.compress.prune import PruneConfig, block_linears, lowest, prune, sparsity_of
from dozero.config import get_model_config
from dozero.errors import DozeroError
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel


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
    settings = ["fp32", "int8", "int4-g32", "int8-fbgemm-smooth", "wanda-50%", "neurons-25%"]
    flags = ["--calibration", str(text), "--max-tokens", "200", "--new-tokens", "4", "--tasks", str(task)]
    assert main([*args, *flags, "--limit", "3", "--settings", *settings]) == 0
    rows = {r["setting"]: r for r in json.loads((tmp_path / "r" / "report.json").read_text())["rows"]}
    assert list(rows) == settings
    assert rows["int8"]["weights_mb"] < rows["fp32"]["weights_mb"] / 3  # int8 + fp16 scales, fp32 norms
    assert rows["int4-g32"]["weights_mb"] < rows["int8"]["weights_mb"]
    assert rows["neurons-25%"]["weights_mb"] < rows["fp32"]["weights_mb"] == rows["wanda-50%"]["weights_mb"]
    assert all(r["perplexity"] > 1 and r["tokens_per_second"] > 0 for r in rows.values())
    assert all(r["weights_mb"] < r["disk_mb"] < r["weights_mb"] + 0.1 for r in rows.values())  # + config, vocab
    assert all(r["peak_memory_mb"] > r["weights_mb"] for r in rows.values())  # a fresh process each
    assert all(list(r["tasks"]) == ["quiz"] and 0 <= r["tasks"]["quiz"] <= 1 for r in rows.values())
    assert (tmp_path / "r" / "quality_vs_size.png").stat().st_size > 1000
    assert "| int8 |" in (tmp_path / "r" / "report.md").read_text()
    assert main([*args, "--settings", "int3"]) == 2
    assert "unknown setting 'int3'" in capsys.readouterr().err
