"""GPTQ: round a layer's weights one input column at a time, and let the columns not yet rounded absorb the error.

    from dozero.compress.quantize import QuantizeConfig, quantize
    quantize(model, QuantizeConfig(bits=4, group_size=32, method="gptq"), calibration_ids)   # in place
    dozero compress quantize --model smollm2-135m-instruct --to int4 --method gptq --out out/smol-gptq

Frantar et al. 2022 ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").
Round-to-nearest makes every weight as close as it can be on its own; what matters is the layer's output
X W^T on real inputs X (tokens, in). For one row w of W the output error is (w - w_q) H (w - w_q)^T / 2
with H = 2 X^T X (in, in), the same H for every row. GPTQ rounds column q, then changes the columns F
not yet rounded by the least-squares correction (Optimal Brain Surgeon's update):

    err = (w_q - round(w_q)) / [H_F^-1]_qq          w_F -= err * [H_F^-1]_q,F

where H_F^-1 is the inverse of H restricted to the columns not yet rounded (q first). Those inverses are
the rows of one Cholesky factor: with H^-1 = U^T U (U upper triangular), U[q, q:] = [H_F^-1]_q,F / sqrt([H_F^-1]_qq),
so the update is err' = (w_q - round(w_q)) / U[q, q], w_F -= err' U[q, F]. Then:
  * the rule and the storage are quantize.py's (llama.cpp's Q8_0 / Q4_0): a group's scale is computed when
    GPTQ reaches the group's first column, from the group's current (already corrected) weights, and
    each column is rounded on that grid. The error pushed on is against q * (the float16 scale), the
    value the file stores, so the correction accounts for the scale's own rounding too;
  * lazy batches: inside a block of columns only the block is updated, the rest of W once per block
    (Err @ U[block, rest]); blocks never straddle a group's first column, so that scale sees every update;
  * dampening: 1% of H's mean diagonal is added to its diagonal (H from a few thousand tokens can be
    singular); an input that was always zero (diagonal 0) gets H_ii = 1 and its weights 0.
Layer by layer, block by block (as the paper): each transformer block's inputs are computed by the
model whose earlier blocks are already quantized, so later blocks also correct what earlier ones lost;
then the head (an untied one, or the token table tied to it, whose lookup then reads the corrected table)
against the final norm's outputs.

Measured on SmolLM2-135M-Instruct (docs/en/compression.md, "--method gptq"), perplexity on 1,024 tokens of
tinyshakespeare (fp32 41.4), 2,048 calibration tokens: int4 groups of 32 52.9 -> 50.6, groups of 64
60.2 -> 51.3. Feeding each block the float model's inputs instead (`sequential=False`): 50.0, but KL to
fp32 0.260 against the sequential 0.253: a wash, so the paper's way stays.
"""

from __future__ import annotations

import functools

import torch

from dozero.compress.quantize import round_half_away
from dozero.model.quantized import QuantizedEmbedding, QuantizedLinear, pack_int4, set_module, tie_quantized_head
from dozero.runtime import torch_settings

BLOCK = 128  # columns per lazy batch (the paper's B)
DAMP = 0.01  # fraction of H's mean diagonal added to the diagonal


def group_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 step d (out,) of a group w (out, G): quantize.py's rule (int8 max|w|/127, int4 the value of
    largest magnitude / -8)."""
    if bits == 8:
        return w.abs().amax(dim=1) / 127
    return w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0] / -8


def round_column(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (out,) of one column on the grid of step d, quantize.py's rounding. Clamped: a corrected
    weight can outgrow its group's scale (computed before the correction reached it)."""
    inv = torch.where(d == 0, 0.0, 1 / d)
    if bits == 8:
        return round_half_away(w * inv).clamp(-127, 127)
    return torch.trunc(w * inv + 8.5).clamp(0, 15) - 8


