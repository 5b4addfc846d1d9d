"""bf16 mixed precision on the CPU (`dozero train --dtype bfloat16`): attention in float32, matmuls in
bf16, and a loss curve that stays with float32's."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dozero.config import get_model_config
from dozero.data.loader import RandomWindowLoader
from dozero.model.gpt import GPTModel
from dozero.train.config import get_train_preset
from dozero.train.corpus import load_corpus
from dozero.train.optim import make_optimizer
from dozero.train.step import Stepper, mixed_precision

CPU = torch.device("cpu")


def test_cpu_bf16_runs_attention_in_float32_and_the_matmuls_in_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))  # (B, nh, T, hs)
    linear = torch.nn.Linear(8, 8)
    with mixed_precision(CPU, torch.bfloat16):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = linear(y)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert y.dtype == torch.float32 and torch.equal(y, exact)  # the float32 kernel on float32 inputs
    assert out.dtype == torch.bfloat16  # autocast still lowers the matrix products
    (grad_q,) = torch.autograd.grad(y.sum(), q)
    assert grad_q.dtype == torch.float32
    # Plain autocast (the old path, and nanoGPT's under autocast) ran attention in bf16:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.scaled_dot_product_attention(q, k, v, is_causal=True).dtype == torch.bfloat16
    # Outside the context nothing is left behind; float32 and GPUs get plain autocast.
    assert F.scaled_dot_product_attention(q, k, v, is_causal=True).dtype == torch.float32
    with mixed_precision(CPU, torch.float32):
        assert linear(y).dtype == torch.float32


def _val_loss_after(steps: int, dtype: torch.dtype) -> float:
    """The shakespeare-char model after `steps` training steps of its preset (batch 12 x 64), its mean
    float32 loss on 8 fixed validation batches."""
    cfg = dataclasses.replace(get_train_preset("shakespeare-char"), max_steps=steps, warmup_steps=10)
    corpus = load_corpus(cfg)
    shape = dataclasses.replace(get_model_config(cfg.model), vocab_size=corpus.tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = GPTModel(shape).train()
    loader = RandomWindowLoader(corpus.train, cfg.micro_batch_size, shape.context_length, cfg.seed)
    step = Stepper(model, model, make_optimizer(model, cfg, CPU), loader, cfg, 1, CPU, dtype)
    for index in range(steps):
        step(index)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    val = RandomWindowLoader(corpus.val, 12, shape.context_length, seed=0)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()) for x, y in (val.next_batch() for _ in range(8))]
    return float(torch.stack(losses).mean())


def test_cpu_bf16_training_follows_the_float32_loss_curve():
    # Measured: 2.6064 (float32) vs 2.6063 (bf16) after 60 steps.
    fp32, bf16 = _val_loss_after(60, torch.float32), _val_loss_after(60, torch.bfloat16)
    assert fp32 < 2.7  # it learned (ln 65 = 4.17 at the start)
    assert abs(bf16 - fp32) < 0.01, (fp32, bf16)
