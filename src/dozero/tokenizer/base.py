"""The one tokenizer interface that data, training and generation use without caring which kind they hold.

    tok = load_tokenizer("gpt2")           # or a model folder, or CharTokenizer.from_text(text)
    ids = tok.encode("Hello world")        # [15496, 995]
    tok.decode(ids)                        # "Hello world"

Two kinds implement it: `BPETokenizer` (byte-level BPE, `bpe.py`) and `CharTokenizer` (`char.py`).

Special tokens (`<|endoftext|>` and user-defined ones) are never split silently. `encode(text, special=...)`
decides what happens when their *text* appears inside ordinary input:
  "raise" (default)  DozeroError: the text may be an accident (a web page quoting "<|endoftext|>").
  "text"             encode it as ordinary text, e.g. "<|endoftext|>" -> "<", "|", "endoftext", "|", ">".
  "allow"            encode it as the special token's id.
This follows tiktoken's default (`disallowed_special="all"`), which dozero's fast path uses.
"""

from __future__ import annotations

import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from dozero.errors import DozeroError

SPECIAL_MODES = ("raise", "text", "allow")
ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILE = "dozero_tokenizer.json"  # dozero's own tokenizer description inside a model folder
# What a tokenizer folder may hold: dozero's files and the exported formats (`--export`, `tokenizer export`).
# `tokenizer train` replaces a folder of only these; `model convert` copies them along.
TOKENIZER_FOLDER_FILES = (TOKENIZER_FILE, "dozero_tokenizer.tiktoken", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.tiktoken",
                          "tiktoken_config.json")  # fmt: skip


def check_special_mode(special: str) -> None:
    if special not in SPECIAL_MODES:
        raise DozeroError(f"special={special!r} is not one of {', '.join(SPECIAL_MODES)}")


def as_id_list(ids: Iterable[int]) -> list[int]:
    """A list of plain ints from any sequence of whole numbers (numpy ints, 0-d tensors included)."""
    ids = ids if isinstance(ids, list) else list(ids)
    if all(type(i) is int for i in ids):  # the common case, checked fast
        return ids
    out = []
    for pos, i in enumerate(ids):
        try:
            if isinstance(i, bool):
                raise TypeError
            out.append(operator.index(i))
        except TypeError:
            nested = " (decode takes one sequence; for a batch, decode each row)" if isinstance(i, list | tuple) else ""
            raise DozeroError(
                f"token ids must be whole numbers, got {type(i).__name__} {i!r:.40} at position {pos}{nested}"
            ) from None
    return out


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind`, `vocab_size` and `eot_id`."""

    kind: str  # "bpe" or "char"
    vocab_size: int  # number of ids, specials included: valid ids are 0 .. vocab_size - 1
    eot_id: int | None  # id of <|endoftext|> (the document separator), None if the vocabulary has none

    @abstractmethod
    def encode(self, text: str, special: str = "raise") -> list[int]:
        """Token ids of `text`. `special`: what to do with special-token text in it (module docstring)."""

    def encode_batch(
        self, texts: Sequence[str], special: str = "raise", num_threads: int | None = None
    ) -> list[list[int]]:
        """`encode` for many documents; the BPE tokenizer spreads them over all CPU cores."""
        return [self.encode(t, special=special) for t in texts]

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes that `ids` stand for (a BPE token may hold part of a UTF-8 character)."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable hash of the vocabulary and special tokens: two tokenizers with equal fingerprints give equal ids."""

    @abstractmethod
    def save(self, folder: str | os.PathLike) -> None:
        """Write this tokenizer's files into `folder` (a model folder); `load_tokenizer(folder)` reads them back."""

    special_tokens: dict[str, int] = {}  # special-token text -> id (none for the character tokenizer)

    def special_id(self, token: str) -> int:
        """The id of special token `token` (e.g. "<|endoftext|>"); DozeroError if this tokenizer has no such token."""
        if token not in self.special_tokens:
            known = ", ".join(self.special_tokens) or "none"
            raise DozeroError(f"unknown special token {token!r}; this {self.kind} tokenizer's special tokens: {known}")
        return self.special_tokens[token]

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as a list of ints; DozeroError if one is not a whole number (a nested list: a batch given
        where one sequence belongs) or is outside 0 .. vocab_size - 1."""
        ids = as_id_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise DozeroError(
                f"token id {bad} is out of range for this {self.kind} tokenizer (valid ids: 0..{self.vocab_size - 1}); "
                "were these ids made with a different tokenizer?"
            )
        return ids

    def check_fits_model(self, model_vocab_size: int, model: str = "the model") -> None:
        """DozeroError unless every id this tokenizer produces has a row in the model's embedding
        (ids 0 .. vocab_size - 1 < model_vocab_size). Called wherever a model and a tokenizer meet
        (generation, the course's attention maps), so a mismatched pair fails at load, naming both
        sizes, instead of an IndexError deep in the embedding. A model with MORE rows is fine: GPT-2
        models are often padded to 50,304 (a multiple of 64) for speed; generation never samples them."""
        if self.vocab_size > model_vocab_size:
            raise DozeroError(
                f"the {self.kind} tokenizer has {self.vocab_size:,} tokens but {model} has only {model_vocab_size:,} "
                "(its vocab_size): they were not trained together; give the model's own tokenizer (--tokenizer)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"
