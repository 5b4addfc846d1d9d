"""Character-level tokenizer: one id per character, nanoGPT's `shakespeare_char` vocabulary.

    tok = CharTokenizer.from_text(open("tinyshakespeare.txt").read())
    tok.vocab_size                    # 65: the sorted set of characters in the file
    tok.encode("hi")                  # [46, 47]

The vocabulary is `sorted(set(text))`, as in nanoGPT's `data/shakespeare_char/prepare.py`, so ids match
nanoGPT's. It has no special tokens (`eot_id` is None): the classic demo trains on one long text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from dozero.errors import DozeroError
from dozero.files import atomic_write
from dozero.tokenizer.base import TOKENIZER_FILE, Tokenizer, check_special_mode


class CharTokenizer(Tokenizer):
    kind = "char"
    eot_id = None

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        if not self.chars:
            raise DozeroError("a character tokenizer needs at least one character; was the text empty?")
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise DozeroError("a character vocabulary must be a list of distinct single characters")
        self.vocab_size = len(self.chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of `text`: its distinct characters in sorted (code point) order."""
        if not text:
            raise DozeroError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str, special: str = "raise") -> list[int]:
        check_special_mode(special)  # no special tokens here, so every mode reads the text as text
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in stoi)
            raise DozeroError(
                f"character {text[pos]!r} at position {pos} is not in this character vocabulary "
                f"({self.vocab_size} characters, built from the training text); use only characters seen in training, "
                "or train with a BPE tokenizer (dozero train --tokenizer gpt2), which reads any text"
            ) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        ids = self.check_ids(ids)
        chars = self.chars
        return "".join(chars[i] for i in ids)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({"kind": "char", "chars": self.chars}).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"format": "dozero-tokenizer", "version": 1, "kind": "char", "chars": self.chars}

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write(Path(folder) / TOKENIZER_FILE, json.dumps(self.to_dict(), ensure_ascii=False, indent=1))
