"""Tokenizer files: GPT-2's, tiktoken's and Hugging Face's formats, dozero's own, and `load_tokenizer`.

    load_tokenizer("gpt2")                    GPT-2's vocabulary, shipped in dozero/assets (works offline)
    load_tokenizer("runs/shakespeare/best")   whatever tokenizer files a model folder holds
    export_tokenizer(tok, "out/", "hf")       tokenizer.json (+ tokenizer_config.json) for transformers (exports.py)

Formats (all describe the same thing: byte-level BPE ranks + special tokens + a pre-tokenization regex):
  tiktoken  NAME.tiktoken: one "base64(token bytes) rank" line per token, in rank order (tiktoken's own).
  gpt2      encoder.json (token -> id) + vocab.bpe (the merges, one "a b" line each, in rank order), tokens
            written through GPT-2's bytes->characters map (`bpe.bytes_to_unicode`). Hugging Face names the same
            files vocab.json + merges.txt.
  hf        tokenizer.json of the Hugging Face `tokenizers` library: a BPE model with a ByteLevel pre-tokenizer
            (or, for a character vocabulary, one token per character: see exports.py).
  dozero    dozero_tokenizer.json (kind, pattern, special tokens, fingerprint) + dozero_tokenizer.tiktoken
            (the ranks; left out for GPT-2's own vocabulary, which dozero ships).

`gpt2.tiktoken` is OpenAI's GPT-2 vocabulary as packaged by openai-whisper 20250625 (MIT, "Copyright (c) 2022
OpenAI"), byte-identical to tiktoken's r50k_base file (sha256 306cd27f...d930); see shared/data/gpt2/README.txt.
"""

from __future__ import annotations

import base64
import json
import os
from functools import cache
from importlib import resources
from pathlib import Path

from dozero.errors import DozeroError
from dozero.files import atomic_write
from dozero.tokenizer.base import ENDOFTEXT, TOKENIZER_FILE, Tokenizer
from dozero.tokenizer.bpe import GPT2_PATTERN, BPETokenizer, bytes_to_unicode
from dozero.tokenizer.char import CharTokenizer

RANKS_FILE = "dozero_tokenizer.tiktoken"


# ----- tiktoken: base64 ranks -----


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DozeroError(f"{path}:{n}: not a tiktoken ranks line ('base64 rank'): {line[:60]!r}") from None
    return ranks


def tiktoken_text(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in sorted(ranks.items(), key=_rank))


def _rank(item):
    return item[1]


@cache
def _gpt2_ranks() -> dict[bytes, int]:
    with resources.as_file(resources.files("dozero") / "assets" / "gpt2.tiktoken") as path:
        return read_tiktoken(path)


@cache
def gpt2() -> BPETokenizer:
    """GPT-2's tokenizer: 50,256 ranks + <|endoftext|> = 50256, GPT-2's regex. Ids equal tiktoken's "gpt2".
    One shared instance (tokenizers are not changed after construction), so loading it again costs nothing."""
    return BPETokenizer(_gpt2_ranks(), {ENDOFTEXT: 50256}, GPT2_PATTERN, name="gpt2")


# ----- merges <-> ranks (the gpt2 and hf formats store merges; tiktoken and dozero store ranks) -----


def ranks_to_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each multi-byte token, in rank order: run BPE on the token's own bytes using only
    lower ranks; it must end in exactly two parts (the pair that was merged). This is how GPT-2's vocab.bpe is
    recovered from its ranks (shared/data/gpt2/README.txt)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=_rank):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best_rank, i = min(candidates)
            if best_rank >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise DozeroError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _from_vocab_and_merges(vocab: dict[str, int], merges: list[tuple[str, str]], where: str) -> BPETokenizer:
    """encoder.json/vocab.json + merges, in GPT-2's printable-character form -> a BPETokenizer.

    Tokens that are neither a single byte nor made by a merge are special tokens (GPT-2's <|endoftext|>).
    tiktoken's rule "lower id merges first" must agree with the merges' order; GPT-2 and HF-trained
    vocabularies satisfy it, and a vocabulary that does not is refused rather than encoded differently."""
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        return bytes(byte_decoder[c] for c in token)

    merged = {a + b for a, b in merges}
    ranks, specials = {}, {}
    for token, i in vocab.items():
        if token in merged or (len(token) == 1 and token in byte_decoder):
            ranks[to_bytes(token)] = i
        else:
            specials[token] = i
    last = -1
    for a, b in merges:
        i = vocab.get(a + b)
        if i is None or i <= last:
            raise DozeroError(
                f"{where}: merge {a!r} {b!r} is out of order or missing from the vocabulary; "
                "dozero needs ids that follow the merge order (as GPT-2's files do)"
            )
        last = i
    return BPETokenizer(ranks, specials, GPT2_PATTERN, name=Path(where).parent.name or "bpe")


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def read_gpt2_files(vocab_path: Path, merges_path: Path) -> BPETokenizer:
    """encoder.json + vocab.bpe (OpenAI) or vocab.json + merges.txt (Hugging Face)."""
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    return _from_vocab_and_merges(vocab, _read_merges(Path(merges_path)), str(vocab_path))


