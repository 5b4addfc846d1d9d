"""`dozero data prepare`: files -> cleaned documents -> token shards + manifest, streaming, on all cores.

    dozero data prepare corpus/ more/*.jsonl.zst --out data/mycorpus --tokenizer gpt2
    dozero data prepare tinyshakespeare --out data/shakespeare_char \\
        --tokenizer char --separator '\\n\\n' --no-clean          # nanoGPT's shakespeare_char

    from dozero.data.prepare import PrepareConfig, prepare
    manifest = prepare(["corpus/"], "data/mycorpus", PrepareConfig(tokenizer="gpt2"))

How it flows: the main process reads documents (`ingest`) and hands batches of ~1 MB to a pool of
worker processes, which clean (`clean.clean_document`) and tokenize them. At most 2 batches per
worker are in flight, so memory stays bounded whatever the corpus size. Results come back in
corpus order; the main process deduplicates (`clean.Deduplicator`), draws each kept document's
split from a generator seeded with --seed, and streams ids into shards (`shards.ShardWriter`).
The output does not depend on the number of workers.

Where it writes: the whole dataset is built in a hidden folder beside --out (".NAME.HOST-PID.xxxxxxxx.tmp")
and swapped in when complete, so a failed, interrupted or killed run leaves the old dataset as it was (the
disk needs room for both while it runs); the next run removes a killed run's leftover folder.

Memory: bounded except for the dedup indexes, which keep ~0.85 KB per kept document (measured, both
steps): 1 M documents ~ 0.85 GB. Use --no-near-dedup (and --no-dedup) for corpora of many millions.

Documents are separated by the tokenizer's end-of-text token, appended after each document (GPT-2's
convention). A character vocabulary has no such token: documents are joined with a blank line, and
the manifest says so.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dozero import __version__
from dozero.cli_args import unescape
from dozero.data.clean import CleanConfig, CleanReport, CleanResult, Deduplicator, clean_document
from dozero.data.ingest import Document, IngestStats, expand_inputs, iter_documents, total_input_bytes
from dozero.data.shards import FORMAT, ShardWriter, is_data_file, is_data_folder, token_dtype, write_manifest
from dozero.errors import DozeroError, naming_os_errors
from dozero.files import atomic_write, check_output_folder, make_temp_folder, removed_if_failed, replace_folder

CHAR_SEPARATOR = "\n\n"
BATCH_BYTES = 1 << 20  # ~1 MB of text per task: large enough that pickling overhead is small
BATCH_DOCS = 512


@dataclass
class PrepareConfig:
    tokenizer: str = "gpt2"
    """'gpt2', 'char' (a character vocabulary built from the cleaned corpus, like nanoGPT's shakespeare_char),
    or a folder/file holding a saved tokenizer (a model folder, tokenizer.json, ...)."""
    field: str = "text"
    """Text field of .jsonl records and text column of .parquet files."""
    separator: str | None = None
    """Split .txt/.md files into documents at this string (backslash escapes work: '\\n\\n' = blank line).
    Default: one document per file."""
    val_fraction: float = 0.1
    """Share of documents drawn at random (with --seed) for the validation split."""
    val_tokens: int = 0
    """If above 0: validation stops taking documents once it holds this many tokens (a token-count split)."""
    seed: int = 1337
    """Seed of the train/validation draw."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (200 MB in uint16)."""
    workers: int = 0
    """Worker processes for cleaning and tokenizing (0: one per CPU core; 1: everything in this process)."""

    def __post_init__(self):
        if self.separator:
            self.separator = unescape(self.separator)
        if not 0 <= self.val_fraction < 1:
            raise DozeroError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise DozeroError(f"--shard-tokens must be positive, got {self.shard_tokens}")


# ---------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(tokenizer_spec: str | None, clean_cfg: CleanConfig) -> None:
    from dozero.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec) if tokenizer_spec else None
    _WORKER.update(tokenizer=tokenizer, clean=clean_cfg)


def _process(texts: list[str]) -> list[tuple[CleanResult, np.ndarray | None]]:
    """Clean a batch; tokenize what survives. The text travels back only when there is no tokenizer."""
    tokenizer, cfg = _WORKER["tokenizer"], _WORKER["clean"]
    results = [clean_document(t, cfg) for t in texts]
    if tokenizer is None:
        return [(r, None) for r in results]
    kept = [r for r in results if r.reason is None]
    # special="text": a document quoting "<|endoftext|>" must not inject a real separator.
    # One thread: the pool already uses every core.
    encoded = iter(tokenizer.encode_batch([r.text for r in kept], special="text", num_threads=1))
    dtype = token_dtype(tokenizer.vocab_size)
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    out = []
    for r in results:
        ids = None
        if r.reason is None:
            ids = np.array(next(encoded) + eot, dtype=dtype)
            r.text = None
        out.append((r, ids))
    return out


