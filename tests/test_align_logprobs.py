"""Answer log-probs (dozero.align.logprobs) with the output head run only at the scored positions equal
the full-vocabulary log_softmax over every position: values and gradients, GPT-2 and Llama-style blocks,
with LoRA and its switched-off reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dozero.align.logprobs import sequence_logprobs, token_logprobs
from dozero.align.step import lora_disabled
from dozero.config import ModelConfig
from dozero.finetune.data import IGNORE
from dozero.finetune.lora import LoRAConfig, apply_lora
from dozero.model.gpt import GPTModel

GPT2 = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)
LLAMA = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, norm="rmsnorm",
                    pos_emb="rope", ff="swiglu", ff_hidden_dim=48, bias=False)  # fmt: skip


def full_vocabulary(model, x, y):
    """The computation before: logits at every position, log_softmax over the vocabulary, gather."""
    return -F.cross_entropy(model(x).transpose(1, 2), y, ignore_index=IGNORE, reduction="none")  # (B, T)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (3, 12), generator=g)
    y = torch.randint(0, 97, (3, 12), generator=g)
    y[0, :5] = IGNORE  # a prompt
    y[1, :2], y[1, 9:] = IGNORE, IGNORE  # a prompt and padding
    y[2, :11] = IGNORE  # a one-token answer
    return x, y


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_scored_positions_equal_the_full_vocabulary(cfg):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    x, y = batch()
    expected = full_vocabulary(model, x, y)
    (expected.sum(dim=1) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)
    ours = token_logprobs(model, x, y)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert bool((ours[y == IGNORE] == 0).all()) and bool((ours[y != IGNORE] < 0).all())
    (sequence_logprobs(model, x, y) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    ours_grads = grads(model)
    assert len(ours_grads) == len(expected_grads) == len(list(model.parameters()))
    for a, b in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert isinstance(model.out_head, torch.nn.Linear)  # the head is put back


def test_lora_and_its_switched_off_reference():
    torch.manual_seed(1)
    base = GPTModel(GPT2)
    x, y = batch(1)
    with torch.no_grad():
        before = full_vocabulary(base, x, y)
    apply_lora(base, LoRAConfig(rank=4))
    for name, p in base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # LoRA's B starts at 0: move it, so the adapters count
    ours = token_logprobs(base, x, y)
    torch.testing.assert_close(ours, full_vocabulary(base, x, y), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, before, atol=1e-3)
    with torch.no_grad(), lora_disabled(base):
        torch.testing.assert_close(token_logprobs(base, x, y), before, atol=1e-5, rtol=1e-5)
