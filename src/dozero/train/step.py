"""One optimizer step, the heart of training, as a callable the loop and the benchmark share.

    step = Stepper(model, raw_model, optimizer, loader, cfg, accum, device, dtype, scaler)
    loss, applied = step(index)     # index: 0-based optimizer step (sets the learning rate)

What it does (course chapter 5; nanoGPT train.py):
    for each of `accum` micro-batches:
        logits = model(x)                          teacher forcing: every position predicts the next token
        loss = cross_entropy(logits, y) / accum    the mean over all micro-batches ends up in .grad
        loss.backward()                            (DDP all-reduces the gradients on the last one only)
    clip the global gradient norm; AdamW step at lr_at(index); zero the gradients (set_to_none: no memset).

Legend: B micro-batch size, T context length, V vocabulary size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dozero import runtime
from dozero.train.config import TrainConfig
from dozero.train.optim import lr_at, set_lr


@dataclass
class Stepper:
    model: torch.nn.Module
    """What the forward pass calls: the model, or its compiled / DDP wrapper; (B, T) ids -> (B, T, V) logits."""
    raw_model: torch.nn.Module
    """The plain model (its parameters are clipped)."""
    optimizer: torch.optim.Optimizer
    loader: object
    """Anything with next_batch() -> (x, y), each (B, T)."""
    cfg: TrainConfig
    accum: int
    device: torch.device
    dtype: torch.dtype
    scaler: object = None
    loss_fn: object = None
    """(logits (B, T, V), x, y) -> the loss to minimize; None: next-token cross-entropy (pretraining).
    Distillation (compress/distill.py) passes its KL + cross-entropy mix."""

    def __call__(self, index: int) -> tuple[torch.Tensor, bool]:
        """Optimizer step number `index` (0-based). Returns its mean loss (a device tensor; reading it
        would cost a sync) and whether the step was applied (False: skipped for a NaN/inf)."""
        cfg, accum, device = self.cfg, self.accum, self.device
        set_lr(self.optimizer, lr_at(index, cfg))
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = self.loader.next_batch()  # (B, T) each
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with runtime.no_sync(self.model, skip_sync=micro < accum - 1):
                with mixed_precision(device, self.dtype):
                    logits = self.model(x)  # (B, T, V)
                # Flattened to (B*T, V) vs (B*T,): one mean over every position of every sequence.
                # .float(): under autocast the softmax is computed in float32 (no-op in float32).
                if self.loss_fn is None:
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                else:
                    loss = self.loss_fn(logits, x, y)
                loss_sum += loss.detach()
                loss = loss / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = loss_sum  # stands in when there is no clipping: a NaN loss gives NaN gradients
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip, foreach=True)
        if cfg.on_nan == "skip" and not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)):  # a host sync
            self.optimizer.zero_grad(set_to_none=True)
            return loss_sum / accum, False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself if fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / accum, True


def mixed_precision(device: torch.device, dtype: torch.dtype):
    """The forward pass's precision: runtime.autocast (matmuls in `dtype`, float32 weights and AdamW
    states), and on a CPU under bfloat16 the attention kernel itself in float32 (`Float32Attention`)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        stack = contextlib.ExitStack()
        stack.enter_context(runtime.autocast(device, dtype))
        stack.enter_context(Float32Attention())
        return stack
    return runtime.autocast(device, dtype)


class Float32Attention(TorchFunctionMode):
    """Runs F.scaled_dot_product_attention in float32 under CPU autocast; every other op as autocast says.

    PyTorch 2.13's CPU flash-attention backward is about 5x slower in bfloat16 than in float32 (12 x 4 x
    64 x 32, forward + backward: 26 vs 5 ms on this project's Xeon), which made a whole bf16 step slower
    than a float32 one (97 vs 81 ms, 1 thread) although its matrix products run ~3x faster on AMX; with
    attention in float32 the bf16 step took 76 ms vs float32's 96 (benchmarks/train_speed.py --bf16).
    Applied from outside (a mode over the forward pass), so the model file stays one plain module."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args  # (B, nh, T, hs), (B, nkv, S, hs) x 2
            with torch.autocast("cpu", enabled=False):
                return func(q.float(), k.float(), v.float(), *rest, **kwargs)
        return func(*args, **kwargs)
