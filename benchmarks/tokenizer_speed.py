"""Tokenizer speed: dozero vs tiktoken (encoding with GPT-2's vocabulary) and vs Hugging Face `tokenizers` (training).

One process, each repetition runs ours and theirs back to back (alternating which goes first); the script prints
medians and the ratios:

  encode, one long text   MB/s of `tok.encode(text)` on all of shared/data (6.2 MB) vs tiktoken.get_encoding("gpt2")
  encode, batch of docs   MB/s of `tok.encode_batch(docs)` (43 documents, all cores) vs tiktoken's encode_batch
  reference encoder       MB/s of dozero's pure-Python `encode_reference` (the readable one; for information)
  train 8,192 vocab       seconds to train on shared/data/shakespeare/ (5 MB, 42 files) vs `tokenizers.BpeTrainer`
                          with the same settings (ByteLevel pre-tokenizer, all 256 bytes, vocab 8192, <|endoftext|>)

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/tokenizer_speed.py
    .venv/bin/python benchmarks/tokenizer_speed.py --repeats 5 --skip-train

Targets (issue 3): encode >= 0.9x tiktoken's throughput; training within 3x of Hugging Face and under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from dozero.tokenizer import load_tokenizer
from dozero.tokenizer.train import train_bpe

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# tiktoken finds its files by the sha1 of their download URL (shared/data/gpt2/README.txt)
TIKTOKEN_CACHE_NAMES = {
    "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4": "gpt2.tiktoken",
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "vocab.bpe",
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "encoder.json",
}


def tiktoken_gpt2():
    import tiktoken

    cache = tempfile.mkdtemp(prefix="tiktoken_cache_")
    for cache_name, file_name in TIKTOKEN_CACHE_NAMES.items():
        shutil.copy(SHARED / "gpt2" / file_name, Path(cache) / cache_name)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return tiktoken.get_encoding("gpt2")


def train_hf(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train([str(f) for f in files], trainer)
    return tok


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(name: str, ours, theirs, repeats: int, unit_bytes: float | None = None) -> None:
    """Run both `repeats` times, alternating order; print medians and ours/theirs as a speed ratio."""
    times = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = [("ours", ours), ("theirs", theirs)]
        for label, fn in order if r % 2 == 0 else order[::-1]:
            times[label].append(timed(fn)[0])
    t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    if unit_bytes:  # throughput: higher is better, ratio = ours / theirs
        mb_ours, mb_theirs = unit_bytes / t_ours / 1e6, unit_bytes / t_theirs / 1e6
        print(
            f"{name:26s} ours {mb_ours:7.2f} MB/s   theirs {mb_theirs:7.2f} MB/s   speed ratio {t_theirs / t_ours:.2f}x"
        )
    else:  # durations: lower is better, ratio = ours / theirs time
        print(f"{name:26s} ours {t_ours:7.2f} s      theirs {t_theirs:7.2f} s      time ratio {t_ours / t_theirs:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per measurement (median reported)")
    parser.add_argument("--train-repeats", type=int, default=3, help="repetitions of the training comparison")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()

    files = [SHARED / "tinyshakespeare.txt", *sorted((SHARED / "shakespeare").glob("*.txt"))]
    docs = [f.read_text(encoding="utf-8") for f in files]
    text = "".join(docs)
    size = len(text.encode())
    ours, theirs = load_tokenizer("gpt2"), tiktoken_gpt2()
    assert ours.encode(text) == theirs.encode(text), "ids differ from tiktoken"
    threads = os.cpu_count() or 1
    print(f"{len(docs)} documents, {size / 1e6:.1f} MB; {threads} CPU cores; ratios > 1 favour dozero for speed")
    compare("encode, one long text", lambda: ours.encode(text), lambda: theirs.encode(text), args.repeats, size)
    compare("encode, batch of docs", lambda: ours.encode_batch(docs),
            lambda: theirs.encode_batch(docs, num_threads=threads), args.repeats, size)  # fmt: skip
    sample = text[:300_000]
    compare("reference (pure Python)", lambda: ours.encode_reference(sample), lambda: theirs.encode(sample), 3,
            len(sample.encode()))  # fmt: skip

    if not args.skip_train:
        corpus = sorted((SHARED / "shakespeare").glob("*.txt"))
        mine, _ = train_bpe(corpus, 8192, progress=False)
        hf = train_hf(corpus, 8192)
        assert mine.vocab_size == hf.get_vocab_size() == 8192
        sample_ids = len(mine.encode(text)), len(hf.encode(text).ids)
        print(f"trained vocabularies: {mine.vocab_size} ids each; tokens on all of shared/data: "
              f"ours {sample_ids[0]:,}, HF {sample_ids[1]:,}")  # fmt: skip
        compare("train 8,192 vocab", lambda: train_bpe(corpus, 8192, progress=False), lambda: train_hf(corpus, 8192),
                args.train_repeats)  # fmt: skip


if __name__ == "__main__":
    main()
