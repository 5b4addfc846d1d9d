"""GPT-2's tokenizer in dozero gives tiktoken's ids, exactly; the pure-Python reference agrees; the character
tokenizer reproduces nanoGPT's vocabulary; bad input gets one clear error."""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import pytest
import regex

from dozero.errors import DozeroError
from dozero.tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from dozero.tokenizer.bpe import bpe_merge, bytes_to_unicode

EDGE_CASES = [
    "",
    "Hello world",
    "Olá, coração! A ação é rápida; não há açúcar. Você já ouviu falar de pão de queijo?",
    "emoji 🎉🚀👩‍👩‍👧‍👦 and flags 🇧🇷 ❤️",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "spaces:  two   three    four     end     ",
    "\n\n\nnewlines\n\n  \n\t\ttabs\r\n windows\r\n",
    "   leading and trailing   ",
    "It's we'll they've I'm you'd she's THEY'LL 'quoted' don't",
    "digits 0 12 345 6789 3.14159 1,000,000 2026-11-22 0x1F",
    "a<|endoftext|>b",
    "<|endoftext|>",
    "mixed\u00a0nbsp and zero\u200bwidth and combining e\u0301",
    "x" * 1000,  # the reference encoder is quadratic in a chunk's length
    " " * 300 + "\n" * 50,
    "def f(x):\n    return {'a': [1, 2]}  # comment\n",
]


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizer:
    return load_tokenizer("gpt2")


