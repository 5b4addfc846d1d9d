"""Log-probabilities of answers under a model: the quantity DPO, RL and their KL penalties are made of.

    logps = sequence_logprobs(model, x, y)     # (B,) sum of log p(answer token) over each answer
    per_token = token_logprobs(logits, y)      # (B, T) log p(y_t | x_<=t), 0 where y is IGNORE

x, y are what finetune.data.collate makes: inputs and next-token targets, IGNORE (-100) on the prompt,
the chat template's own words and padding, so only the answer counts (LLMs-from-scratch's DPO
notebook, `compute_logprobs`; TRL sums the same per-token log-probs over its completion mask).

Legend: B sequences, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dozero.finetune.data import IGNORE


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) targets -> (B, T) log-probability of each target, 0 where it is IGNORE.
    cross_entropy computes log_softmax + gather in one fused kernel, in float32 under autocast."""
    return -F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")


def sequence_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) log p(answer | prompt): the summed log-probabilities of every scored target of each row."""
    return token_logprobs(model(x), y).sum(dim=-1)  # (B, T) -> (B,)
