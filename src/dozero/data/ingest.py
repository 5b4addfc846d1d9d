"""Read documents from files, folders and globs: .txt/.md/.py, .jsonl, .parquet, optionally .gz/.zst compressed.

    files = expand_inputs(["corpus/", "extra/*.jsonl.zst"])
    stats = IngestStats()
    for doc in iter_documents(files, field="text", separator=None, stats=stats):
        doc.text, doc.source

Everything streams: text files are read in 8 MiB pieces, JSON lines one line at a time, parquet one
record batch at a time, so memory does not grow with the corpus. One exception: a .txt/.md file
without `separator` is ONE document and is held whole (a document must be whole to be cleaned and
tokenized); split big single-file corpora with `separator` (e.g. "\\n\\n").

Bad input, by design:
  * bytes that are not UTF-8 become U+FFFD; they are counted per file (never a crash mid-corpus);
  * empty files (or files with only whitespace) are skipped and counted;
  * a JSON line that does not parse is skipped and counted, with its file and line number;
  * a jsonl record or parquet file without the named field is a DozeroError naming the file and the
    fields it does have (the field name is almost certainly wrong for the whole corpus).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dozero.errors import DozeroError
from dozero.files import find_files, glob_files, input_path

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet", ".py")  # .py: source code as plain text, one document a file
COMPRESSIONS = (".gz", ".zst")
CHUNK_BYTES = 8 << 20
# surrogateescape turns each undecodable byte into one lone surrogate U+DC80..U+DCFF, which we count
# exactly and then replace by U+FFFD (plain errors="replace" would not tell us how many bytes were bad).
_ESCAPED = re.compile("[\udc80-\udcff]")


@dataclass
class Document:
    text: str
    source: str  # "file" or "file:line" / "file:row", for the report's examples
    raw_bytes: int  # input bytes it came from (a JSON line with its markup; text in UTF-8), for MB/s figures


@dataclass
class IngestStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty_files: list[str] = field(default_factory=list)
    undecodable_bytes: int = 0
    files_with_undecodable_bytes: dict[str, int] = field(default_factory=dict)
    malformed_json_lines: list[str] = field(default_factory=list)

    def to_dict(self, examples: int = 5) -> dict:
        worst = sorted(self.files_with_undecodable_bytes.items(), key=lambda kv: -kv[1])[:examples]
        return {
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "empty_files": len(self.empty_files),
            "empty_file_examples": self.empty_files[:examples],
            "undecodable_bytes_replaced": self.undecodable_bytes,
            "files_with_undecodable_bytes": len(self.files_with_undecodable_bytes),
            "undecodable_examples": [{"file": f, "bytes": n} for f, n in worst],
            "malformed_json_lines": len(self.malformed_json_lines),
            "malformed_json_examples": self.malformed_json_lines[:examples],
        }


def _kind(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None): data.jsonl.zst -> (".jsonl", ".zst")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    return (suffixes[-1] if suffixes else ""), compression


def is_supported(path: Path) -> bool:
    fmt, compression = _kind(path)
    return fmt in SUFFIXES and not (fmt == ".parquet" and compression)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly, files under folders (recursively, supported types only, hidden ones skipped)
    and glob matches, sorted within each input and without repeats, so the order (and the seeded split)
    is reproducible. A symbolic-link loop below a folder is a DozeroError (`files.find_files`)."""
    files: list[Path] = []
    for item in inputs:
        item = input_path(item)  # "tinyshakespeare": the text shipped with dozero
        path = Path(item)
        if path.is_dir():
            found = [p for p in find_files(path) if is_supported(p)]
            if not found:
                raise DozeroError(f"folder {item} holds no {'/'.join(SUFFIXES)} files (optionally .gz/.zst)")
        elif path.is_file():
            found = [path]
        else:
            found = glob_files(item)
            if not found:
                raise DozeroError(f"input {item!r} is not a file or folder and matches no files as a glob pattern")
        for p in found:
            if not is_supported(p):
                raise DozeroError(f"{p}: unsupported file type; dozero reads {', '.join(SUFFIXES)} (+ .gz/.zst)")
        files.extend(found)
    return list(dict.fromkeys(files))


