"""Cleaning: Unicode normalization, junk lines, quality filters, PII scrubbing, exact and near deduplication.

    cfg = CleanConfig()                          # every step on, defaults below
    result = clean_document(text, cfg)           # per document: pure, runs in worker processes
    result.text or result.reason                 # the cleaned text, or why the document was dropped
    dedup = Deduplicator(cfg)                    # across documents: runs in the main process, in order
    dedup.is_duplicate(result) -> None | "exact_duplicate" | "near_duplicate"

The course's survey of pretraining data names these steps: quality filtering, deduplication and
removal of private information. Thresholds follow the Gopher rules (Rae et al. 2021, "Scaling
Language Models", appendix A: drop documents whose repeated lines hold over 20% of the characters)
where they apply; each can be changed or switched off from the command line (`dozero data prepare --help`).

Order per document (worker): normalize -> drop junk lines -> document filters -> scrub PII.
Then (main process, in corpus order, so the result does not depend on the number of workers):
exact dedup -> near dedup. Deduplicating after scrubbing means two copies that differed only by an
e-mail address count as the same text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, field

import numpy as np

from dozero.data.pii import PLACEHOLDERS, scrub_pii
from dozero.errors import DozeroError

NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")


@dataclass
class CleanConfig:
    clean: bool = True
    """Master switch: --no-clean keeps every document exactly as read (no step below runs)."""
    normalize: str = "NFC"
    """Unicode normal form applied to every document (NFC, NFKC, NFD, NFKD or none); also turns CRLF into LF."""
    drop_long_word_lines: bool = True
    """Drop lines holding a 'word' (run of non-space characters) longer than --max-word-chars:
    base64 blobs, minified code."""
    max_word_chars: int = 250
    """Longest acceptable word, in characters (long URLs are ~100-200)."""
    min_chars: int = 50
    """Drop documents shorter than this many characters after cleaning (0: keep all)."""
    min_alpha_ratio: float = 0.4
    """Drop documents where letters are fewer than this share of the non-space characters (0: off). English
    prose is ~0.8, Python source ~0.6, tables of numbers and symbol junk far lower."""
    max_dup_line_ratio: float = 0.2
    """Drop documents where lines repeating an earlier line hold more than this share of the characters
    (1: off). Gopher's rule and threshold; counting characters, not lines, spares plays and code, whose
    short repeated lines (speaker names, 'else:') are structure, not boilerplate."""
    scrub_pii: bool = True
    """Replace e-mail addresses, phone numbers (international, North American, Brazilian), IP addresses,
    card numbers (Luhn-checked) and Brazilian CPF/CNPJ numbers by <EMAIL>, <PHONE>, <IP_ADDRESS>,
    <CARD_NUMBER>, <CPF>, <CNPJ>."""
    dedup: bool = True
    """Drop exact duplicates: documents whose text, lowercased with whitespace collapsed, was seen before."""
    near_dedup: bool = True
    """Drop near duplicates: MinHash + LSH (datasketch) over word 5-grams. Memory grows with the number of
    kept documents (~0.85 KB each); switch off for corpora of many millions of documents."""
    near_dup_threshold: float = 0.8
    """Estimated Jaccard similarity (of word 5-gram sets) above which a document is a near duplicate."""

    def __post_init__(self):
        if self.normalize not in NORMAL_FORMS:
            raise DozeroError(f"--normalize {self.normalize!r} is not one of {', '.join(NORMAL_FORMS)}")
        if not 0 < self.near_dup_threshold <= 1:
            raise DozeroError(f"--near-dup-threshold must be in (0, 1], got {self.near_dup_threshold}")


# Near-dup settings, fixed on purpose (why these): word 5-grams and Jaccard 0.8 are the settings of
# Lee et al. 2022 ("Deduplicating Training Data Makes Language Models Better"), which we keep. They used
# 9,000 permutations; 128 gives an estimate with standard error sqrt(J(1-J)/128) = 0.035 at J = 0.8,
# enough to separate real copies (J > 0.9) from related texts (J < 0.5), at 512 bytes of signature per
# document. The LSH bands come from datasketch too (see Deduplicator).
NUM_PERM = 128
SHINGLE_WORDS = 5
MINHASH_SEED = 1
# Memory: a document is hashed a block of ~1 MB of text at a time, and its shingles go into the MinHash
# 16k at a time, so one huge document costs the same few tens of MB as a small one. Hashing a 5 MB
# document in one go had peaked at 958 MB (tracemalloc): datasketch's update_batch builds a
# (shingles, 128) array, and the word list alone is ~10x the text.
MINHASH_BLOCK_CHARS = 1 << 20
MINHASH_BATCH = 1 << 14
_SPACES = re.compile(r"\s+")  # the stdlib's \s is exactly str.isspace, what str.split() splits on


# ---------------------------------------------------------------- per-document cleaning (workers)
@dataclass
class CleanResult:
    text: str | None  # None: dropped
    reason: str | None = None  # why dropped: "too_short", "low_alpha_ratio", "duplicated_lines", "empty_after_cleaning"
    normalized: bool = False  # normalization changed the text
    long_word_lines: int = 0  # junk lines removed
    pii: dict[str, int] = field(default_factory=dict)  # replacements per kind
    exact_key: bytes = b""  # hash of the normalized text, for exact dedup
    minhash: np.ndarray | None = None  # (NUM_PERM,) uint32 signature, for near dedup
    pii_example: str = ""  # a short redacted snippet around the first placeholder, for the report


def _drop_long_word_lines(text: str, max_word_chars: int) -> tuple[str, int]:
    if not re.search(rf"\S{{{max_word_chars + 1}}}", text):  # fast path: most documents have none
        return text, 0
    kept, dropped = [], 0
    for line in text.split("\n"):
        if any(len(w) > max_word_chars for w in line.split()):
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


def duplicated_line_ratio(text: str) -> float:
    """Share of the characters (of non-empty lines) that sit in lines repeating an earlier line."""
    seen: set[str] = set()
    total = duplicated = 0
    for line in text.split("\n"):
        line = line.strip()
        total += len(line)
        if line in seen:
            duplicated += len(line)
        elif line:
            seen.add(line)
    return duplicated / total if total else 0.0


def alpha_ratio(text: str) -> float:
    """Share of letters among the non-space characters (no list of words: a huge document stays cheap)."""
    non_space = len(_SPACES.sub("", text))
    return sum(map(str.isalpha, text)) / non_space if non_space else 0.0


def exact_key(text: str) -> bytes:
    """Hash of the text lowercased with whitespace collapsed: copies differing only in spacing/case collide."""
    return hashlib.blake2b(_SPACES.sub(" ", text.lower()).strip().encode("utf-8"), digest_size=16).digest()


_PERMUTATIONS = None


def _text_blocks(text: str):
    """`text` in pieces of about MINHASH_BLOCK_CHARS, cut at whitespace so that no word is split."""
    start = 0
    while start < len(text):
        end = start + MINHASH_BLOCK_CHARS
        if end < len(text):
            space = _SPACES.search(text, end)
            end = space.start() if space else len(text)
        yield text[start:end]
        start = end


def _shingle_hashes(text: str):
    """uint64 hashes of the word 5-grams of `text` (lowercased), one block of text at a time. Each word is
    hashed once (map: a C-level loop) and 5 consecutive word hashes are combined with numpy into one hash
    per shingle, instead of building and hashing one 5-word string per word: twice as fast (measured)."""
    carry = np.empty(0, dtype=np.uint64)  # the last words of the previous block: shingles span blocks
    any_shingle = False
    for piece in _text_blocks(text):
        words = piece.lower().split()
        new = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
        word_hashes = np.concatenate([carry, new])
        n = len(word_hashes) - SHINGLE_WORDS + 1
        if n > 0:
            yield _combine(word_hashes, n)
            any_shingle = True
            word_hashes = word_hashes[n:]
        carry = word_hashes
    if not any_shingle:  # under 5 words in all: one shingle of them all (of none: hash 0)
        yield _combine(carry, 1)


def _combine(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """(n,) hashes of the windows word_hashes[i : i + SHINGLE_WORDS] (shorter if there are fewer words)."""
    shingle_hashes = np.zeros(n, dtype=np.uint64)
    for k in range(min(SHINGLE_WORDS, len(word_hashes))):
        shingle_hashes = shingle_hashes * np.uint64(0x100000001B3) + word_hashes[k : k + n]  # wraps mod 2^64
    return shingle_hashes


def minhash_signature(text: str) -> np.ndarray:
    """MinHash of the set of word 5-grams (lowercased), (NUM_PERM,) uint32; memory bounded (see MINHASH_BATCH)."""
    global _PERMUTATIONS
    from datasketch import MinHash

    if _PERMUTATIONS is None:  # generating them costs ~0.1 ms; do it once per process
        _PERMUTATIONS = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED).permutations
    # The values are already 32-bit hashes: hashfunc=int passes them through (datasketch mixes them further).
    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, hashfunc=int, permutations=_PERMUTATIONS, scheme="affine32")
    for hashes in _shingle_hashes(text):
        # 64 -> 32 bits by folding both halves (the high half alone is 0 for a one-word document, whose hash is
        # one crc32: every one-word document had looked like every other). np.unique: repeats change no minimum.
        shingles = np.unique(((hashes >> np.uint64(32)) ^ hashes).astype(np.uint32))
        for i in range(0, len(shingles), MINHASH_BATCH):
            m.update_batch(shingles[i : i + MINHASH_BATCH].tolist())
    return m.hashvalues


def clean_document(text: str, cfg: CleanConfig) -> CleanResult:
    """Everything that looks at one document alone. Pure: the same text and config give the same result."""
    result = CleanResult(text=None)
    if not cfg.clean:
        result.text = text
        return result
    if cfg.normalize != "none":
        normalized = unicodedata.normalize(cfg.normalize, text.replace("\r\n", "\n"))
        result.normalized = normalized != text
        text = normalized
    if cfg.drop_long_word_lines:
        text, result.long_word_lines = _drop_long_word_lines(text, cfg.max_word_chars)
    text = text.strip("\n")
    if not text.strip():
        result.reason = "empty_after_cleaning"
    elif len(text) < cfg.min_chars:
        result.reason = "too_short"
    elif cfg.min_alpha_ratio > 0 and alpha_ratio(text) < cfg.min_alpha_ratio:
        result.reason = "low_alpha_ratio"
    elif cfg.max_dup_line_ratio < 1 and duplicated_line_ratio(text) > cfg.max_dup_line_ratio:
        result.reason = "duplicated_lines"
    if result.reason:
        return result
    if cfg.scrub_pii:
        text = scrub_pii(text, result.pii)
        if result.pii:  # the report shows the placeholder in context, never the personal data itself
            at = min(i for i in (text.find(p) for p in PLACEHOLDERS.values()) if i >= 0)
            result.pii_example = " ".join(text[max(0, at - 40) : at + 60].split())
    result.text = text
    if cfg.dedup:
        result.exact_key = exact_key(text)
    if cfg.near_dedup:
        result.minhash = minhash_signature(text)
    return result


# ---------------------------------------------------------------- across documents (main process)
class Deduplicator:
    """Remembers the documents kept so far, in corpus order.

    Near dedup is LSH banding (Leskovec et al., "Mining of Massive Datasets", ch. 3.4): the 128-value
    signature is cut into b bands of r rows; two documents are candidates if any band is equal, which
    happens with probability 1 - (1 - J^r)^b. We take (b, r) from datasketch's `MinHashLSH`, which
    chooses them to minimize false positives + negatives around the threshold (0.8 -> 9 bands of 13).
    We keep the bands in one set of 64-bit digests instead of datasketch's index because we only ever
    ask "was any band seen before?". Measured (tracemalloc, 20k documents): 2.9 KB per document in
    `MinHashLSH`; 0.85 KB here for both dedup steps. So 1 M kept documents cost ~0.85 GB: the one part
    of `prepare` whose memory grows with the corpus.
    """

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.bands: set[int] = set()
        if cfg.near_dedup:
            from datasketch import MinHashLSH

            lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=NUM_PERM)
            self.band_ranges = [(i * lsh.r, (i + 1) * lsh.r) for i in range(lsh.b)]

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        return [
            int.from_bytes(hashlib.blake2b(signature[lo:hi].tobytes(), digest_size=8, person=bytes([i])).digest())
            for i, (lo, hi) in enumerate(self.band_ranges)
        ]

    def is_duplicate(self, result: CleanResult) -> str | None:
        """ "exact_duplicate", "near_duplicate" or None (and then the document is remembered)."""
        if self.cfg.dedup:
            if result.exact_key in self.seen:
                return "exact_duplicate"
            self.seen.add(result.exact_key)
        if self.cfg.near_dedup:
            keys = self._band_keys(result.minhash)
            if any(k in self.bands for k in keys):
                return "near_duplicate"
            self.bands.update(keys)
        return None


# ---------------------------------------------------------------- the report
DROP_REASONS = ("empty_after_cleaning", "too_short", "low_alpha_ratio", "duplicated_lines")
N_EXAMPLES = 3


def _snippet(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


class CleanReport:
    """Counts and a few examples of what each step removed or changed (JSON and a short summary)."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.documents = self.kept = 0
        self.normalized = self.long_word_lines = self.long_word_docs = self.pii_docs = 0
        self.pii: dict[str, int] = {}
        self.removed: dict[str, int] = {r: 0 for r in (*DROP_REASONS, "exact_duplicate", "near_duplicate")}
        self.examples: dict[str, list] = {}

    def _example(self, step: str, item) -> None:
        bucket = self.examples.setdefault(step, [])
        if len(bucket) < N_EXAMPLES:
            bucket.append(item)

    def add(self, source: str, raw_text: str, result: CleanResult, duplicate: str | None = None) -> None:
        """Account for one document: `result` from `clean_document`, `duplicate` from `Deduplicator`."""
        self.documents += 1
        self.normalized += result.normalized
        if result.long_word_lines:
            self.long_word_lines += result.long_word_lines
            self.long_word_docs += 1
            self._example("junk_lines", {"source": source, "lines_removed": result.long_word_lines})
        reason = result.reason or duplicate
        if reason:
            self.removed[reason] += 1
            self._example(reason, {"source": source, "text": _snippet(raw_text)})
            return
        self.kept += 1
        if result.pii:
            self.pii_docs += 1
            for kind, n in result.pii.items():
                self.pii[kind] = self.pii.get(kind, 0) + n
            self._example("pii", {"source": source, "replaced": result.pii, "text": result.pii_example})

    def to_dict(self) -> dict:
        cfg, ex = self.cfg, self.examples
        quality = {r: self.removed[r] for r in DROP_REASONS}
        return {
            "enabled": cfg.clean,
            "documents_in": self.documents,
            "documents_kept": self.kept,
            "steps": {
                "normalize": {"form": cfg.normalize, "documents_changed": self.normalized},
                "junk_lines": {"enabled": cfg.drop_long_word_lines, "max_word_chars": cfg.max_word_chars,
                               "lines_removed": self.long_word_lines, "documents_touched": self.long_word_docs,
                               "examples": ex.get("junk_lines", [])},
                "quality_filter": {"min_chars": cfg.min_chars, "min_alpha_ratio": cfg.min_alpha_ratio,
                                   "max_dup_line_ratio": cfg.max_dup_line_ratio, "removed": quality,
                                   "examples": {r: ex[r] for r in DROP_REASONS if r in ex}},
                "pii": {"enabled": cfg.scrub_pii, "replaced": dict(sorted(self.pii.items())),
                        "documents_touched": self.pii_docs, "examples": ex.get("pii", [])},
                "exact_dedup": {"enabled": cfg.dedup, "removed": self.removed["exact_duplicate"],
                                "examples": ex.get("exact_duplicate", [])},
                "near_dedup": {"enabled": cfg.near_dedup, "threshold": cfg.near_dup_threshold, "num_perm": NUM_PERM,
                               "shingle_words": SHINGLE_WORDS, "removed": self.removed["near_duplicate"],
                               "examples": ex.get("near_duplicate", [])},
            },
        }  # fmt: skip

    def summary(self) -> str:
        if not self.cfg.clean:
            return f"cleaning off (--no-clean): {self.documents:,} documents kept as read"
        d = self.to_dict()["steps"]
        quality = ", ".join(f"{n:,} {r.replace('_', ' ')}" for r, n in d["quality_filter"]["removed"].items() if n)
        pii = ", ".join(f"{n:,} {k}" for k, n in d["pii"]["replaced"].items())
        lines = [
            f"documents: {self.documents:,} in, {self.kept:,} kept ({self.documents - self.kept:,} removed)",
            f"  normalize ({self.cfg.normalize}): {self.normalized:,} documents changed",
            f"  junk lines (words > {self.cfg.max_word_chars} chars): {self.long_word_lines:,} lines removed "
            f"from {self.long_word_docs:,} documents",
            f"  quality filters: {quality or 'nothing removed'}",
            f"  personal data replaced: {pii or 'none found'} (in {self.pii_docs:,} documents)",
            f"  exact duplicates removed: {self.removed['exact_duplicate']:,}",
            f"  near duplicates removed: {self.removed['near_duplicate']:,}",
        ]
        return "\n".join(lines)
