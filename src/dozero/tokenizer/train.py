"""Train a byte-level BPE vocabulary on your own corpus.

    dozero tokenizer train tinyshakespeare --vocab-size 1024 --out tok/   # the text shipped with dozero
    tok = train_bpe(["corpus/*.txt"], vocab_size=8192)        # Python; returns a BPETokenizer

The algorithm (Sennrich et al. 2016, with GPT-2's byte-level twist), organised so it scales:
  1. Pre-tokenize every file once with GPT-2's regex and count the *distinct* chunks (" the" x 27,000).
     Memory is bounded by the number of distinct chunks (36k for the complete Shakespeare), not by the corpus.
  2. Count adjacent pairs over the distinct chunks, weighted by how often each chunk occurs, and remember
     which chunks hold each pair (`where`).
  3. Repeatedly take the most frequent pair from a heap, give it the next id, and rewrite only the chunks
     that hold it, adjusting the counts of the pairs around each rewrite. Heap entries are never updated in
     place: a popped entry whose count is stale is pushed back with its current count ("lazy deletion").

Ties: the most frequent pair wins; among equally frequent pairs, the one whose (left bytes, right bytes) sorts
first. So training is deterministic: same corpus and settings, same ids, on any machine.

Invalid UTF-8 bytes in a corpus are kept apart from the text around them (each is its own single-byte token,
exactly as `BPETokenizer.encode_bytes` encodes them), so the corpus still trains and round-trips; their number
is reported. Special-token text in the corpus (e.g. "<|endoftext|>" between documents) is cut out, not learned.
Ids: 0..255 are the bytes (id = byte value), then the merges in order, then the special tokens.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import regex
from tqdm.auto import tqdm

from dozero.errors import DozeroError
from dozero.files import find_files, glob_files, input_path
from dozero.tokenizer.base import ENDOFTEXT
from dozero.tokenizer.bpe import GPT2_PATTERN, BPETokenizer

# Below this many bytes, starting worker processes costs more than it saves (measured: ~0.3 s to start two).
PARALLEL_MIN_BYTES = 4_000_000
# Files are read in blocks of about this size and cut at a "\n" that follows a printable ASCII character: the
# regex always ends a chunk there (tested), so the pieces give exactly the chunks of the whole file, and an
# ASCII byte never sits inside a UTF-8 character, so each piece decodes on its own. Memory stays at a few blocks.
_BLOCK_BYTES = 1 << 20
_INVALID = regex.compile("[\udc80-\udcff]")


@dataclass
class TrainReport:
    """What `train_bpe` saw and did (printed by `dozero tokenizer train`)."""

    files: int = 0
    bytes: int = 0
    invalid_bytes: int = 0
    """bytes that are not valid UTF-8 (kept as single-byte tokens)"""
    invalid_files: list[str] = field(default_factory=list)
    chunks: int = 0
    distinct_chunks: int = 0
    merges: int = 0
    seconds: float = 0.0


def corpus_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files, folders (every non-hidden file below, sorted) and glob patterns -> a list of files.
    A symbolic-link loop below a folder is a DozeroError (`files.find_files`), not an endless walk."""
    files: list[Path] = []
    for item in inputs:
        item = input_path(item)  # "tinyshakespeare": the text shipped with dozero
        path = Path(item)
        if path.is_dir():
            found = find_files(path)  # hidden means hidden below the folder: "~/.cache/corpus" is fine
        elif path.is_file():
            found = [path]
        else:
            found = glob_files(item)
        if not found:
            raise DozeroError(f"no files found for {item!r}; give text files, folders or glob patterns")
        files += found
    return files


def count_chunks(text: str, pattern: str, special_tokens: list[str]) -> Counter:
    """Distinct pre-tokenized chunks of `text` and their counts. Invalid bytes (surrogate escapes) and
    special-token text are cut out first; an invalid byte is counted as a chunk of its own (never merged)."""
    compiled = regex.compile(pattern)
    cut = "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
    cut = f"({cut}|[\udc80-\udcff])" if cut else "([\udc80-\udcff])"
    counts: Counter = Counter()
    for i, piece in enumerate(regex.split(cut, text)):
        if i % 2 == 0:
            counts.update(compiled.findall(piece))
        elif piece not in special_tokens:
            counts[piece] += 1  # a lone invalid byte
    return counts