# ---------------------------------------------------------------- main side
def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += doc.raw_bytes
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _results(batches, tokenizer_spec, clean_cfg, workers: int):
    """(document, result, ids) for every document, in corpus order, at most 2 batches per worker in flight."""
    if workers == 1:
        _init_worker(tokenizer_spec, clean_cfg)
        for batch in batches:
            yield from zip(batch, _process([d.text for d in batch]), strict=True)
        return
    # fork starts workers in milliseconds; macOS/Windows only have spawn (each worker re-imports dozero).
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, _init_worker, (tokenizer_spec, clean_cfg)) as pool:
        pending: deque = deque()
        for batch in batches:
            # apply_async + a bounded queue, not pool.imap: imap's feeder would read the whole corpus ahead.
            pending.append((batch, pool.apply_async(_process, ([d.text for d in batch],))))
            while len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield from zip(done, result.get(), strict=True)
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get(), strict=True)


def _kept_documents(files, cfg: PrepareConfig, clean_cfg, tokenizer_spec, stats, report, desc: str, progress: bool):
    """(document, result, ids) for each document that survives cleaning and deduplication."""
    from tqdm import tqdm

    workers = cfg.workers or os.cpu_count() or 1
    dedup = Deduplicator(clean_cfg) if clean_cfg.clean else None
    bar = tqdm(total=total_input_bytes(files), unit="B", unit_scale=True, desc=desc, disable=not progress)
    with bar:
        batches = _batches(iter_documents(files, cfg.field, cfg.separator, stats))
        for doc, (result, ids) in _results(batches, tokenizer_spec, clean_cfg, workers):
            bar.update(doc.raw_bytes)
            duplicate = dedup.is_duplicate(result) if dedup is not None and result.reason is None else None
            report.add(doc.source, doc.text, result, duplicate)
            if result.reason is None and duplicate is None:
                yield doc, result, ids


def _char_tokenizer(files, cfg, clean_cfg, progress):
    """First pass for --tokenizer char: the vocabulary is the set of characters of the kept documents."""
    from dozero.tokenizer import CharTokenizer

    chars, kept = set(), 0
    report = CleanReport(clean_cfg)
    for _, result, _ in _kept_documents(files, cfg, clean_cfg, None, IngestStats(), report, "char vocab", progress):
        chars.update(result.text)
        kept += 1
    if kept > 1:
        chars.update(CHAR_SEPARATOR)
    if not chars:
        raise DozeroError(f"no documents left after cleaning, nothing to build a vocabulary from:\n{report.summary()}")
    return CharTokenizer(sorted(chars))


def prepare(inputs: list[str], out_dir: str | os.PathLike, cfg: PrepareConfig | None = None,
            clean_cfg: CleanConfig | None = None, progress: bool = True, force: bool = False) -> dict:  # fmt: skip
    """Clean and tokenize `inputs` (files, folders, globs) into shards in `out_dir`; returns the manifest.

    The dataset is built in a temporary folder beside `out_dir` and swapped in when complete: a failed or
    interrupted run leaves the old folder exactly as it was. `out_dir` must be new, empty or a data folder
    written earlier, unless `force` (then its other files stay, and dozero's are replaced)."""
    cfg, clean_cfg = cfg or PrepareConfig(), clean_cfg or CleanConfig()
    out = Path(out_dir).expanduser()
    out = out.resolve() if out.is_symlink() else out  # swap the folder it points to, not the link
    files = _input_files(inputs, out)
    _check_out(out, force)
    # Errors name --out, not the temporary folders beside it (".<name>.*"): those are gone when the user reads them.
    # make_temp_folder may create --out's parents: they go too if the build fails.
    with removed_if_failed(out.parent), naming_os_errors(out, temporary=out.with_name(f".{out.name}.")):
        build = make_temp_folder(out)
        try:
            manifest = _build(files, build, cfg, clean_cfg, progress)
            replace_folder(build, out, keep=lambda name: not is_data_file(name))
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return manifest


