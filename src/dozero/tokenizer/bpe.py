"""Byte-level BPE as GPT-2 defines it: a readable reference encoder, and the same tokenizer run by tiktoken.

    tok = load_tokenizer("gpt2")              # a BPETokenizer
    tok.encode("Hello world")                 # [15496, 995]   (tiktoken, Rust, all cores for batches)
    tok.encode_reference("Hello world")       # [15496, 995]   (the pure-Python algorithm below)

How GPT-2 turns text into ids (Radford et al. 2019, section 2.2; openai/gpt-2 `src/encoder.py`):
  1. Pre-tokenize: a regex cuts the text into chunks (words with their leading space, numbers, punctuation
     runs, whitespace runs), so merges never cross a word boundary ("dog." and "dog!" share "dog").
  2. Each chunk becomes its UTF-8 bytes; every one of the 256 byte values is a token, so any text is encodable.
  3. Merge: repeatedly join the adjacent pair whose joined bytes have the lowest rank (= earliest learned
     merge), until no adjacent pair is in the vocabulary. The ranks *are* the token ids.
Special tokens (`<|endoftext|>`) are not made of merges; they are cut out of the text before step 1, and only
when the caller allows it (see `dozero.tokenizer.base`).

A tokenizer is fully described by (ranks, special tokens, pattern); `tiktoken.Encoding` takes exactly those,
so the fast path is the same tokenizer, not an approximation (tests/test_tokenizer.py proves equal ids).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import regex

from dozero.errors import DozeroError
from dozero.tokenizer.base import ENDOFTEXT, Tokenizer, check_special_mode

# GPT-2's pre-tokenization pattern as tiktoken writes it (tiktoken_ext/openai_public.py, r50k_pat_str). It cuts
# text exactly like openai/gpt-2's original
#   r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# (tiktoken ships it as GPT-2's); the possessive `++` only stops useless backtracking. Read it as:
#   's 't 're 've 'm 'll 'd  |  optional space + letters  |  optional space + digits  |  optional space + other
#   symbols  |  trailing whitespace  |  whitespace not followed by a non-space (so " word" keeps its space)  |  \s
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (openai/gpt-2 `encoder.py`).

    Why: vocab.json / merges.txt are text files, and a token like b" \\n" must be written without spaces or
    control characters. Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...)
    map to U+0100, U+0101, ... in byte order. So b" " becomes "Ġ" (U+0120) and b"\\n" becomes "Ċ" (U+010A).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Reference BPE on one pre-tokenized chunk: start from single bytes, join the lowest-ranked pair, repeat.

    Ties (the same pair twice in a chunk) go to the leftmost occurrence, as in tiktoken. Quadratic in the chunk
    length, which is fine for words; `BPETokenizer.encode` (tiktoken) is the fast path.
    """
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_index = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, i
        if best_rank is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return [ranks[p] for p in parts]


class BPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary: `ranks` (token bytes -> id), `special_tokens` (text -> id), `pattern`.

    Ids must be contiguous (0 .. vocab_size - 1) and all 256 single bytes must be tokens, so that every input
    is encodable and every id decodable.
    """

    kind = "bpe"

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "dozero-bpe",
    ):
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self.name = name
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise DozeroError(
                f"BPE vocabulary {name!r} lacks {len(missing)} of the 256 single-byte tokens (e.g. byte "
                f"{missing[0]}); byte-level BPE needs all of them"
            )
        ids = sorted(list(self.ranks.values()) + list(self.special_tokens.values()))
        if ids != list(range(len(ids))):
            raise DozeroError(f"BPE vocabulary {name!r} has duplicate or missing ids; ids must be 0..n-1, each once")
        self.vocab_size = len(ids)
        self.eot_id = self.special_tokens.get(ENDOFTEXT)
        # id -> bytes, for the reference decoder and for `token_bytes`
        self.id_to_bytes: list[bytes] = [b""] * self.vocab_size
        for token, i in self.ranks.items():
            self.id_to_bytes[i] = token
        for text, i in self.special_tokens.items():
            self.id_to_bytes[i] = text.encode("utf-8")
        self._chunk_cache: dict[str, list[int]] = {}

    # ----- the fast path: the same (ranks, pattern, specials) handed to tiktoken -----

    @cached_property
    def encoding(self):
        """A `tiktoken.Encoding` of this vocabulary (built on first use; ~0.2 s for GPT-2's 50k ranks)."""
        import tiktoken

        return tiktoken.Encoding(
            self.name, pat_str=self.pattern, mergeable_ranks=self.ranks, special_tokens=self.special_tokens
        )

    def _raise_if_special(self, text: str) -> None:
        for token in self.special_tokens:
            pos = text.find(token)
            if pos >= 0:
                raise DozeroError(
                    f"the text contains the special token {token!r} at character {pos}; pass special='text' to "
                    "encode it as ordinary text, or special='allow' to encode it as the special token "
                    "(command line: --special text|allow)"
                )

    def encode(self, text: str, special: str = "raise") -> list[int]:
        if special == "text":
            return self.encoding.encode_ordinary(text)
        if special == "allow":
            return self.encoding.encode(text, allowed_special="all", disallowed_special=())
        check_special_mode(special)
        try:  # tiktoken checks for special-token text with one regex search, as fast as we could
            return self.encoding.encode(text, allowed_special=set(), disallowed_special="all")
        except ValueError:
            self._raise_if_special(text)
            raise

    def encode_batch(
        self, texts: Sequence[str], special: str = "raise", num_threads: int | None = None
    ) -> list[list[int]]:
        # tiktoken releases the GIL inside its Rust encoder, so threads use all cores.
        num_threads = num_threads or os.cpu_count() or 1
        if special == "text":
            return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if special == "allow":
            return self.encoding.encode_batch(
                list(texts), num_threads=num_threads, allowed_special="all", disallowed_special=()
            )
        check_special_mode(special)
        try:  # the same call as tiktoken's default encode_batch: its special-token check runs in the threads
            return self.encoding.encode_batch(list(texts), num_threads=num_threads, disallowed_special="all")
        except ValueError:
            for text in texts:
                self._raise_if_special(text)
            raise

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = self.check_ids(ids)
        return self.encoding.decode_bytes(ids)

    def encode_bytes(self, data: bytes, special: str = "raise") -> list[int]:
        """Encode raw bytes that may not be valid UTF-8 (a corpus file). Valid stretches are encoded as text;
        each invalid byte becomes its own single-byte token (never merged), so `decode_bytes` gives `data` back."""
        text = data.decode("utf-8", errors="surrogateescape")  # invalid byte b -> lone surrogate U+DC00+b
        if not _ESCAPED.search(text):
            return self.encode(text, special=special)
        ids: list[int] = []
        for i, part in enumerate(_ESCAPED.split(text)):  # split keeps the separators at odd positions
            if i % 2:
                ids.append(self.ranks[bytes([ord(part) - 0xDC00])])
            elif part:
                ids += self.encode(part, special=special)
        return ids

    # ----- the readable reference: the three steps of the module docstring, in Python -----

    def encode_reference(self, text: str, special: str = "raise") -> list[int]:
        """Pure-Python encoder, the algorithm spelled out. Gives the same ids as `encode` (tested)."""
        check_special_mode(special)
        if special == "raise":
            self._raise_if_special(text)
        if special == "allow" and self.special_tokens:
            # cut the special tokens out first; the text between them is ordinary text
            specials = "(" + "|".join(regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")"
            pieces = regex.split(specials, text)
        else:
            pieces = [text]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:  # a separator captured by the split: a special token
                ids.append(self.special_tokens[piece])
                continue
            for chunk in self._pattern.findall(piece):  # step 1
                cached = self._chunk_cache.get(chunk)
                if cached is None:
                    cached = bpe_merge(chunk.encode("utf-8"), self.ranks)  # steps 2 and 3
                    if len(self._chunk_cache) < 100_000:  # bounded: words repeat, so a cache pays (as in GPT-2)
                        self._chunk_cache[chunk] = cached
                ids += cached
        return ids

    def decode_reference(self, ids: Iterable[int]) -> str:
        ids = self.check_ids(ids)
        return b"".join(self.id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    @cached_property
    def _pattern(self):
        return regex.compile(self.pattern)

    # ----- identity and files -----

    def fingerprint(self) -> str:
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(
            json.dumps(
                {"kind": "bpe", "pattern": self.pattern, "special_tokens": self.special_tokens}, sort_keys=True
            ).encode()
        )
        for token in sorted(self.ranks, key=self.ranks.get):  # length-prefixed, in rank order
            h.update(len(token).to_bytes(4, "little") + token)
        return h.hexdigest()[:16]

    def token_bytes(self, i: int) -> bytes:
        return self.id_to_bytes[i]

    def save(self, folder: str | os.PathLike) -> None:
        """Writes `dozero_tokenizer.json` (+ `dozero_tokenizer.tiktoken`, the ranks, unless this is GPT-2's
        vocabulary shipped with dozero, which is referred to by name and fingerprint)."""
        from dozero.tokenizer.formats import save_bpe

        save_bpe(self, Path(folder))


_ESCAPED = regex.compile("([\udc80-\udcff])")