def _blocks(path: Path):
    """The bytes of `path` in pieces of about `_BLOCK_BYTES`, cut where no chunk can span the cut."""
    carry = b""
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            data = carry + block
            cut = data.rfind(b"\n")
            while cut > 0 and not 0x21 <= data[cut - 1] <= 0x7E:  # "\n" after printable ASCII (see _BLOCK_BYTES)
                cut = data.rfind(b"\n", 0, cut)
            if cut <= 0:
                carry = data  # no place to cut yet (e.g. one very long line): read on
                continue
            carry = data[cut:]
            yield data[:cut]
    if carry:
        yield carry


def _read_pieces(files: list[Path], report: TrainReport):
    """Decoded pieces of every file, one block at a time; counts bytes and invalid UTF-8 into `report`."""
    for path in files:
        invalid = 0
        for data in _blocks(path):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("utf-8", errors="surrogateescape")  # invalid byte b -> U+DC00+b, losslessly
                invalid += len(_INVALID.findall(text))
            report.bytes += len(data)
            yield text, len(data)
        if invalid:
            report.invalid_bytes += invalid
            report.invalid_files.append(str(path))
        report.files += 1


def train_bpe(
    inputs: list[str | os.PathLike],
    vocab_size: int,
    special_tokens: list[str] | tuple[str, ...] = (ENDOFTEXT,),
    pattern: str = GPT2_PATTERN,
    name: str = "dozero-bpe",
    workers: int | None = None,
    progress: bool = True,
) -> tuple[BPETokenizer, TrainReport]:
    """Train on files/folders/globs to `vocab_size` ids (256 bytes + merges + `special_tokens`).

    Returns the tokenizer and a `TrainReport`. If the corpus runs out of pairs to merge first, the vocabulary is
    smaller than asked (`report.merges` says how many merges were made)."""
    start = time.perf_counter()
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or any(not s or "\n" in s for s in special_tokens):
        raise DozeroError(f"special tokens must be distinct non-empty strings without newlines, got {special_tokens}")
    if vocab_size < 256 + len(special_tokens):
        raise DozeroError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens + {len(special_tokens)} "
            f"special token(s) = {256 + len(special_tokens)} at least"
        )
    report = TrainReport()
    files = corpus_files(inputs)
    chunk_counts = _count_all(files, report, pattern, special_tokens, workers, progress)
    if report.bytes == 0:
        raise DozeroError(f"the corpus is empty ({len(files)} file(s), 0 bytes); nothing to train on")
    report.chunks, report.distinct_chunks = sum(chunk_counts.values()), len(chunk_counts)
    merged = learn_merges(chunk_counts, vocab_size - len(special_tokens), progress)
    report.merges = len(merged) - 256
    ranks = {token: i for i, token in enumerate(merged)}
    specials = {s: len(ranks) + k for k, s in enumerate(special_tokens)}
    report.seconds = time.perf_counter() - start
    return BPETokenizer(ranks, specials, pattern, name=name), report


def _count_all(files, report, pattern, special_tokens, workers, progress) -> Counter:
    """Chunk counts of the whole corpus; pieces go to `workers` processes when the corpus is large enough."""
    workers = workers or os.cpu_count() or 1
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, desc="pre-tokenizing", unit="B", unit_scale=True, disable=not progress)
    total: Counter = Counter()
    pieces = _read_pieces(files, report)
    if workers > 1 and total_bytes >= PARALLEL_MIN_BYTES:
        with ProcessPoolExecutor(workers) as pool:
            pending: deque = deque()  # at most 2 pieces per worker in flight: memory stays bounded
            for piece, size in pieces:
                pending.append((pool.submit(count_chunks, piece, pattern, special_tokens), size))
                while len(pending) > 2 * workers or (pending and pending[0][0].done()):
                    future, size = pending.popleft()
                    total.update(future.result())
                    bar.update(size)
            for future, size in pending:
                total.update(future.result())
                bar.update(size)
    else:
        for piece, size in pieces:
            total.update(count_chunks(piece, pattern, special_tokens))
            bar.update(size)
    bar.close()
    return total


