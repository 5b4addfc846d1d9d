"""GGUF vocabularies without merges (dozero.tokenizer.gguf): a byte-level BPE of single bytes and special
tokens is written with an empty tokenizer.ggml.merges (gguf-py's writer used to drop the key, and the file
then read back nowhere: dozero called it incomplete, llama.cpp "cannot find tokenizer merges"), reads back
with the same ids, and llama.cpp gives the same ids; a character tokenizer is refused in one line."""

from __future__ import annotations

import importlib.util
import os

import pytest

from dozero.errors import DozeroError
from dozero.tokenizer.bpe import BPETokenizer
from dozero.tokenizer.char import CharTokenizer
from dozero.tokenizer.gguf import (
    add_metadata,
    gguf_writer,
    read_gguf_header,
    read_gguf_tokenizer,
    tokenizer_metadata,
    write_gguf_tokenizer,
)

gguf = pytest.importorskip("gguf")

# Accents, CJK, emoji, code, whitespace runs, the end token in running text.
TEXTS = [
    "Olá, coração! A ação começa às 10h30.",
    "emoji 🎉🇧🇷 中文 日本語",
    "def f(x):\n    return x**2\n\n\n",
    "one<|endoftext|>two  \t end",
    "",
]


def bytes_only() -> BPETokenizer:
    """No merges: 256 single bytes and two special tokens."""
    return BPETokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256, "<|pad|>": 257}, name="bytes")


def write(path, arch: str, metadata: dict):
    writer = gguf_writer(path, arch)
    add_metadata(writer, metadata)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_vocabulary_without_merges_reads_back_with_the_same_ids(tmp_path):
    tok = bytes_only()
    write_gguf_tokenizer(tok, tmp_path / "tokenizer.gguf")
    assert read_gguf_header(tmp_path / "tokenizer.gguf").metadata["tokenizer.ggml.merges"] == []  # kept, empty
    back = read_gguf_tokenizer(tmp_path / "tokenizer.gguf")
    assert back.vocab_size == 258 and back.fingerprint() == tok.fingerprint() and back.eot_id == 256
    for text in TEXTS:
        ids = tok.encode(text, special="allow")
        assert back.encode(text, special="allow") == ids and back.decode(ids) == text, text
    assert len(tok.encode("ção")) == len("ção".encode())  # one id per byte: nothing merged


def test_a_file_without_the_merges_key_reads_when_nothing_needs_merging(tmp_path):
    """Files written by gguf-py's own writer (convert scripts) lack the key for an empty list."""
    meta = tokenizer_metadata(bytes_only())
    del meta["tokenizer.ggml.merges"]
    back = read_gguf_tokenizer(write(tmp_path / "v.gguf", "vocab", meta))
    assert back.encode(TEXTS[0]) == list(TEXTS[0].encode())

    two = BPETokenizer({bytes([b]): b for b in range(256)} | {b"th": 256}, {"<|endoftext|>": 257}, name="th")
    meta = tokenizer_metadata(two)
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(DozeroError, match="tokens longer than one byte but no tokenizer.ggml.merges; the file is"):
        read_gguf_tokenizer(write(tmp_path / "th.gguf", "vocab", meta))


def test_llama_cpp_reads_an_empty_merges_list_and_gives_the_same_ids(tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("llama_cpp is not installed in CI (make setup installs it)")
        pytest.skip("llama_cpp not installed (make setup installs it)")
    import llama_cpp

    tok = bytes_only()
    shape = {"context_length": 64, "embedding_length": 32, "block_count": 1, "feed_forward_length": 128}
    shape |= {"attention.head_count": 2, "attention.layer_norm_epsilon": 1e-5}
    path = write(tmp_path / "v.gguf", "gpt2", {f"gpt2.{k}": v for k, v in shape.items()} | tokenizer_metadata(tok))
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS[:-1]:
            ours = read_gguf_tokenizer(path).encode(text, special="allow")
            assert vocab.tokenize(text.encode(), add_bos=False, special=True) == ours, text
            assert vocab.detokenize(ours, special=True).decode() == text
    finally:
        vocab.close()


def test_a_character_tokenizer_is_refused_saying_what_to_do():
    """A character tokenizer has no byte-level BPE to store in GGUF: one line, with the way out."""
    with pytest.raises(DozeroError, match=r"this tokenizer is 'char', .* convert --to hf instead"):
        tokenizer_metadata(CharTokenizer("abc"))


def test_a_model_export_with_a_byte_vocabulary_reads_back_with_the_same_ids(tmp_path):
    """`model convert --to gguf` of a model whose tokenizer has no merges: the tokenizer in the file reads back."""
    from dozero.config import ModelConfig
    from dozero.model.gguf import save_gguf
    from dozero.model.gpt import GPTModel

    tok = bytes_only()
    model = GPTModel(ModelConfig(vocab_size=258, context_length=16, emb_dim=32, n_heads=2, n_layers=1))
    path = save_gguf(model, tmp_path / "m.gguf", tok, "f32")
    back = read_gguf_tokenizer(path)
    for text in TEXTS:
        assert back.encode(text, special="allow") == tok.encode(text, special="allow"), text
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp loads the model file's vocabulary too
        import llama_cpp

        vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        try:
            for text in TEXTS[:-1]:
                assert vocab.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, special="allow")
        finally:
            vocab.close()