@functools.cache
def _stdlib_sources() -> tuple[str, ...]:
    """Every UTF-8 `.py` file of the Python standard library, tests included (about 30 MB), sorted by path.
    The few files in other encodings (Latin-1 test data) are left out: GPT-2's BPE takes text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.relative_to(root).parts:
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return tuple(texts)


def test_interface(gpt2):
    assert isinstance(gpt2, Tokenizer)
    assert (gpt2.kind, gpt2.vocab_size, gpt2.eot_id) == ("bpe", 50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]  # shared/data/README.md
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.special_id(ENDOFTEXT) == 50256
    assert len(gpt2.fingerprint()) == 16
    # stable across loads: a tokenizer rebuilt from the same ranks has the same fingerprint (load_tokenizer caches)
    assert BPETokenizer(gpt2.ranks, gpt2.special_tokens).fingerprint() == gpt2.fingerprint()


def test_parity_with_tiktoken_on_shared_data(gpt2, tiktoken_gpt2, shared_data):
    files = [shared_data / "tinyshakespeare.txt", *sorted((shared_data / "shakespeare").glob("*.txt"))]
    assert len(files) == 43
    texts = [f.read_text(encoding="utf-8") for f in files]
    ours = gpt2.encode_batch(texts)
    theirs = tiktoken_gpt2.encode_ordinary_batch(list(texts))
    for f, text, a, b in zip(files, texts, ours, theirs, strict=True):
        assert a == b, f.name
        assert gpt2.decode(a) == text, f.name
    assert len(ours[0]) == 338025  # tinyshakespeare.txt in GPT-2 tokens (a number others quote: ~338k)


@pytest.mark.slow
def test_parity_with_tiktoken_on_stdlib_source(gpt2, tiktoken_gpt2):
    texts = _stdlib_sources()
    assert sum(map(len, texts)) >= 20_000_000 and len(texts) > 1000
    ours = gpt2.encode_batch(list(texts), special="text")
    theirs = tiktoken_gpt2.encode_ordinary_batch(list(texts))
    assert ours == theirs
    assert all(gpt2.decode(ids) == text for ids, text in zip(ours, texts, strict=True))


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_tiktoken_and_round_trip(gpt2, tiktoken_gpt2, text):
    for special in ("text", "allow"):
        ours = gpt2.encode(text, special=special)
        if special == "text":
            assert ours == tiktoken_gpt2.encode_ordinary(text)
        else:
            assert ours == tiktoken_gpt2.encode(text, allowed_special="all")
        assert gpt2.encode_reference(text, special=special) == ours
        assert gpt2.decode(ours) == text
        assert gpt2.decode_reference(ours) == text


def test_hand_checked_ids(gpt2):
    # contractions are their own chunks; a space sticks to the word after it; a run of spaces keeps its last
    # space for the next word (the (?!\S) in the pattern)
    assert [gpt2.decode([i]) for i in gpt2.encode("It's we'll")] == ["It", "'s", " we", "'ll"]
    assert regex.findall(GPT2_PATTERN, "a   b") == ["a", "  ", " b"]
    assert [gpt2.decode([i]) for i in gpt2.encode("a   b")] == ["a", " ", " ", " b"]  # GPT-2 has no "  " token
    assert gpt2.encode("") == []
    assert gpt2.encode("<|endoftext|>", special="allow") == [50256]
    assert gpt2.encode("<|endoftext|>", special="text") == [27, 91, 437, 1659, 5239, 91, 29]


def test_reference_equals_fast_path_on_a_large_sample(gpt2, shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    code = "".join(_stdlib_sources())[:200_000]
    for sample in (text, code):
        assert gpt2.encode_reference(sample, special="text") == gpt2.encode(sample, special="text")


def test_bpe_merge_and_byte_map():
    byte_map = bytes_to_unicode()
    assert len(set(byte_map.values())) == 256
    assert (byte_map[ord(" ")], byte_map[ord("\n")], byte_map[ord("A")]) == ("Ġ", "Ċ", "A")
    # ranks: "ab" merges before "bc", so "abc" -> [ab, c]; "aaa" merges the leftmost pair first
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"bc": 257, b"aa": 258}
    assert bpe_merge(b"abc", ranks) == [256, ord("c")]
    assert bpe_merge(b"aaa", ranks) == [258, ord("a")]


def test_special_token_text_is_never_silently_split(gpt2):
    with pytest.raises(DozeroError, match=r"contains the special token '<\|endoftext\|>' at character 1; pass "):
        gpt2.encode("a<|endoftext|>b")
    with pytest.raises(DozeroError, match="contains the special token"):
        gpt2.encode_reference("a<|endoftext|>b")
    with pytest.raises(DozeroError, match="contains the special token"):
        gpt2.encode_batch(["fine", "a<|endoftext|>b"])
    with pytest.raises(DozeroError, match="special='maybe' is not one of raise, text, allow"):
        gpt2.encode("x", special="maybe")
    assert gpt2.encode_batch(["a<|endoftext|>b"], special="allow") == [[64, 50256, 65]]


def test_decode_errors_and_unknown_special(gpt2):
    with pytest.raises(
        DozeroError, match=r"token id 50257 is out of range for this bpe tokenizer \(valid ids: 0..50256\)"
    ):
        gpt2.decode([1, 50257])
    with pytest.raises(DozeroError, match="token id -1 is out of range"):
        gpt2.decode_bytes([-1])
    with pytest.raises(DozeroError, match=r"unknown special token '<\|pad\|>'; this bpe tokenizer's special tokens: "):
        gpt2.special_id("<|pad|>")
    # a cut multi-byte character decodes to U+FFFD in text, exactly in bytes
    ids = gpt2.encode("🎉")
    assert len(ids) > 1 and gpt2.decode(ids[:1]).endswith("\ufffd")
    assert gpt2.decode_bytes(ids) == "🎉".encode()


def test_invalid_utf8_bytes_round_trip(gpt2):
    data = b"caf\xe9 au lait \xff\xfe and valid \xc3\xa9 " + "日本".encode()[:-1]
    ids = gpt2.encode_bytes(data)
    assert gpt2.decode_bytes(ids) == data
    # valid stretches encode as text; each invalid byte is one single-byte token (documented in encode_bytes)
    r = gpt2.ranks
    expected = gpt2.encode("caf") + [r[b"\xe9"]] + gpt2.encode(" au lait ") + [r[b"\xff"], r[b"\xfe"]]
    expected += gpt2.encode(" and valid é 日") + [r[b"\xe6"], r[b"\x9c"]]
    assert ids == expected
    assert gpt2.encode_bytes(b"Hello world") == [15496, 995]


def test_encode_batch_equals_one_by_one(gpt2):
    texts = [t for t in EDGE_CASES if ENDOFTEXT not in t] * 3
    assert gpt2.encode_batch(texts, num_threads=2) == [gpt2.encode(t) for t in texts]


def test_char_tokenizer_matches_nanogpt(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("char", 65, None)
    chars = sorted(set(text))  # nanoGPT data/shakespeare_char/prepare.py
    assert tok.chars == chars and tok.encode("hi") == [chars.index("h"), chars.index("i")] == [46, 47]
    ids = tok.encode(text)
    assert len(ids) == 1_115_394 and tok.decode(ids) == text
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.fingerprint() == tok.fingerprint()
    assert CharTokenizer.from_text("ab").fingerprint() != CharTokenizer.from_text("abc").fingerprint()


@pytest.mark.parametrize("make", ["gpt2", "char"])
def test_decode_takes_one_sequence_of_whole_numbers(gpt2, make):
    """A batch ([[1, 2]]) or text where ids belong is a one-line error, not a TypeError from deep inside;
    numpy ints and tensors (anything usable as an index) are ids."""
    import numpy as np
    import torch

    tok = gpt2 if make == "gpt2" else CharTokenizer.from_text("abcdef")
    with pytest.raises(DozeroError, match=r"got list \[1, 2\] at position 0 \(decode takes one sequence; for a batch"):
        tok.decode([[1, 2]])
    for bad, shown in [([0, 1.5], "float 1.5 at position 1"), (["a"], "str 'a' at position 0"), ([True], "bool")]:
        with pytest.raises(DozeroError, match=f"token ids must be whole numbers, got {regex.escape(shown)}"):
            tok.decode(bad)
    if make == "gpt2":
        with pytest.raises(DozeroError, match="at position 0 .decode takes one sequence"):
            tok.decode_reference([[1, 2]])
    assert tok.decode(np.array([1, 2])) == tok.decode(torch.tensor([1, 2])) == tok.decode((1, 2)) == tok.decode([1, 2])


def test_char_tokenizer_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DozeroError, match=r"character 'z' at position 2 is not in this character vocabulary"):
        tok.encode("abz")
    with pytest.raises(DozeroError, match=r"token id 3 is out of range for this char tokenizer \(valid ids: 0..2\)"):
        tok.decode([0, 3])
    with pytest.raises(DozeroError, match="cannot build a character vocabulary from empty text"):
        CharTokenizer.from_text("")
    with pytest.raises(DozeroError, match=r"unknown special token '<\|endoftext\|>'; .* special tokens: none"):
        tok.special_id(ENDOFTEXT)


def test_tokenizer_package_stays_light():
    # dependencies flow one way (config <- tokenizer <- data <- model): no torch, no later stage, no CLI
    import subprocess
    import sys

    code = (
        "import sys, dozero.tokenizer; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('dozero.data', 'dozero.model', "
        "'dozero.train', 'dozero.generate', 'dozero.cli'))]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
