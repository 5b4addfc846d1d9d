"""SmoothQuant-style smoothing: move the activations' outliers into the weights, same function, before int8.

    from dozero.compress.smooth import smooth_activations
    smooth_activations(model, calibration_ids, alpha=0.7)   # in place; the model computes the same thing
    dozero compress quantize --model smollm2-135m-instruct --to int8 --kernel fbgemm --smooth 0.7 --out DIR

FBGEMM's fast int8 kernel (model/quantized.py) rounds each input row to 8 bits with one scale per row,
so a few input channels that are 100x larger than the rest (Llama-style models have them) leave the
others only a few steps. Xiao et al. 2023 ("SmoothQuant") divide every input channel j by

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)       (max|X_j| over calibration tokens)

and multiply the matching weight column by s_j, so x W^T is unchanged. The division is folded into
whatever wrote the input, so nothing is computed at run time:
  * norm1 -> att.qkv and norm2 -> ff.fc: the norm's scale (and LayerNorm's shift) divided by s;
  * SwiGLU's up rows -> ff.proj: silu(gate) * up / s is the proj's input divided by s;
  * the value rows -> att.out_proj: each head's output is a mix of its value rows, so the out
    projection's columns of a head are divided by its key/value head's s (shared in a GQA group).
GELU's output (GPT-2's proj) has nothing linear before it to fold into and is left as it is.

Measured (SmolLM2-135M-Instruct, 1,024 tokens of tinyshakespeare, perplexity fp32 41.40; FBGEMM int8
with 8-bit inputs): no smoothing 59.4, alpha 0.5 47.6, alpha 0.7 44.5, 0.8 45.0, 0.9 45.6. Most of what
is left is the proj's input (with proj on the weight-only path: 41.9).
"""

from __future__ import annotations

import torch

from dozero.compress.calibrate import input_maxima
from dozero.errors import DozeroError


def smoothing_factors(x_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) (module docstring), for a weight (out, in)."""
    w_max = weight.detach().abs().amax(0).float().clamp(min=1e-5)  # (in,)
    return (x_max.clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_activations(model, calibration: torch.Tensor, alpha: float = 0.7):
    """Rescale `model` in place (module docstring) so its linear layers' inputs have smaller outliers;
    the model computes the same function (to fp32 rounding). Returns the model."""
    if not 0.0 < alpha < 1.0:
        raise DozeroError(f"smooth: alpha must be in (0, 1) (0.5-0.8 usual), got {alpha}")
    if any(type(m).__name__ == "QuantizedLinear" for m in model.modules()):
        raise DozeroError("smooth: this model is already quantized; smooth the float model, then quantize")
    was_training = model.training
    maxima = input_maxima(model.eval(), calibration)
    for i, block in enumerate(model.trf_blocks):
        p = f"trf_blocks.{i}."
        for norm, linear, name in ((block.norm1, block.att.qkv, "att.qkv"), (block.norm2, block.ff.fc, "ff.fc")):
            s = smoothing_factors(maxima[p + name], linear.weight, alpha)  # (C,)
            norm.scale.div_(s.to(norm.scale.dtype))
            if getattr(norm, "shift", None) is not None:
                norm.shift.div_(s.to(norm.shift.dtype))
            linear.weight.mul_(s.to(linear.weight.dtype))
        if block.ff.swiglu:
            fc, proj = block.ff.fc, block.ff.proj
            s = smoothing_factors(maxima[p + "ff.proj"], proj.weight, alpha)  # (H,)
            up = slice(proj.in_features, 2 * proj.in_features)  # fc's rows [H, 2H)
            fc.weight[up].div_(s[:, None].to(fc.weight.dtype))
            if fc.bias is not None:
                fc.bias[up].div_(s.to(fc.bias.dtype))
            proj.weight.mul_(s.to(proj.weight.dtype))
        smooth_values(block.att, smoothing_factors(maxima[p + "att.out_proj"], block.att.out_proj.weight, alpha))
    model.train(was_training)
    return model


def smooth_values(att, s: torch.Tensor) -> None:
    """Fold s (one per out_proj input, nh * hs) into the value rows of qkv: one s per key/value head
    dimension, the largest over the query heads that share it (GQA), so out_proj's columns follow."""
    hs, group = att.head_dim, att.n_heads // att.n_kv_heads
    s_kv = s.view(att.n_kv_heads, group, hs).amax(1)  # (nkv, hs)
    q_dim = att.n_heads * hs
    values = slice(q_dim + att.kv_dim, q_dim + 2 * att.kv_dim)  # qkv's rows of v
    qkv, out = att.qkv, att.out_proj
    qkv.weight[values].div_(s_kv.reshape(-1, 1).to(qkv.weight.dtype))
    if qkv.bias is not None:
        qkv.bias[values].div_(s_kv.reshape(-1).to(qkv.bias.dtype))
    out.weight.mul_(s_kv.repeat_interleave(group, 0).reshape(-1).to(out.weight.dtype))  # (nh * hs,)
