"""A model whose attention heads were pruned (compress/prune.py: n_heads * head_size < emb_dim) leaves dozero
and comes back: Hugging Face Llama folders carry the width as `head_dim`, GGUF files as llama.cpp's
`attention.key_length`; transformers and llama.cpp read the same files with the same logits. GPT-2 has no
field for it: export refuses in one line. Inconsistent metadata is one line too."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from dozero.cli import main
from dozero.compress.prune import PruneConfig, prune
from dozero.config import get_model_config
from dozero.errors import DozeroError
from dozero.model import gguf as gguf_export
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer.bpe import BPETokenizer

X = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(4))


def _pruned(preset="llama-char"):
    """A tiny model (4 heads of 32) with every weight off its initial value, pruned to 2 heads of 32."""
    torch.manual_seed(0)
    model = GPTModel(get_model_config(preset, vocab_size=258)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    calibration = torch.randint(0, 258, (200,), generator=torch.Generator().manual_seed(1))
    small = prune(model, PruneConfig(method="heads", sparsity=0.5), calibration)
    assert (small.cfg.n_heads, small.cfg.head_dim, small.cfg.emb_dim) == (2, 32, 128)
    return small


def _tokenizer():
    """256 bytes, one merge (a GGUF tokenizer needs at least one) and <|endoftext|>: the model's 258 ids."""
    ranks = {bytes([b]): b for b in range(256)} | {b"th": 256}
    return BPETokenizer(ranks, {"<|endoftext|>": 257}, name="small")


def _logits(model, x=X):
    with torch.no_grad():
        return model(x)


def test_hugging_face_round_trip_and_transformers(tmp_path):
    """Export, import with dozero: the same logits; transformers reads the folder: the same logits."""
    transformers = pytest.importorskip("transformers")
    small = _pruned()
    save_model(small, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["head_dim"], config["num_attention_heads"], config["hidden_size"]) == (32, 2, 128)
    back = load_model(tmp_path / "hf")
    assert (back.cfg.n_heads, back.cfg.head_size) == (2, 32)
    torch.testing.assert_close(_logits(back), _logits(small), atol=1e-5, rtol=0)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(small), theirs(X).logits, atol=1e-4, rtol=0)


def test_gguf_round_trip_and_llama_cpp(tmp_path):
    """`dozero model convert` to GGUF (f32) and back: the same logits; llama.cpp (where installed) runs the
    file with the same greedy choice at every position."""
    small = _pruned()
    save_model(small, tmp_path / "m", tokenizer=_tokenizer())
    assert (
        main(["model", "convert", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--to", "gguf", "--type", "f32"]) == 0
    )
    back = load_model(tmp_path / "m.gguf")
    assert (back.cfg.n_heads, back.cfg.kv_heads, back.cfg.head_size) == (2, 2, 32)
    torch.testing.assert_close(_logits(back), _logits(small), atol=1e-5, rtol=0)
    assert main(["model", "convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    torch.testing.assert_close(_logits(load_model(tmp_path / "hf")), _logits(small), atol=1e-5, rtol=0)
    if importlib.util.find_spec("llama_cpp") is None:
        return
    import llama_cpp

    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        ids = X[0].tolist()
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    ours = _logits(small, X[:1])[0]
    assert (ours - theirs).abs().max().item() < 2e-3 * ours.abs().max().item()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attention.value_length": 16}, r"key_length = 32 but value_length = 16; dozero's attention heads"),
        ({"attention.key_length": 31, "attention.value_length": 31}, r"key_length = 31; RoPE needs an even"),
        (
            {"attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16},
            r"tensor 'blk.0.attn_q.weight' has shape \(64, 128\) but the metadata implies \(32, 128\)",
        ),
    ],
)
def test_gguf_head_width_that_disagrees_is_one_line(tmp_path, monkeypatch, changes, message):
    writes = gguf_export._gguf_metadata
    monkeypatch.setattr(gguf_export, "_gguf_metadata", lambda config: (writes(config)[0], writes(config)[1] | changes))
    path = gguf_export.save_gguf(_pruned(), tmp_path / "m.gguf", _tokenizer(), "f32")
    with pytest.raises(DozeroError, match=message):
        load_model(path)


@pytest.mark.parametrize(
    "head_dim, message",
    [
        (16, r"'trf_blocks.0.att.qkv.weight' has shape \(192, 128\) but the config needs \(96, 128\)"),
        (33, r"head_dim must be an even whole number >= 2 \(RoPE rotates pairs\), got 33"),
        ("32", r"head_dim must be an even whole number >= 2 \(RoPE rotates pairs\), got '32'"),
    ],
)
def test_hugging_face_head_dim_that_disagrees_is_one_line(tmp_path, head_dim, message):
    save_model(_pruned(), tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"head_dim": head_dim}))
    with pytest.raises(DozeroError, match=message):
        load_model(tmp_path / "hf")


def test_gpt2_has_no_shape_for_pruned_heads(tmp_path):
    """GPT2Config and GGUF's gpt2 take the head width as n_embd / n_head: both exports refuse, nothing written."""
    small = _pruned("shakespeare-char")
    with pytest.raises(DozeroError, match="GPT-2 has no shape for pruned heads"):
        save_model(small, tmp_path / "g", format="hf")
    assert not (tmp_path / "g" / "model.safetensors").exists()
    with pytest.raises(DozeroError, match="GPT-2 has no shape for pruned heads"):
        gguf_export.save_gguf(small, tmp_path / "g.gguf", _tokenizer(), "f32")
    assert not (tmp_path / "g.gguf").exists()
