"""Exports that work in the other tools, checked with the real libraries: `dozero model convert --to hf`
gives a folder that transformers' AutoTokenizer, `pipeline` and `generate` use exactly as dozero does
(ids, end token, context length), for a character model too; the tiktoken export loads from its own
files."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dozero.cli import main  # noqa: E402
from dozero.config import ModelConfig  # noqa: E402
from dozero.generate import generate  # noqa: E402
from dozero.generate.engine import GenerationConfig, generate_ids  # noqa: E402
from dozero.model.checkpoint import save_model  # noqa: E402
from dozero.model.gpt import GPTModel  # noqa: E402
from dozero.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer, export_tokenizer, load_tokenizer  # noqa: E402
from dozero.tokenizer.exports import TIKTOKEN_SNIPPET  # noqa: E402

transformers.logging.set_verbosity_error()

SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\t(Exeunt.)  "
# Text made of SHAKESPEARE's characters only: runs of spaces, newlines, punctuation, a tab.
CHAR_TEXTS = ["All:\nSpeak, speak.", "  we   proceed\n\n\nany", "(hear) me, First Citizen!"[:-1], "\t.\n ,", "a"]
BPE_TEXTS = [
    "Hello, world! It's 2024.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Olá, coração! naïve café — 日本語 🎉",
    f"one document{ENDOFTEXT}the next",
    f"{ENDOFTEXT}{ENDOFTEXT}<|pad|> x<|pad|>",
    "don't won't I'm you've 123456 3.14",
]


def tiny_model(vocab_size: int, seed: int = 0, **config) -> GPTModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, context_length=64, emb_dim=32, n_heads=4, n_layers=2, **config)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # peaked distributions: greedy decoding has no near-ties between the two libraries
        for p in model.parameters():
            p.mul_(4.0)
    return model


def convert_to_hf(tmp_path, model, tokenizer, capsys) -> str:
    src = save_model(model, tmp_path / "dozero", tokenizer=tokenizer)
    assert main(["model", "convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0, capsys.readouterr()
    capsys.readouterr()
    return str(tmp_path / "hf")


def byte_tokenizer() -> BPETokenizer:
    """A custom vocabulary: the 256 bytes, <|endoftext|> = 256 (not GPT-2's 50256)."""
    return BPETokenizer({bytes([b]): b for b in range(256)}, {ENDOFTEXT: 256}, name="bytes")


def test_char_model_works_in_transformers(tmp_path, capsys):
    """Before: no tokenizer.json for a character model, so AutoTokenizer gave an empty tokenizer and
    `pipeline` failed. Now: dozero's ids, exact round trips, and the same greedy text."""
    from transformers import AutoTokenizer, pipeline

    tokenizer = CharTokenizer.from_text(SHAKESPEARE)
    model = tiny_model(tokenizer.vocab_size)
    folder = convert_to_hf(tmp_path, model, tokenizer, capsys)
    hf = AutoTokenizer.from_pretrained(folder)
    assert len(hf) == tokenizer.vocab_size and hf.model_max_length == 64
    for text in CHAR_TEXTS + [SHAKESPEARE]:
        ids = tokenizer.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text
    assert load_tokenizer(f"{folder}/tokenizer.json").fingerprint() == tokenizer.fingerprint()  # and back

    generator = pipeline("text-generation", model=folder, device="cpu")
    for prompt in ["All:\n", "Before we"]:
        (out,) = generator(prompt, max_new_tokens=30, do_sample=False)
        assert out["generated_text"] == prompt + generate(model, tokenizer, prompt, max_new_tokens=30, temperature=0)


def test_custom_vocabulary_stops_at_its_end_token_in_transformers(tmp_path, capsys):
    """Before: config.json said eos_token_id null and there was no generation_config.json, so HF's
    generate ran past <|endoftext|> where dozero stops. The model is arranged (two head rows swapped) so
    that greedy decoding reaches <|endoftext|> after a few tokens."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = byte_tokenizer()
    eot = tokenizer.eot_id
    model = tiny_model(tokenizer.vocab_size, tie_weights=False)
    prompt = tokenizer.encode("Hello")
    (free,) = generate_ids_no_stop(model, prompt, 30)
    j = next(i for i in range(3, 30) if free[i] not in free[:i] and eot not in free[: i + 1])
    with torch.no_grad():  # the logits stay a permutation of the old ones: same tokens up to j, then eot
        head = model.out_head.weight
        head[[eot, free[j]]] = head[[free[j], eot]]
    (stopped,) = generate_ids(model, [prompt], GenerationConfig(temperature=0, max_new_tokens=30), eot)
    assert stopped == free[:j]  # dozero stops at <|endoftext|>, after j tokens
    expected = generate(model, tokenizer, "Hello", max_new_tokens=30, temperature=0)
    assert expected == tokenizer.decode(free[:j])

    folder = convert_to_hf(tmp_path, model, tokenizer, capsys)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == generation["eos_token_id"] == eot == 256
    hf_model = GPT2LMHeadModel.from_pretrained(folder).eval()
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=eot)
    assert out[0, len(prompt) :].tolist() == free[:j] + [eot]  # HF keeps the end token it stopped at

    hf = AutoTokenizer.from_pretrained(folder)  # tokenizer_config.json: end token and context length
    assert (hf.eos_token, hf.eos_token_id, hf.bos_token_id, hf.model_max_length) == (ENDOFTEXT, 256, 256, 64)
    assert hf.decode(out[0, len(prompt) :], skip_special_tokens=True) == expected


def generate_ids_no_stop(model, prompt: list[int], n: int) -> list[list[int]]:
    return generate_ids(model, [prompt], GenerationConfig(temperature=0, max_new_tokens=n, stop_at_eot=False))


def test_gpt2_vocabulary_export_has_the_tokenizer_config(tmp_path, capsys):
    from transformers import AutoTokenizer

    gpt2 = load_tokenizer("gpt2")
    folder = convert_to_hf(tmp_path, tiny_model(gpt2.vocab_size), gpt2, capsys)
    hf = AutoTokenizer.from_pretrained(folder)
    assert (hf.eos_token_id, hf.model_max_length) == (50256, 64)
    for text in BPE_TEXTS[:4]:
        assert hf.encode(text) == gpt2.encode(text, special="allow")
        assert hf.decode(gpt2.encode(text, special="allow")) == text


def test_save_model_hf_from_python_writes_the_tokenizer_files(tmp_path):
    """Before: save_model(format="hf", tokenizer=...) wrote only dozero_tokenizer.json, so AutoTokenizer
    could not read the folder (only `model convert` wrote tokenizer.json). Now both give the same files."""
    from transformers import AutoTokenizer

    tokenizer = byte_tokenizer()
    folder = save_model(tiny_model(tokenizer.vocab_size), tmp_path / "hf", tokenizer=tokenizer, format="hf")
    hf = AutoTokenizer.from_pretrained(folder)
    assert (len(hf), hf.eos_token_id, hf.model_max_length) == (257, 256, 64)
    for text in BPE_TEXTS[:4]:
        assert hf.encode(text) == tokenizer.encode(text, special="allow")
        assert hf.decode(tokenizer.encode(text, special="allow")) == text


@pytest.fixture(scope="module")
def trained_with_two_specials(shared_data):
    from dozero.tokenizer.train import train_bpe

    tok, _ = train_bpe([str(shared_data / "tinyshakespeare.txt")], 600, [ENDOFTEXT, "<|pad|>"], name="tiny")
    return tok


def test_tiktoken_export_loads_from_its_own_files(trained_with_two_specials, tmp_path):
    """Before: only the ranks were written, and a user had to know the pattern and the special tokens.
    Now the documented snippet, run as written on the exported folder alone, gives dozero's ids."""
    tok = trained_with_two_specials
    paths = export_tokenizer(tok, tmp_path / "tk", "tiktoken")
    assert sorted(p.name for p in paths) == ["tiktoken_config.json", "tokenizer.tiktoken"]
    config = json.loads((tmp_path / "tk" / "tiktoken_config.json").read_text())
    assert config["how_to_load"] == TIKTOKEN_SNIPPET.splitlines()
    scope: dict = {}
    exec(TIKTOKEN_SNIPPET.replace("path/to/the/exported/folder", str(tmp_path / "tk")), scope)
    enc = scope["enc"]
    assert enc.n_vocab == tok.vocab_size and enc.eot_token == tok.eot_id
    for text in BPE_TEXTS:
        assert enc.encode(text, allowed_special="all") == tok.encode(text, special="allow")
        assert enc.encode_ordinary(text) == tok.encode(text, special="text")


def test_char_tokenizer_export_formats(tmp_path):
    tok = CharTokenizer.from_text("ab\n")
    names = sorted(p.name for p in export_tokenizer(tok, tmp_path, "hf"))
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(tmp_path).fingerprint() == tok.fingerprint()
    from dozero.errors import DozeroError

    with pytest.raises(DozeroError, match="a char tokenizer cannot be written as 'tiktoken'.*formats for it: hf"):
        export_tokenizer(tok, tmp_path, "tiktoken")
