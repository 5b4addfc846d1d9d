"""Token shards on disk: the writer, the manifest, and `load_split` that memory-maps them back.

    tokens = load_split("data/shakespeare", "train", tokenizer=tok)   # ShardedTokens, len() = token count
    tokens[0:10]                                                       # numpy array, read from disk

A data folder holds
    manifest.json            the index: which shards, their sizes and checksums, the tokenizer, the settings
    train_000000.bin, ...    raw little-endian uint16 (vocabulary < 65,536) or uint32 token ids, no header
    val_000000.bin, ...      (nanoGPT's train.bin/val.bin format, cut into shards of --shard-tokens)
    dozero_tokenizer.json    the tokenizer the ids belong to (`load_tokenizer(folder)`, as for a model folder)
    clean_report.json/.txt   what cleaning removed and changed

`prepare` builds the whole folder under a temporary name beside it and renames it into place when
complete, so a folder holds one whole dataset or none. Each shard's sha256 goes in the manifest.
`load_split` checks the manifest's shape, sizes always and checksums by default (sha256 reads every
byte: ~1 s per GB; pass verify=False to skip it for big folders you trust).
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
REPORTS = ("clean_report.json", "clean_report.txt")
DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50,257 do), else uint32: half the disk and page cache.
    The one place this rule lives: anything storing token ids asks here."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_data_file(name: str) -> bool:
    """A name `prepare` writes into a data folder (what a new dataset replaces; anything else is kept)."""
    return bool(SHARD_NAME.match(name)) or name in (MANIFEST, *REPORTS) or name.startswith("dozero_tokenizer.")


def is_data_folder(path: Path) -> bool:
    """A folder `prepare` wrote: it has a manifest, or holds nothing but data-folder files (an interrupted
    run); hidden files (.DS_Store, .gitattributes) do not make it someone else's."""
    return (path / MANIFEST).is_file() or all(is_data_file(p.name) or p.name.startswith(".") for p in path.iterdir())


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
        # Final names at once: `out_dir` is the temporary folder of the whole dataset (see prepare).
        self._name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.out_dir / self._name, "wb")
        self._hash, self._count = hashlib.sha256(), 0

    def _finish(self) -> None:
        self._file.close()
        self._file = None
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
            self._file = None


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared data folder, checked for shape; any damage is a one-line DozeroError."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = (
            "it holds shards but no manifest (an interrupted prepare, or a copy without it); prepare it again"
            if Path(data_dir).is_dir() and any(SHARD_NAME.match(p.name) for p in Path(data_dir).iterdir())
            else "prepare one with `dozero data prepare INPUT --out DIR`"
        )
        raise DozeroError(f"{data_dir} is not a prepared data folder (no {MANIFEST}); {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DozeroError(f"{path} is not valid JSON ({e}): the file is damaged; prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DozeroError(f"{path} is not a dozero data manifest (format {found!r})")
    problem = _manifest_problem(manifest)
    if problem:
        raise DozeroError(f"{path} is damaged or incomplete: {problem}; prepare the data again")
    split = manifest.get("split")
    if isinstance(split, dict) and "val_ratio" in split:  # the name before it matched training's val_fraction
        split.setdefault("val_fraction", split.pop("val_ratio"))
    return manifest


_TOP = {"dtype": str, "document_separator": str, "tokenizer": dict, "splits": dict}
_TOKENIZER = {"name": str, "kind": str, "vocab_size": int, "fingerprint": str}
_SPLIT = {"documents": int, "tokens": int, "shards": list}
_SHARD = {"file": str, "tokens": int, "sha256": str}


def _shape_problem(obj, schema: dict, where: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{where} is {type(obj).__name__}, not an object"
    for key, kind in schema.items():
        if key not in obj:
            return f"{where} has no {key!r}"
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            return f"{where}[{key!r}] is {type(obj[key]).__name__}, not {kind.__name__}"
    return None


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with the manifest's shape (the keys and types readers use), or None."""
    problem = _shape_problem(m, _TOP, "the manifest") or _shape_problem(m["tokenizer"], _TOKENIZER, "tokenizer")
    if problem:
        return problem
    if m["dtype"] not in DTYPES:
        return f"dtype {m['dtype']!r} is not one of {', '.join(DTYPES)}"
    for split, s in m["splits"].items():
        if split not in ("train", "val"):
            return f"unknown split {split!r}"
        if problem := _shape_problem(s, _SPLIT, f"splits[{split!r}]"):
            return problem
        for i, shard in enumerate(s["shards"]):
            if problem := _shape_problem(shard, _SHARD, f"shard {i} of {split!r}"):
                return problem
            if not SHARD_NAME.match(shard["file"]):  # a path like "../x" would read outside the folder
                return f"shard file {shard['file']!r} is not a shard name like {split}_000000.bin"
            if shard["tokens"] < 0:
                return f"shard {shard['file']} has a negative token count"
    return None


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
