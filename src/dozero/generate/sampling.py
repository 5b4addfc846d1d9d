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

from dataclasses import dataclass

import torch

from dozero.errors import DozeroError


@dataclass
class SamplingConfig:
    """How the next token is chosen from the logits. Filters combine: top-k, then top-p, then min-p."""

    temperature: float = 0.8
    """Divide the logits by this before sampling: <1 sharper, >1 flatter; 0 = greedy (always the most likely token)."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens (0 or None = no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probabilities add up to top_p (1 = off)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely token's probability (0 = off)."""
    repetition_penalty: float = 1.0
    """Make tokens already in the text less likely (CTRL, Keskar et al. 2019): positive logits are divided by it,
    negative ones multiplied. 1 = off; 1.1-1.3 is typical."""
    frequency_penalty: float = 0.0
    """Subtract this times a token's count in the text from its logit (OpenAI's frequency penalty). 0 = off."""

    def __post_init__(self) -> None:
        if self.top_k == 0:  # the command line's way to say "no limit"
            self.top_k = None
        self.validate()

    def validate(self) -> None:
        if self.temperature < 0:
            raise DozeroError(
                f"temperature must be >= 0, got {self.temperature}; use 0 for greedy decoding, about 0.8 for sampling"
            )
        if self.top_k is not None and self.top_k < 1:
            raise DozeroError(f"top_k must be >= 1 (or None/0 for no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise DozeroError(f"top_p must be in (0, 1], got {self.top_p}; 1 turns nucleus sampling off")
        if not 0.0 <= self.min_p <= 1.0:
            raise DozeroError(f"min_p must be in [0, 1], got {self.min_p}; 0 turns it off")
        if self.repetition_penalty <= 0:
            raise DozeroError(f"repetition_penalty must be > 0, got {self.repetition_penalty}; 1 turns it off")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_counts(self) -> bool:
        """Whether the penalties need the per-token counts of the text so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0


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