def learn_merges(chunk_counts: Counter, n_tokens: int, progress: bool = True) -> list[bytes]:
    """The token list: 256 single bytes, then the bytes of each merged token until `n_tokens` (see module doc)."""
    tokens = [bytes([b]) for b in range(256)]  # id -> bytes
    token_id = {t: i for i, t in enumerate(tokens)}
    # words[w]: the current token ids of distinct chunk w; weights[w]: how often the chunk occurs.
    words = [list(chunk.encode("utf-8", errors="surrogateescape")) for chunk in chunk_counts]
    weights = list(chunk_counts.values())
    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, weight) in enumerate(zip(words, weights, strict=True)):
        for pair in pairwise(word):
            pair_count[pair] = pair_count.get(pair, 0) + weight
            where.setdefault(pair, set()).add(w)
    # Heap entries: (-count, left bytes, right bytes, pair); Python's heap pops the smallest, i.e. the most
    # frequent pair, ties going to the smallest (left bytes, right bytes).
    heap = [(-c, tokens[a], tokens[b], (a, b)) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    bar = tqdm(total=max(0, n_tokens - 256), desc="merging", unit="merge", disable=not progress)
    while len(tokens) < n_tokens and heap:
        neg, _, _, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if count <= 0:  # the pair no longer occurs (a merge consumed every instance): never merge it
            continue
        if count != -neg:  # stale entry: counts only fall for old pairs, so push it back as it is now
            if count > 0:
                heapq.heappush(heap, (-count, tokens[pair[0]], tokens[pair[1]], pair))
            continue
        a, b = pair
        new_bytes = tokens[a] + tokens[b]
        new = token_id.get(new_bytes)
        if new is None:  # usually; (ab, c) and (a, bc) can both make "abc", which stays one token
            new = token_id[new_bytes] = len(tokens)
            tokens.append(new_bytes)
            bar.update()
        grown = _apply_merge(pair, new, words, weights, pair_count, where)
        for p in grown:
            heapq.heappush(heap, (-pair_count[p], tokens[p[0]], tokens[p[1]], p))
    bar.close()
    return tokens


def _apply_merge(pair, new, words, weights, pair_count, where) -> set[tuple[int, int]]:
    """Rewrite every chunk holding `pair` with `new`, adjusting only the counts next to each rewrite:
    in x a b y, the pairs (x, a) and (b, y) lose the chunk's weight, and (x, new) and (new, y) gain it.
    Returns the pairs that gained (all hold `new`), which the caller pushes onto the heap.

    `where[p]` may keep chunks that no longer hold p (removing them would cost more than skipping them here:
    such a chunk is scanned and left as it is)."""
    a, b = pair
    grown = set()
    for w in where.pop(pair):
        word, weight = words[w], weights[w]
        merged, i, n = [], 0, len(word)
        while i < n:  # left to right, non-overlapping: "aaa" with (a, a) -> [aa, a]
            if word[i] == a and i + 1 < n and word[i + 1] == b:
                if merged:  # left neighbour x (already rewritten if it was an earlier occurrence: then x = new)
                    x = merged[-1]
                    pair_count[(x, a)] -= weight
                    gained = (x, new)
                    pair_count[gained] = pair_count.get(gained, 0) + weight
                    grown.add(gained)
                    where.setdefault(gained, set()).add(w)
                if i + 2 < n:  # right neighbour y
                    y = word[i + 2]
                    pair_count[(b, y)] -= weight
                    gained = (new, y)
                    pair_count[gained] = pair_count.get(gained, 0) + weight
                    grown.add(gained)
                    where.setdefault(gained, set()).add(w)
                merged.append(new)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        words[w] = merged
    pair_count.pop(pair, None)  # every occurrence was rewritten
    return grown
