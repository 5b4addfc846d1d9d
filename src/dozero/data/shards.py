"""Token shards on disk: the writer, the manifest, and `load_split` that memory-maps them back.

    tokens = load_split("data/shakespeare", "train", tokenizer=tok)   # ShardedTokens, len() = token count
    tokens[0:10]                                                       # numpy array, read from disk

A data folder holds
    manifest.json            written LAST: a folder without it is an unfinished prepare and is never read
    train_000000.bin, ...    raw little-endian uint16 (vocabulary < 65,536) or uint32 token ids, no header
    val_000000.bin, ...      (nanoGPT's train.bin/val.bin format, cut into shards of --shard-tokens)
    dozero_tokenizer.json    the tokenizer the ids belong to (`load_tokenizer(folder)`, as for a model folder)
    clean_report.json/.txt   what cleaning removed and changed

Shards are written under temporary names (".train_000000.bin.tmp") while they grow, and renamed when
complete; their sha256 goes in the manifest. `load_split` checks sizes always and checksums by default
(sha256 reads every byte: ~1 s per GB; pass verify=False to skip it for big folders you trust).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from dozero.errors import DozeroError
from dozero.files import atomic_write

MANIFEST = "manifest.json"
FORMAT = "dozero-data"
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")
TEMP_NAME = re.compile(r"^\.(train|val)_\d{6}\.bin\.tmp$")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50,257 do), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids of one split to shards of `shard_tokens` ids, streaming to disk (memory stays O(batch))."""

    def __init__(
        self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, between: np.ndarray | None = None
    ):
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, np.dtype(dtype), shard_tokens
        self.between = between if between is not None and len(between) else None  # ids put between two documents
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._name, self._tmp = name, self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._hash, self._count = hashlib.sha256(), 0

    def _finish(self) -> None:
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.out_dir / self._name)
        self.shards.append({"file": self._name, "tokens": self._count, "sha256": self._hash.hexdigest()})

    def add_document(self, ids: np.ndarray) -> None:
        if self.between is not None and self.documents:
            self._write(self.between)
        self.documents += 1
        self._write(ids)

    def _write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype).astype(self.dtype.newbyteorder("<"), copy=False)
        self.tokens += len(ids)
        while len(ids):
            if self._file is None:
                self._open()
            part, ids = ids[: self.shard_tokens - self._count], ids[self.shard_tokens - self._count :]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> dict:
        if self._file is not None and self._count:
            self._finish()
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            Path(self._tmp).unlink(missing_ok=True)


def clear_data_dir(out_dir: Path) -> list[str]:
    """Make `out_dir` safe to write into: the manifest goes FIRST (so nothing old is trusted while we
    write), then old shards and leftovers of interrupted runs. Only dozero's own file names are touched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    removed = []
    for p in out_dir.iterdir():
        if p.is_file() and (SHARD_NAME.match(p.name) or TEMP_NAME.match(p.name)):
            p.unlink()
            removed.append(p.name)
    return removed


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = (
            "it holds shards but no manifest: an interrupted `dozero data prepare`; run it again"
            if Path(data_dir).is_dir()
            and any(TEMP_NAME.match(p.name) or SHARD_NAME.match(p.name) for p in Path(data_dir).iterdir())  # fmt: skip
            else "prepare one with `dozero data prepare INPUT --out DIR`"
        )
        raise DozeroError(f"{data_dir} is not a prepared data folder (no {MANIFEST}); {hint}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise DozeroError(f"{path} is not a dozero data manifest (format {manifest.get('format')!r})")
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


class ShardedTokens:
    """Several memory-mapped shards seen as one 1-D token stream (what the loaders read)."""

    def __init__(self, arrays: list[np.ndarray], name: str = "token stream"):
        self.arrays = [a for a in arrays if len(a)]
        self.name = name
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])  # shard k holds [offsets[k], offsets[k+1])
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"ShardedTokens({self.name}: {len(self):,} tokens in {len(self.arrays)} shards)"

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            key = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= key < len(self):
                raise IndexError(key)
            k = int(np.searchsorted(self.offsets, key, side="right")) - 1
            return self.arrays[k][key - self.offsets[k]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports integers and contiguous slices")
        start, stop, _ = key.indices(len(self))
        pieces = []
        for k, a in enumerate(self.arrays):
            lo, hi = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
            if lo < hi:
                pieces.append(a[lo - self.offsets[k] : hi - self.offsets[k]])
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) array of tokens[s : s + length]; one gather per shard, slices at boundaries."""
        out = np.empty((len(starts), length), dtype=self.dtype)  # (B, T+1)
        shard = np.searchsorted(self.offsets, starts, side="right") - 1  # (B,) shard holding each start
        local = starts - self.offsets[shard]
        inside = starts + length <= self.offsets[shard + 1]  # (B,) window does not cross into the next shard
        for k in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == k))
            out[rows] = self.arrays[k][local[rows, None] + np.arange(length)]
        for row in np.flatnonzero(~inside):  # rare: a window spanning two shards
            out[row] = self[int(starts[row]) : int(starts[row]) + length]
        return out


def _fingerprint_of(tokenizer) -> str:
    return tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint()


def check_tokenizer(manifest: dict, tokenizer, data_dir) -> None:
    """DozeroError if `tokenizer` (a Tokenizer or a fingerprint string) is not the one the shards were made with."""
    if tokenizer is None:
        return
    made_with = manifest["tokenizer"]
    fingerprint = _fingerprint_of(tokenizer)
    if fingerprint != made_with["fingerprint"]:
        vocab = getattr(tokenizer, "vocab_size", "?")
        raise DozeroError(
            f"{data_dir} was tokenized with {made_with['name']} (vocab {made_with['vocab_size']}, fingerprint "
            f"{made_with['fingerprint']}), but this run's tokenizer has vocab {vocab} and fingerprint {fingerprint}; "
            f"train with the data's tokenizer (the one saved in {data_dir}) or prepare the data again with yours"
        )


def load_split(data_dir: str | os.PathLike, split: str, tokenizer=None, verify: bool = True) -> ShardedTokens:
    """The tokens of `split` ("train" or "val"), memory-mapped. Checks that every shard has the size the
    manifest says, its sha256 if `verify`, and that `tokenizer` (if given) is the one the data was made with."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise DozeroError(f"{data_dir} has no split {split!r} (it has: {', '.join(splits)})")
    check_tokenizer(manifest, tokenizer, data_dir)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    arrays = []
    for shard in splits[split]["shards"]:
        path = data_dir / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        if not path.is_file():
            raise DozeroError(f"shard {path} listed in the manifest is missing; prepare the data again")
        if path.stat().st_size != expected:
            raise DozeroError(
                f"shard {path} has {path.stat().st_size:,} bytes, the manifest says {expected:,}: "
                "the file was changed or cut short; prepare the data again"
            )
        if verify and file_sha256(path) != shard["sha256"]:
            raise DozeroError(
                f"shard {path} does not match its checksum in the manifest: the file was changed or corrupted; "
                "prepare the data again"
            )
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return ShardedTokens(arrays, name=f"split {split!r} of {data_dir}")


def load_data_tokenizer(data_dir: str | os.PathLike):
    """The tokenizer a prepared data folder was made with."""
    from dozero.tokenizer import load_tokenizer

    return load_tokenizer(Path(data_dir))
