"""Metrics, each a small pure function, with the definitions of lm-evaluation-harness where it has one.

acc          1 if the choice with the highest log-likelihood is the right one (first one on a tie)
acc_norm     the same after dividing each log-likelihood by its choice's length in characters
             (lm-eval 0.4 api/task.py `completion_len = len(choice)`: characters, not tokens, so
             tokenizers compare; for ASCII text characters are bytes)
stderr       sample standard deviation (n - 1) / sqrt(n), lm-eval's `mean_stderr`
perplexity   exp(mean negative log-likelihood per token): depends on the tokenizer
bits/byte    total negative log-likelihood in bits / UTF-8 bytes of the text: comparable across
             tokenizers, since every tokenizer reads the same bytes
pass@k       Chen et al. 2021's unbiased estimator 1 - C(n - c, k) / C(n, k)
"""

from __future__ import annotations

import math
import re


def argmax(values: list[float]) -> int:
    """Index of the largest value; the first one on a tie (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_metrics(logprobs: list[float], gold: int, choices: list[str]) -> dict[str, float]:
    """acc and acc_norm of one question."""
    normalized = [lp / max(1, len(c)) for lp, c in zip(logprobs, choices, strict=True)]
    return {"acc": float(argmax(logprobs) == gold), "acc_norm": float(argmax(normalized) == gold)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: list[float]) -> float | None:
    """Standard error of the mean; None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def perplexity(nll_nats: float, tokens: int) -> float:
    return math.exp(nll_nats / tokens)


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    return nll_nats / math.log(2) / num_bytes


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (of which `correct` pass) passes."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - correct + 1, n + 1))


NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(text: str) -> str | None:
    """The number a GSM8K answer ends on: after '####' if present, else the last number in the text;
    commas, '$' and a trailing '.' removed, '18.00' -> '18' (so equal values compare equal)."""
    if "####" in text:
        text = text.split("####")[-1]
    found = NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or "0"


def exact_match(prediction: str | None, reference: str | None) -> float:
    return float(prediction is not None and prediction == reference)
