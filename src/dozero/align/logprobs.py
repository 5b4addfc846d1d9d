"""Log-probabilities of answers under a model: the quantity DPO, RL and their KL penalties are made of.

    logps = sequence_logprobs(model, x, y)     # (B,) sum of log p(answer token) over each answer
    per_token = token_logprobs(model, x, y)    # (B, T) log p(y_t | x_<=t), 0 where y is IGNORE

x, y are what finetune.data.collate makes: inputs and next-token targets, IGNORE (-100) on the prompt,
the chat template's own words and padding, so only the answer counts (LLMs-from-scratch's DPO
notebook, `compute_logprobs`; TRL sums the same per-token log-probs over its completion mask).

Why not log_softmax over the whole (B, T, V) logits: with SmolLM2's 49,152-word vocabulary the logits
of 16 rollouts of ~60 tokens are ~190 MB in float32, and log_softmax keeps a second copy for the
backward pass, where the answers are a fifth of the positions. So the body runs with the output head
switched off, the hidden states of the N positions that predict an answer token are picked, and the
head runs on those alone; each log-probability is logit[target] - logsumexp(logits), which keeps only
the (N, V) logits for the backward pass (tests/test_align_logprobs.py: equal to the full computation,
values and gradients; the measured step is in docs/en/alignment.md, "## Memory of a step").

Legend: B sequences, T positions, C width, V vocabulary, N scored positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from dozero.finetune.data import IGNORE


@contextmanager
def without_head(model):
    """The model returning its final-norm hidden states (B, T, C) in place of logits (as the reward model
    does); yields the output head, put back on exit. `model` may be wrapped in DistributedDataParallel."""
    core = getattr(model, "module", model)
    head = core.out_head
    core.out_head = nn.Identity()
    try:
        yield head
    finally:
        core.out_head = head


def answer_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) log p of each scored target (y != IGNORE), row after row, position after position."""
    scored = y != IGNORE  # (B, T)
    with without_head(model) as head:
        hidden = model(x)  # (B, T, C)
    logits = head(hidden[scored]).float()  # (N, C) -> (N, V), float32 under autocast
    picked = logits.gather(1, y[scored].unsqueeze(1)).squeeze(1)  # (N,)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each target, 0 where it is IGNORE."""
    scored = y != IGNORE
    per_token = answer_logprobs(model, x, y)  # (N,)
    return torch.zeros(y.shape, dtype=per_token.dtype, device=y.device).masked_scatter(scored, per_token)


def sequence_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) log p(answer | prompt): the summed log-probabilities of every scored target of each row."""
    return token_logprobs(model, x, y).sum(dim=-1)  # (B, T) -> (B,)