def block_width(group: int) -> int:
    """Columns per lazy batch: about BLOCK, and a group's first column always starts a batch (a multiple of
    the group, or a divisor of it when the group is wider than BLOCK)."""
    if group <= BLOCK:
        return group * (BLOCK // group)
    return max(b for b in range(1, BLOCK + 1) if group % b == 0)


def inverse_factor(hessian: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """U (in, in), upper triangular, with (H + damping)^-1 = U^T U. Zeroes w's dead columns in place."""
    h = hessian.double().clone()  # float64: the factorizations of a nearly singular H
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int):
    """(q, scales) of `weight` (out, in) in quantize_weight's format (int8 (out, in) or packed int4 (out,
    in/2); float16 scales (out, in/group)), rounded by GPTQ against `hessian` (in, in) = 2 X^T X."""
    w = weight.detach().float().clone()  # (out, in), corrected as the columns are rounded
    out_f, in_f = w.shape
    u = inverse_factor(hessian, w)
    q = torch.zeros(out_f, in_f, dtype=torch.int8)
    scales = torch.zeros(out_f, in_f // group, dtype=torch.float16)
    width = block_width(group)
    for start in range(0, in_f, width):
        end = min(start + width, in_f)
        errors = torch.zeros(out_f, end - start)  # (out, block): err' of each column
        for c in range(start, end):
            if c % group == 0:  # the group's scale, from its current weights (all inside this batch or later)
                d = group_scale(w[:, c : c + group], bits)
                scales[:, c // group] = d.half()
            q[:, c] = round_column(w[:, c], d, bits).to(torch.int8)
            stored = q[:, c].float() * scales[:, c // group].float()  # what the file will hold
            err = (w[:, c] - stored) / u[c, c]
            w[:, c:end] -= err[:, None] * u[c, c:end][None, :]  # this batch now, (out, 1) x (1, rest)
            errors[:, c - start] = err
        w[:, end:] -= errors @ u[start:end, end:]  # the rest of the row, once per batch
    return (pack_int4(q) if bits == 4 else q), scales


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the first block's inputs are kept."""


@torch.no_grad()
def first_block_inputs(model, calibration: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first transformer block's call for each calibration window of the model's
    context length: the embedded tokens and what every block needs (positions, RoPE's angles)."""
    kept = []

    def keep(module, args, kwargs):
        kept.append((args, kwargs))
        raise _Captured

    hook = model.trf_blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        ctx = model.cfg.context_length
        for s in range(0, calibration.numel(), ctx):
            try:
                model(calibration[s : s + ctx][None])
            except _Captured:
                pass
    finally:
        hook.remove()
    return kept


def hessians(root, names: list[str], run) -> dict[str, torch.Tensor]:
    """{name: 2 X^T X / tokens} (in, in) of the inputs X of `root`'s modules `names` while `run()` runs."""
    modules = dict(root.named_modules())
    sums: dict[str, list] = {name: [0, 0] for name in names}

    def add(module, inputs, output, name):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
        sums[name][0] = sums[name][0] + 2 * x.T @ x
        sums[name][1] += x.shape[0]

    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: add(m, i, o, n)) for n in names]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: h / count for name, (h, count) in sums.items()}


def block_outputs(block, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The block's output (1, T, C) for each window's (args, kwargs)."""
    return [block(*args, **kwargs)[0] for args, kwargs in inputs]


def gptq_module(root, name: str, hessian: torch.Tensor, bits: int, group: int) -> None:
    """Replace `root`'s linear layer `name` by its GPTQ-rounded QuantizedLinear."""
    module = dict(root.named_modules())[name]
    # The column loop is thousands of small products: one CPU thread. Measured on the 2-core machine under
    # other jobs: SmolLM2's ff.fc (3072 x 576) 0.8 s on one thread, 4-17 s on two (they wait for each other).
    with torch_settings(torch.device("cpu"), threads=1):
        q, scales = gptq_weight(module.weight, hessian, bits, group)
    bias = None if module.bias is None else module.bias.detach().float()
    set_module(root, name, QuantizedLinear(q, scales, bias, bits))


@torch.no_grad()
def gptq_linears(model, names: list[str], groups: dict[str, int], bits: int, calibration: torch.Tensor,
                 tied_group: int | None = None, sequential: bool = True) -> None:  # fmt: skip
    """Replace the linear layers `names` of `model` (blocks' layers, and an untied head) by GPTQ-rounded
    QuantizedLinear ones, in place, one transformer block at a time; with `tied_group`, also the token table
    tied to the head (rounded as the head, in groups of `tied_group`). `sequential`: each block's inputs come
    from the already quantized earlier blocks (the paper's way); False: from the float model's blocks."""
    was_training = model.training
    model.eval()
    inputs = first_block_inputs(model, calibration)
    for i, block in enumerate(model.trf_blocks):
        prefix = f"trf_blocks.{i}."
        mine = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]
        outputs = None if sequential else block_outputs(block, inputs)
        for name, h in hessians(block, mine, functools.partial(block_outputs, block, inputs)).items():
            gptq_module(block, name, h, bits, groups[prefix + name])
        outputs = block_outputs(block, inputs) if sequential else outputs
        inputs = [((x, *args[1:]), kwargs) for x, (args, kwargs) in zip(outputs, inputs, strict=True)]
    if "out_head" in names or tied_group:  # the head reads the final norm of the last block's output
        h = hessians(model, ["out_head"], lambda: [model.out_head(model.final_norm(args[0])) for args, _ in inputs])
        if tied_group:  # the lookup reads the same corrected table: measured, the head's gain is worth it
            with torch_settings(torch.device("cpu"), threads=1):
                q, scales = gptq_weight(model.tok_emb.weight, h["out_head"], bits, tied_group)
            model.tok_emb = QuantizedEmbedding(q, scales, bits)
            tie_quantized_head(model)
        else:
            gptq_module(model, "out_head", h["out_head"], bits, groups["out_head"])
    model.train(was_training)
