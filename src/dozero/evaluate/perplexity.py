"""Perplexity and bits per byte of a text file or of a prepared data folder's validation split.

The text is read in windows of context_length + 1 tokens that overlap by one token, so every token
after the first is predicted exactly once, from up to a full context of the text before it (the
first window starts from end-of-text, as lm-eval's rolling log-likelihood does).

Bits per byte divides the total loss in bits by the text's UTF-8 bytes: unlike perplexity (per
token) it does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from dozero.errors import DozeroError
from dozero.evaluate import metrics
from dozero.evaluate.scoring import start_token


def read_eval_tokens(path: str | os.PathLike, tokenizer, max_tokens: int | None) -> tuple[list[int], int, str]:
    """(token ids, UTF-8 bytes they stand for, what was read) of a text file or a data folder's val split."""
    from dozero.data.shards import is_data_folder, load_split
    from dozero.files import input_path

    p = Path(input_path(path))
    if p.is_dir():
        if not is_data_folder(p):
            raise DozeroError(f"{p} is neither a text file nor a prepared data folder (dozero data prepare)")
        tokens = load_split(p, "val", tokenizer)
        ids = [int(t) for t in tokens[: min(len(tokens), max_tokens or len(tokens))]]
        return ids, len(tokenizer.decode_bytes(ids[1:])), f"{p} (val split)"  # the first token is not predicted
    if not p.is_file():
        raise DozeroError(f"perplexity text '{path}' not found: give a text file or a prepared data folder")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DozeroError(f"{p} is not UTF-8 text ({e})") from None
    ids = start_token(tokenizer) + tokenizer.encode(text, special="text")
    if max_tokens is not None and len(ids) > max_tokens + 1:
        ids = ids[: max_tokens + 1]
        return ids, len(tokenizer.decode_bytes(ids[1:])), str(p)
    return ids, len(text.encode("utf-8")), str(p)


def text_loss(model, ids: list[int]) -> tuple[float, int]:
    """(sum of negative log-likelihoods in nats, tokens predicted) over `ids`, window by window."""
    ctx = model.cfg.context_length
    if len(ids) < 2:
        raise DozeroError("the text is too short to measure: it needs at least one token to predict")
    device = model.tok_emb.weight.device
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, ctx):
            window = ids[s : s + ctx + 1]
            x = torch.tensor([window[:-1]], device=device)  # (1, T)
            y = torch.tensor(window[1:], device=device)  # (T,)
            logits = model(x)[0].float()  # (T, V)
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
    return total, count


def evaluate_text(model, tokenizer, path, max_tokens: int | None = None) -> dict:
    """A report-card entry: perplexity and bits per byte of `path`."""
    start = time.perf_counter()
    ids, num_bytes, what = read_eval_tokens(path, tokenizer, max_tokens)
    was_training = model.training
    model.eval()
    try:
        nll, count = text_loss(model, ids)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return {
        "task": f"perplexity:{Path(path).name}",
        "source": what,
        "n": count,
        "metrics": {
            "perplexity": {"score": metrics.perplexity(nll, count), "stderr": None, "higher_is_better": False},
            "bits_per_byte": {
                "score": metrics.bits_per_byte(nll, num_bytes),
                "stderr": None,
                "higher_is_better": False,
            },
        },
        "random": {"bits_per_byte": None},
        "note": "bits per byte is comparable across tokenizers; perplexity is per token of this tokenizer",
        "bytes": num_bytes,
        "seconds": seconds,
    }
