"""`dozero model info|summary|convert` and every bad input's one-line message (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dozero.cli import main
from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel

SMALL = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, argv, *fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def small_folder(tmp_path):
    torch.manual_seed(0)
    return save_model(GPTModel(SMALL), tmp_path / "small")


def test_help_lists_model_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "model" in out and "VERB" in out
    code, out, _ = run(capsys, "model")  # a verb without an action prints its help
    assert code == 2 and all(action in out for action in ("info", "summary", "convert"))
    for action in ("info", "summary", "convert"):
        with pytest.raises(SystemExit):
            main(["model", action, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_info_gpt2(capsys):
    code, out, _ = run(capsys, "model", "info", "gpt2", "--batch-size", "2")
    assert code == 0
    assert "124,439,808" in out and "124.4M" in out
    assert "39,383,808" in out  # embeddings: 50257*768 + 1024*768
    assert "tied" in out and "AdamW states" in out and "bf16" in out and "batch 2 x 1024" in out


def test_info_and_summary_of_a_folder(capsys, small_folder):
    code, out, _ = run(capsys, "model", "info", str(small_folder), "--context-length", "8")
    assert code == 0 and f"{GPTModel(SMALL).num_parameters():,}" in out and "batch 1 x 8" in out
    code, out, _ = run(capsys, "model", "summary", str(small_folder), "--tokens", "5", "--batch-size", "3")
    assert code == 0
    assert "(3, 5, 96)" in out  # trf_blocks.0.att.qkv: (B, T, 3C)
    assert "(3, 4, 5, 8)" in out  # heads: (B, nh, T, hs)
    assert "(3, 5, 97)" in out  # logits


def test_convert_round_trip(capsys, small_folder, tmp_path):
    (small_folder / "vocab.json").write_text("{}")  # tokenizer files travel along
    code, out, _ = run(capsys, "model", "convert", str(small_folder), str(tmp_path / "hf"), "--to", "hf")
    assert code == 0 and "Hugging Face" in out
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "gpt2" and hf_config["n_embd"] == 32
    assert (tmp_path / "hf" / "vocab.json").is_file()
    code, out, _ = run(capsys, "model", "info", str(tmp_path / "hf"))  # a Hugging Face folder reads too
    assert code == 0 and f"{GPTModel(SMALL).num_parameters():,}" in out
    code, out, _ = run(capsys, "model", "convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "dozero")
    assert code == 0
    a, b = load_model(small_folder), load_model(tmp_path / "back")
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    assert_user_error(
        capsys, ["model", "convert", str(small_folder), str(tmp_path / "back"), "--to", "dozero"], "--force"
    )


def test_error_missing_folder(capsys, tmp_path):
    assert_user_error(capsys, ["model", "convert", str(tmp_path / "nope"), str(tmp_path / "o"), "--to", "hf"],
                      "not found", "nope")  # fmt: skip
    assert_user_error(capsys, ["model", "info", str(tmp_path) + "/nope"], "model folder", "not found")
    assert_user_error(capsys, ["model", "info", str(tmp_path)], "holds no model")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_error_bad_safetensors(capsys, small_folder, tmp_path, damage):
    weights = small_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13\x37" * 64)
    assert_user_error(capsys, ["model", "convert", str(small_folder), str(tmp_path / "o"), "--to", "hf"],
                      "model.safetensors", "truncated or corrupt")  # fmt: skip


def test_error_config_does_not_match_weights(capsys, small_folder, tmp_path):
    config = json.loads((small_folder / "config.json").read_text())
    config["model"]["emb_dim"] = 64
    (small_folder / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, ["model", "convert", str(small_folder), str(tmp_path / "o"), "--to", "hf"],
                      "tok_emb.weight", "(97, 32)", "(97, 64)", "does not match")  # fmt: skip


def test_error_hf_config_does_not_match_weights(capsys, small_folder, tmp_path):
    run(capsys, "model", "convert", str(small_folder), str(tmp_path / "hf"), "--to", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["vocab_size"] = 100
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, ["model", "convert", str(tmp_path / "hf"), str(tmp_path / "o"), "--to", "dozero"],
                      "does not match")  # fmt: skip


def test_error_heads_do_not_divide_width(capsys, small_folder):
    config = json.loads((small_folder / "config.json").read_text())
    config["model"]["n_heads"] = 5
    (small_folder / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, ["model", "info", str(small_folder)],
                      "config.json", "emb_dim (32) must be divisible by n_heads (5)", "try n_heads=4")  # fmt: skip


def test_error_unknown_preset_suggests(capsys):
    assert_user_error(capsys, ["model", "info", "gpt2-medum"], "unknown model preset 'gpt2-medum'",
                      "did you mean 'gpt2-medium'?")  # fmt: skip
    assert_user_error(capsys, ["model", "summary", "shakespeare"], "did you mean 'shakespeare-char'?")


def test_error_bad_numbers(capsys):
    assert_user_error(capsys, ["model", "info", "gpt2", "--batch-size", "0"], "--batch-size must be >= 1")
    assert_user_error(capsys, ["model", "summary", "gpt2", "--tokens", "2048"], "exceeds the context length 1024")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(DozeroError):
        main(["--debug", "model", "info", str(tmp_path / "nope")])


def test_model_commands_do_not_import_torch():
    """`dozero --help` stays fast: torch is imported inside the commands that need it."""
    code = "import sys, dozero.model.commands; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
