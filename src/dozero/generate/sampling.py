"""Choosing the next token: pure functions of (logits, generator), as in the course's last chapter.

Take the last position's logits, reshape them (penalties, temperature, top-k, top-p, min-p), turn
them into probabilities and draw one token. Every function here takes logits (B, V) and returns new
logits or token ids; none keeps state, so the same logits and the same seeded `torch.Generator`
always give the same token.

    >>> import torch
    >>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    >>> sample_next_token(logits, SamplingConfig(temperature=0.0)).tolist()
    [0]

Shape legend: B batch size, V vocab_size.
"""

from __future__ import annotations

import torch

from dozero.generate.config import SamplingConfig


def apply_penalties(logits, counts, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0):
    """Penalize tokens that already occur. logits (B, V), counts (B, V): occurrences of each token so far."""
    if repetition_penalty != 1.0:
        seen = counts > 0
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if frequency_penalty != 0.0:
        logits = logits - frequency_penalty * counts.to(logits.dtype)
    return logits


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row, set the rest to -inf. (B, V) -> (B, V)."""
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, p: float):
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p (Holtzman et al. 2019,
    "The Curious Case of Neural Text Degeneration"). The most likely token is always kept. (B, V) -> (B, V)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
    # Drop a token when the tokens before it already reach p; the first token is never dropped.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits, min_p: float):
    """Drop tokens whose probability is below min_p x the top token's (Nguyen et al. 2024). (B, V) -> (B, V)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next_token(logits, config: SamplingConfig, generator: torch.Generator | None = None, counts=None):
    """Logits of the last position (B, V) -> next token ids (B,).

    `counts` (B, V) are the token counts of the text so far, needed only for the penalties.
    """
    logits = logits.float()
    if counts is not None and config.uses_counts:
        logits = apply_penalties(logits, counts, config.repetition_penalty, config.frequency_penalty)
    if config.is_greedy:
        return logits.argmax(dim=-1)  # no softmax needed: the largest logit is the most likely token
    logits = logits / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    logits = min_p_filter(logits, config.min_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