def _check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an --out that the final swap could not or must not replace."""
    check_output_folder(out, "dozero data folder", is_data_folder, force)
    if os.path.ismount(out):  # a mount point cannot be renamed away
        raise DozeroError(f"--out {out} is a mount point, which cannot be swapped; give a folder inside it")
    if out.exists() and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise DozeroError(
            f"--out {out} holds the working folder, which the swap to the new data would pull away from under "
            "you; run from outside it (e.g. `cd ..` and --out with the folder's name)"
        )


def _input_files(inputs: list[str], out: Path) -> list[Path]:
    """The input files, without any inside `out`: an --out inside an input folder is not read back as input."""
    out_real = out.resolve()
    for item in inputs:
        path = Path(item).expanduser()
        if path.exists() and (path.resolve() == out_real or out_real in path.resolve().parents):
            raise DozeroError(
                f"input {item} lies inside --out {out}, which the new data replaces; choose an --out outside the inputs"
            )
    files = [f for f in expand_inputs(list(inputs)) if out_real not in f.resolve().parents]
    if not files:
        raise DozeroError(f"every input file lies inside --out {out}; choose an --out outside the inputs")
    return files


def _build(files: list[Path], out: Path, cfg: PrepareConfig, clean_cfg: CleanConfig, progress: bool) -> dict:
    """Write the whole dataset into the (temporary, empty) folder `out`; returns the manifest."""
    from dozero.tokenizer import load_tokenizer

    if cfg.tokenizer == "char":
        tokenizer = _char_tokenizer(files, cfg, clean_cfg, progress)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    tokenizer.save(out)  # beside the manifest, as in a model folder: `load_tokenizer(out)` reads it
    spec = "gpt2" if cfg.tokenizer == "gpt2" else str(out)
    dtype = token_dtype(tokenizer.vocab_size)

    between = np.empty(0, dtype=dtype)
    if tokenizer.eot_id is None:
        between = np.array(tokenizer.encode(CHAR_SEPARATOR), dtype=dtype)
    writers = {s: ShardWriter(out, s, dtype, cfg.shard_tokens, between=between) for s in ("train", "val")}
    stats, report = IngestStats(), CleanReport(clean_cfg)
    rng = np.random.default_rng(cfg.seed)
    try:
        for _, _, ids in _kept_documents(files, cfg, clean_cfg, spec, stats, report, "prepare", progress):
            # One draw per kept document, in corpus order: the split is reproducible for a seed.
            to_val = rng.random() < cfg.val_fraction
            if cfg.val_tokens and writers["val"].tokens >= cfg.val_tokens:
                to_val = False
            writers["val" if to_val else "train"].add_document(ids)
        splits = {s: w.close() for s, w in writers.items()}
    finally:
        for w in writers.values():
            w.abort()  # closes a shard still open after an error (a no-op after close)

    if report.kept == 0:
        raise DozeroError(
            f"no documents left after cleaning {len(files)} file(s); nothing written:\n{report.summary()}"
        )
    atomic_write(out / "clean_report.json", _json({"input": stats.to_dict(), "cleaning": report.to_dict()}))
    atomic_write(out / "clean_report.txt", report.summary() + "\n")
    warnings = []
    if cfg.val_fraction > 0 and splits["val"]["documents"] == 0:
        warnings.append(
            "the validation split is empty (too few documents for --val-fraction); split files into more "
            "documents with --separator or raise --val-fraction"
        )
    manifest = _manifest(tokenizer, dtype, splits, files, stats, cfg, clean_cfg, warnings)
    write_manifest(out, manifest)
    return manifest


def _manifest(tokenizer, dtype, splits, files, stats, cfg, clean_cfg, warnings) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "created_by": f"dozero {__version__}",
        "tokenizer": {
            "name": getattr(tokenizer, "name", tokenizer.kind),
            "kind": tokenizer.kind,
            "spec": cfg.tokenizer,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "fingerprint": tokenizer.fingerprint(),
            "folder": ".",
        },
        "dtype": dtype.name,
        "byte_order": "little",
        "document_separator": (
            f"end-of-text token (id {tokenizer.eot_id}) after each document"
            if tokenizer.eot_id is not None
            else f"no end-of-text token in this vocabulary: documents are joined with {CHAR_SEPARATOR!r}"
        ),
        "documents": splits["train"]["documents"] + splits["val"]["documents"],
        "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
        "split": {"by": "document", "seed": cfg.seed, "val_fraction": cfg.val_fraction, "val_tokens": cfg.val_tokens},
        "splits": splits,
        "inputs": {"files": len(files), "bytes": stats.bytes, "first_files": [str(f) for f in files[:5]]},
        "settings": {"prepare": dataclasses.asdict(cfg), "clean": dataclasses.asdict(clean_cfg)},
        "report": "clean_report.json",
        "warnings": warnings,
    }


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
