"""What the trainer reads: a tokenizer plus train and validation token streams.

Three kinds of `--data`:
    (empty)                the tiny-Shakespeare corpus shipped inside dozero (char tokenizer)
    a prepared folder      shards + manifest.json from `dozero data prepare` (its own tokenizer)
    text files / folders   comma-separated .txt files or folders of them, tokenized here; the last
                           `val_fraction` of the tokens is the validation split (nanoGPT's
                           shakespeare_char/prepare.py splits 90/10 by position the same way)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from dozero.errors import DozeroError
from dozero.files import input_path
from dozero.train.config import TrainConfig

PACKAGED_CORPUS = "tinyshakespeare.txt"  # karpathy/char-rnn data/tinyshakespeare/input.txt, public domain


@dataclass
class Corpus:
    tokenizer: object
    train: object  # 1-D token array (numpy) or the data stage's sharded stream
    val: object
    source: str  # for the report: where the text came from


def packaged_text() -> str:
    return (resources.files("dozero") / "assets" / PACKAGED_CORPUS).read_text(encoding="utf-8")


def _text_files(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path = Path(input_path(part)).expanduser()  # "tinyshakespeare": the text shipped with dozero
        if path.is_dir():
            found = sorted(path.rglob("*.txt"))
            if not found:
                raise DozeroError(f"--data {path}: the folder has no manifest.json and no .txt files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DozeroError(f"--data {path}: no such file or folder")
    if not files:
        raise DozeroError("--data is empty; give a prepared data folder or text files")
    return files


def _make_tokenizer(spec: str, text: str):
    from dozero.tokenizer import CharTokenizer, load_tokenizer

    if spec == "char":
        return CharTokenizer.from_text(text)
    return load_tokenizer(spec)


def _split(ids: list[int] | np.ndarray, vocab_size: int, val_fraction: float, where: str):
    from dozero.data.shards import token_dtype

    ids = np.asarray(ids, dtype=token_dtype(vocab_size))  # uint16 for GPT-2's 50257: half of int32's memory
    n_train = int(len(ids) * (1 - val_fraction))
    if n_train < 2 or len(ids) - n_train < 2:
        raise DozeroError(f"{where}: only {len(ids):,} tokens, too few to split into train and validation")
    return ids[:n_train], ids[n_train:]


def load_corpus(cfg: TrainConfig) -> Corpus:
    if not cfg.data:
        text = packaged_text()
        tok = _make_tokenizer(cfg.tokenizer, text)
        train, val = _split(tok.encode(text), tok.vocab_size, cfg.val_fraction, "the packaged corpus")
        return Corpus(tok, train, val, f"packaged {PACKAGED_CORPUS} ({len(text):,} characters)")
    first = Path(cfg.data.split(",")[0].strip()).expanduser()
    if (first / "manifest.json").is_file():
        from dozero.data.shards import load_data_tokenizer, load_split

        tok = load_data_tokenizer(first)
        return Corpus(tok, load_split(first, "train", tok), load_split(first, "val", tok), f"prepared data {first}")
    files = _text_files(cfg.data)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = _make_tokenizer(cfg.tokenizer, "".join(texts))
    # Documents are separated by the end-of-text token where the vocabulary has one (GPT-2's
    # convention), so the model learns where one work ends and the next begins.
    ids: list[int] = []
    for doc in tok.encode_batch(texts) if len(texts) > 1 else [tok.encode(texts[0])]:
        ids += doc
        if tok.eot_id is not None:
            ids.append(tok.eot_id)
    train, val = _split(ids, tok.vocab_size, cfg.val_fraction, f"--data {cfg.data}")
    return Corpus(tok, train, val, f"{len(files)} text file(s) from {cfg.data}")
