"""Data preparation speed and memory: `dozero data prepare` vs a plain "read + tiktoken encode + write" loop.

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/data_speed.py [--repeats 2] [--memory-mb 200]

1. Throughput, MB/s of raw text, on the Python standard library's .py sources (~30 MB on every machine),
   side by side in one process, interleaved, medians over --repeats:
     baseline   one process: read each file, tiktoken GPT-2 `encode_ordinary`, append <|endoftext|>,
                write one uint16 file (nanoGPT's prepare.py, minus its HF datasets)
     clean off  `prepare(..., CleanConfig(clean=False))`: ingest, pool of workers, shards, checksums
     clean on   every cleaning step (normalize, junk lines, filters, PII, exact + near dedup)
   The baseline uses the same `tiktoken.Encoding` object that dozero's "gpt2" tokenizer wraps.
2. Peak memory of `prepare` (all steps on) on a synthetic corpus of --memory-mb MB (jsonl, random
   words, 2-6 KB documents, 5% exact copies), run as a subprocess so its peak RSS (ru_maxrss) is its
   own: the main process and the largest worker are reported separately. Goal: main < 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from dozero.data.clean import CleanConfig
from dozero.data.prepare import PrepareConfig, prepare
from dozero.tokenizer import load_tokenizer


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def baseline(files: list[Path], out: Path) -> None:
    enc = load_tokenizer("gpt2").encoding  # a tiktoken.Encoding
    eot = enc.eot_token
    chunks = []
    for f in files:
        ids = enc.encode_ordinary(f.read_text(encoding="utf-8", errors="replace"))
        ids.append(eot)
        chunks.append(np.array(ids, dtype=np.uint16))
    np.concatenate(chunks).tofile(out / "train.bin")


def throughput(repeats: int) -> None:
    files = stdlib_files()
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    runs = {
        "baseline (1 process, tiktoken)": lambda out: baseline(files, out),
        "dozero prepare, cleaning off": lambda out: prepare(
            [str(f) for f in files], out, PrepareConfig(val_fraction=0.01), CleanConfig(clean=False), progress=False
        ),
        "dozero prepare, all cleaning on": lambda out: prepare(
            [str(f) for f in files], out, PrepareConfig(val_fraction=0.01), CleanConfig(), progress=False
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so a busy moment hurts every contender alike
        for name, run in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                run(Path(tmp))
                times[name].append(time.perf_counter() - start)
    print(f"\nthroughput on {len(files)} stdlib .py files, {megabytes:.1f} MB, {os.cpu_count()} CPU cores, "
          f"median of {repeats}:")  # fmt: skip
    base = statistics.median(times["baseline (1 process, tiktoken)"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:34s} {megabytes / t:6.2f} MB/s   {t:6.1f} s   x{base / t:.2f} vs baseline")


def synthetic_corpus(folder: Path, megabytes: int, seed: int = 0) -> int:
    """jsonl files of random-word documents (unique, plus 5% exact copies); returns bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=n)) for n in rng.integers(2, 10, size=20_000)]
    vocab = np.array(vocab, dtype=object)
    written, file_no, previous = 0, 0, []
    while written < megabytes * 1e6:
        lines = []
        for _ in range(1000):
            if previous and rng.random() < 0.05:
                text = previous[int(rng.integers(len(previous)))]
            else:
                words = vocab[rng.integers(0, len(vocab), size=int(rng.integers(400, 1200)))]
                text = "\n".join(" ".join(words[i : i + 15]) for i in range(0, len(words), 15))
                previous = (previous + [text])[-50:]
            lines.append(json.dumps({"text": text}))
        data = "\n".join(lines) + "\n"
        (folder / f"part_{file_no:04d}.jsonl").write_text(data)
        written += len(data)
        file_no += 1
    return written


CHILD = """
import json, resource, sys, time
from dozero.data.prepare import PrepareConfig, prepare
start = time.perf_counter()
m = prepare([sys.argv[1]], sys.argv[2], PrepareConfig(), progress=False)
took = time.perf_counter() - start
print(json.dumps({"seconds": took, "documents": m["documents"], "tokens": m["tokens"],
    "main_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def memory(megabytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        size = synthetic_corpus(corpus, megabytes)
        result = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(Path(tmp) / "out")],
                                check=True, capture_output=True, text=True)  # fmt: skip
        r = json.loads(result.stdout.strip().splitlines()[-1])
    main_mb, worker_mb = r["main_kb"] / 1024, r["worker_kb"] / 1024  # Linux reports ru_maxrss in KiB
    print(
        f"\npeak memory, prepare with every step on, synthetic corpus of {size / 1e6:.0f} MB "
        f"({r['documents']:,} documents kept, {r['tokens']:,} tokens, {size / 1e6 / r['seconds']:.2f} MB/s):"
    )
    print(f"  main process peak RSS   {main_mb:7.0f} MiB   (goal: < 1024)  {'OK' if main_mb < 1024 else 'OVER'}")
    print(f"  largest worker peak RSS {worker_mb:7.0f} MiB   (each of {os.cpu_count()} workers)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per contender (default: 2)")
    parser.add_argument("--memory-mb", type=int, default=200, help="synthetic corpus size for the memory test")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    throughput(args.repeats)
    if not args.skip_memory:
        memory(args.memory_mb)


if __name__ == "__main__":
    main()