def printable_vocab_and_merges(tok: BPETokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if tok.pattern != GPT2_PATTERN:
        raise DozeroError("only tokenizers with GPT-2's pre-tokenization pattern can be exported to GPT-2/HF files")
    byte_encoder = bytes_to_unicode()

    def printable(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {printable(t): i for t, i in tok.ranks.items()}
    vocab.update(tok.special_tokens)
    vocab = dict(sorted(vocab.items(), key=_rank))
    merges = [(printable(a), printable(b)) for a, b in ranks_to_merges(tok.ranks)]
    return vocab, merges


def _is_char_tokenizer_json(data: dict) -> bool:
    """dozero's character tokenizer as `exports.hf_tokenizer_json` writes it: single characters, no merges,
    nothing that cuts or alters the text, joined without spaces."""
    model = data.get("model") or {}
    vocab = model.get("vocab")
    return (
        model.get("type") == "BPE"
        and not model.get("merges")
        and isinstance(vocab, dict)
        and all(isinstance(c, str) and len(c) == 1 for c in vocab)
        and sorted(vocab.values()) == list(range(len(vocab)))
        and data.get("pre_tokenizer") is None
        and data.get("normalizer") is None
        and not data.get("added_tokens")
        and (data.get("decoder") or {}).get("type") == "Fuse"
    )


def read_hf_tokenizer_json(path: Path) -> Tokenizer:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise DozeroError(f"{path}: not a Hugging Face tokenizer.json (no 'model' object)")
    if _is_char_tokenizer_json(data):
        return CharTokenizer(sorted(model["vocab"], key=model["vocab"].get))
    pre = json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        raise DozeroError(
            f"{path}: not a byte-level BPE tokenizer (model {model.get('type')!r}); dozero reads "
            "GPT-2-style tokenizer.json files only"
        )
    if '"Split"' in pre:
        raise DozeroError(f"{path}: uses its own pre-tokenization regex; dozero reads GPT-2's pattern only")
    try:
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        vocab = dict(model["vocab"])
        for added in data.get("added_tokens", []):
            vocab.setdefault(added["content"], added["id"])
        return _from_vocab_and_merges(vocab, merges, str(path))
    except (KeyError, TypeError, ValueError) as e:  # a merge that is not a pair, a token not of byte characters
        raise DozeroError(f"{path}: not a complete GPT-2-style tokenizer.json ({type(e).__name__}: {e})") from None


def export_tokenizer(
    tok: Tokenizer, folder: str | os.PathLike, fmt: str = "hf", model_max_length: int | None = None
) -> list[Path]:
    """Write `tok` in another library's format ("hf", "gpt2", "tiktoken", "dozero"); returns the files
    written. Lives in `dozero.tokenizer.exports` (imported when used)."""
    from dozero.tokenizer.exports import export_tokenizer as export

    return export(tok, folder, fmt, model_max_length)


# ----- dozero's own format -----


def save_bpe(tok: BPETokenizer, folder: Path) -> None:
    builtin = tok.fingerprint() == gpt2().fingerprint()
    meta = {
        "format": "dozero-tokenizer",
        "version": 1,
        "kind": "bpe",
        "name": tok.name,
        "pattern": tok.pattern,
        "special_tokens": tok.special_tokens,
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint(),
        "ranks": "builtin:gpt2" if builtin else RANKS_FILE,
    }
    if not builtin:
        atomic_write(folder / RANKS_FILE, tiktoken_text(tok.ranks))
    atomic_write(folder / TOKENIZER_FILE, json.dumps(meta, ensure_ascii=False, indent=1))


def _beside(path: Path, name: str) -> Path:
    """The file `name` that `path` refers to, which must lie in the same folder: a tokenizer description
    from elsewhere could otherwise name "../../x" (or a link out of the folder) and have dozero read it."""
    folder = path.parent.resolve()
    if not isinstance(name, str) or Path(name).name != name or not (folder / name).resolve().is_relative_to(folder):
        raise DozeroError(f"{path}: the ranks file {name!r} is not in {path.parent}; dozero reads only that folder")
    return path.parent / name


def _read_dozero(path: Path) -> Tokenizer:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DozeroError(f"{path}: cannot read the tokenizer description ({e})") from None
    try:
        if meta.get("kind") == "char":
            return CharTokenizer(meta["chars"])
        ranks = _gpt2_ranks() if meta["ranks"] == "builtin:gpt2" else read_tiktoken(_beside(path, meta["ranks"]))
        tok = BPETokenizer(ranks, meta["special_tokens"], meta["pattern"], name=meta.get("name", "bpe"))
    except (KeyError, TypeError, AttributeError) as e:
        raise DozeroError(f"{path}: not a complete dozero tokenizer description ({type(e).__name__}: {e})") from None
    if meta.get("fingerprint") and tok.fingerprint() != meta["fingerprint"]:
        raise DozeroError(
            f"{path}: the ranks do not match the recorded fingerprint; the tokenizer files are "
            "corrupt or were mixed from different tokenizers"
        )
    return tok


# ----- finding tokenizer files -----

# What a folder may hold, in the order they are tried.
_FOLDER_FILES = [
    (TOKENIZER_FILE,),
    ("tokenizer.gguf",),  # a vocabulary-only GGUF: how a model converted from GGUF keeps its tokenizer
    ("tokenizer.json",),
    ("vocab.json", "merges.txt"),
    ("encoder.json", "vocab.bpe"),
]


def has_tokenizer(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(all((folder / n).is_file() for n in names) for names in _FOLDER_FILES)


def load_tokenizer(spec: str | os.PathLike | Tokenizer) -> Tokenizer:
    """ "gpt2", a folder holding tokenizer files (dozero's, tokenizer.json, vocab.json+merges.txt,
    encoder.json+vocab.bpe), or one file (dozero_tokenizer.json, tokenizer.json, *.tiktoken)."""
    if isinstance(spec, Tokenizer):
        return spec
    if str(spec) == "gpt2":
        return gpt2()
    path = Path(spec)
    if path.is_dir():
        for names in _FOLDER_FILES:
            if all((path / n).is_file() for n in names):
                return _read_file(path / names[0])
        raise DozeroError(
            f"no tokenizer files in {path} (looked for {TOKENIZER_FILE}, tokenizer.json, vocab.json + "
            "merges.txt, encoder.json + vocab.bpe); use --tokenizer gpt2 or a model folder"
        )
    if path.is_file():
        return _read_file(path)
    hint = " (a character vocabulary is built from text: CharTokenizer.from_text)" if str(spec) == "char" else ""
    raise DozeroError(f"tokenizer {str(spec)!r} not found: give 'gpt2', a model folder or a tokenizer file{hint}")


def _read_file(path: Path) -> Tokenizer:
    if path.suffix.lower() == ".gguf":  # a GGUF model or vocabulary file: the tokenizer in its metadata
        from dozero.tokenizer.gguf import read_gguf_tokenizer

        return read_gguf_tokenizer(path)
    if path.suffix == ".tiktoken":  # bare ranks: <|endoftext|> goes right after them, as in GPT-2
        ranks = read_tiktoken(path)
        return BPETokenizer(ranks, {ENDOFTEXT: len(ranks)}, GPT2_PATTERN, name=path.stem)
    if path.name in ("encoder.json", "vocab.json"):
        return read_gpt2_files(path, path.with_name("vocab.bpe" if path.name == "encoder.json" else "merges.txt"))
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DozeroError(f"{path}: not a tokenizer file ({e})") from None
    if isinstance(head, dict) and head.get("format") == "dozero-tokenizer":
        return _read_dozero(path)
    if isinstance(head, dict) and "model" in head:
        return read_hf_tokenizer_json(path)
    raise DozeroError(f"{path}: not a tokenizer file dozero knows (dozero, tokenizer.json, encoder.json, .tiktoken)")