def _open_binary(path: Path, compression: str | None):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        )
    return open(path, "rb")


def _clean_decode(text: str, source: str, stats: IngestStats) -> str:
    """Count and replace the undecodable bytes that surrogateescape left in `text`."""
    bad = len(_ESCAPED.findall(text))
    if bad:
        stats.undecodable_bytes += bad
        stats.files_with_undecodable_bytes[source] = stats.files_with_undecodable_bytes.get(source, 0) + bad
        text = _ESCAPED.sub("\ufffd", text)
    return text


def _read_text(path: Path, compression: str | None, separator: str | None, stats: IngestStats) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    pending = ""
    with _open_binary(path, compression) as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            pending += decoder.decode(chunk, final=not chunk)
            if separator:
                *done, pending = pending.split(separator)
                for part in done:
                    yield _clean_decode(part, str(path), stats)
            if not chunk:
                break
    yield _clean_decode(pending, str(path), stats)


def _read_jsonl(
    path: Path, compression: str | None, field_name: str, stats: IngestStats
) -> Iterator[tuple[str, int, int]]:
    with _open_binary(path, compression) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _clean_decode(raw.decode("utf-8", errors="surrogateescape"), str(path), stats)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                stats.malformed_json_lines.append(f"{path}:{line_no}: {e.msg}")
                continue
            if not isinstance(record, dict) or field_name not in record:
                have = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DozeroError(
                    f"{path}:{line_no}: the JSON record has no field {field_name!r} (it has: {have}); "
                    "name the text field with --field"
                )
            value = record[field_name]
            if value is None:
                continue
            if not isinstance(value, str):
                raise DozeroError(f"{path}:{line_no}: field {field_name!r} is {type(value).__name__}, not text")
            yield value, line_no, len(raw)


def _read_parquet(path: Path, field_name: str, batch_rows: int = 1024) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DozeroError(f"{path}: cannot read as parquet ({e})") from None
    names = pf.schema_arrow.names
    if field_name not in names:
        raise DozeroError(f"{path}: no column {field_name!r} (it has: {names}); name the text column with --field")
    row = 0
    # One record batch at a time: memory stays at ~batch_rows documents whatever the file's size.
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[field_name]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            if not isinstance(value, str):
                raise DozeroError(f"{path}: column {field_name!r} holds {type(value).__name__}, not text")
            yield value, row


def iter_documents(files: list[Path], field: str = "text", separator: str | None = None,
                   stats: IngestStats | None = None) -> Iterator[Document]:  # fmt: skip
    """Every document of every file, in order. Whitespace-only documents are dropped silently
    (a separator at the end of a file makes one); whole empty files are counted in `stats`."""
    stats = stats if stats is not None else IngestStats()
    for path in files:
        stats.files += 1
        fmt, compression = _kind(path)
        if fmt == ".jsonl":
            items = ((t, f"{path}:{n}", size) for t, n, size in _read_jsonl(path, compression, field, stats))
        elif fmt == ".parquet":
            items = ((t, f"{path}:row {n}", None) for t, n in _read_parquet(path, field))
        else:
            items = ((t, str(path), None) for t in _read_text(path, compression, separator, stats))
        n_docs = 0
        for text, source, size in items:
            if not text.strip():
                continue
            n_docs += 1
            size = size or len(text.encode("utf-8", errors="replace"))
            stats.documents += 1
            stats.bytes += size
            yield Document(text, source, size)
        if n_docs == 0:
            stats.empty_files.append(str(path))


def total_input_bytes(files: list[Path]) -> int | None:
    """Sum of file sizes (the progress bar's total), or None for compressed or parquet inputs (size unknown ahead)."""
    if any(_kind(p)[1] or _kind(p)[0] == ".parquet" for p in files):
        return None
    return sum(os.path.getsize(p) for p in files)
