"""Pruning: remove the weights (or whole feed-forward neurons) that matter least.

    from dozero.compress.prune import PruneConfig, prune
    prune(model, PruneConfig(method="wanda", sparsity=0.5), calibration_ids)   # in place, zeros
    smaller = prune(model, PruneConfig(method="neurons", sparsity=0.25))      # a new, narrower model
    fewer = prune(model, PruneConfig(method="heads", sparsity=1 / 3), calibration_ids)  # fewer heads
    dozero compress prune --model runs/x --method wanda --sparsity 0.5 --out out/x-wanda50

Four methods, each a transformation of a finished model:
  * magnitude (unstructured): in every linear layer of the blocks, zero the `sparsity` fraction of
    weights with the smallest |W| (Han et al. 2015). The matrices keep their shape: the file and the
    dense kernels do not get smaller or faster, which is why it is measured, not sold.
  * wanda (unstructured, activation-aware; Sun et al. 2023, "Wanda"): score |W[o, i]| * ||X[:, i]||_2,
    the input's norm over calibration tokens, and zero the lowest `sparsity` fraction of each output
    row. A small weight on an input that is always large is kept; a large weight on a silent input goes.
  * neurons (structured): drop the same fraction of feed-forward hidden neurons in every block (the
    rows of fc, gate and up, the columns of proj), scored by ||fc row|| * ||proj column|| (for SwiGLU,
    gate and up together). The matrices shrink, `ff_hidden_dim` records the new width, and the model
    saves, loads and runs faster like any other.
  * heads (structured, activation-aware): drop the same fraction of attention heads in every block (their
    query rows of qkv and their columns of out_proj). A head's importance is the energy of what it adds
    to the residual stream on calibration text, sum over tokens of ||W_o[:, h] y_h||^2 (`head_importance`;
    Michel et al. 2019 score heads by their effect on the loss, this is its cheaper output-side cousin).
    The kept heads keep their width: `n_heads` and `head_size` record the new shape. With grouped-query
    attention (SmolLM2: 9 query heads sharing 3 key/value heads) the same number of query heads goes from
    every group and every key/value head stays: ModelConfig has one group size (nh / nkv) for all, and
    SmolLM2 has only 3 groups, so dropping whole groups would remove a third of the heads at a time. The
    price: the KV cache does not shrink. Without GQA a head goes with its key and value rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dozero.compress.calibrate import block_linears, fold_inputs, input_norms
from dozero.errors import DozeroError

METHODS = ("magnitude", "wanda", "neurons", "heads")


@dataclass
class PruneConfig:
    """What to prune and how much."""

    method: str = "wanda"
    """magnitude (smallest |W|), wanda (smallest |W| * input norm, per output row), neurons (whole
    feed-forward neurons) or heads (whole attention heads); neurons and heads shrink the matrices."""
    sparsity: float = 0.5
    """Fraction to remove, in [0, 1): of each layer's weights, of each block's feed-forward neurons, or of
    each block's attention heads (of each key/value group's query heads with grouped-query attention)."""
    calibration_tokens: int = 2048
    """Tokens of the calibration text whose activations score the weights (wanda and heads)."""
    finetune_steps: int = 0
    """Steps of a short fine-tune after pruning, on --data (0: none). Zeros pruned by magnitude or wanda
    stay zero."""
    finetune_lr: float = 1e-4
    """Peak learning rate of that fine-tune (AdamW through the trainer's step; small: the model is trained)."""
    finetune_alpha: float = 0.5
    """Share of the fine-tune's loss that is distillation from the unpruned model (0: plain cross-entropy)."""

    def check(self) -> None:
        if self.method not in METHODS:
            raise DozeroError(f"prune: method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if not 0.0 <= self.sparsity < 1.0:
            raise DozeroError(
                f"prune: sparsity must be in [0, 1) (a fraction to remove; 1 would remove everything), "
                f"got {self.sparsity}"
            )
        if self.finetune_steps < 0 or self.finetune_lr <= 0 or not 0.0 <= self.finetune_alpha <= 1.0:
            raise DozeroError("prune: --finetune-steps must be >= 0, --finetune-lr > 0 and --finetune-alpha in [0, 1]")


def lowest(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """A bool mask of the k lowest scores (over all, or along `dim`); ties broken by position."""
    if dim is None:
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[scores.flatten().argsort(stable=True)[:k]] = True
        return mask.view_as(scores)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, scores.argsort(dim=dim, stable=True)[:, :k], True)


@torch.no_grad()
def prune_unstructured(model, config: PruneConfig, calibration: torch.Tensor | None = None):
    """Zero weights in place (magnitude: per layer; wanda: per output row). Returns the model."""
    norms = input_norms(model, calibration) if config.method == "wanda" else {}
    for name, module in block_linears(model):
        w = module.weight
        if config.method == "magnitude":
            mask = lowest(w.abs(), round(config.sparsity * w.numel()))
        else:
            mask = lowest(w.abs() * norms[name][None, :], round(config.sparsity * w.shape[1]), dim=1)
        w.masked_fill_(mask, 0.0)
    return model


@torch.no_grad()
def prune_neurons(model, config: PruneConfig):
    """A new model with `sparsity` of the feed-forward neurons of every block removed (same count in each
    block, since ModelConfig has one ff_hidden_dim)."""
    import dataclasses

    from dozero.model.gpt import GPTModel

    cfg = model.cfg
    H = cfg.hidden_dim
    keep = H - round(config.sparsity * H)
    if keep < 1:
        raise DozeroError(f"prune: sparsity {config.sparsity} leaves no feed-forward neuron of {H}")
    new = GPTModel(dataclasses.replace(cfg, ff_hidden_dim=keep))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.trf_blocks):
        fc, proj = block.ff.fc, block.ff.proj
        rows = fc.weight.view(2, H, -1) if block.ff.swiglu else fc.weight.view(1, H, -1)  # (1 or 2, H, C)
        score = rows.norm(dim=-1).prod(0) * proj.weight.norm(dim=0)  # (H,)
        kept = score.argsort(descending=True, stable=True)[:keep].sort().values  # keep the neurons' order
        fc_rows = torch.cat([kept + H * j for j in range(rows.shape[0])])
        p = f"trf_blocks.{i}.ff."
        state[p + "fc.weight"] = fc.weight[fc_rows]
        if fc.bias is not None:
            state[p + "fc.bias"] = fc.bias[fc_rows]
        state[p + "proj.weight"] = proj.weight[:, kept]
    new.load_state_dict(state)
    return new.eval()


def head_importance(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block, (nh,): sum over the calibration tokens of ||W_o[:, h] y_h||^2, the energy head h adds to
    the residual stream. Computed from each head's Gram matrix Y_h^T Y_h (hs, hs), summed over windows:
    ||Y_h W_h^T||_F^2 = sum(Y_h^T Y_h * W_h^T W_h), no (tokens, nh, C) tensor needed."""
    hs = model.cfg.head_dim
    names = [f"trf_blocks.{i}.att.out_proj" for i in range(len(model.trf_blocks))]

    def fold(gram, y, _):
        y = y.view(len(y), -1, hs)  # (N, nh, hs): out_proj's input is the heads side by side
        return torch.einsum("nhd,nhe->hde", y, y) + (0 if gram is None else gram)  # (nh, hs, hs)

    grams = fold_inputs(model, ids, names, fold)
    scores = []
    for name, block in zip(names, model.trf_blocks, strict=True):
        w = block.att.out_proj.weight.detach().float().view(model.cfg.emb_dim, -1, hs)  # (C, nh, hs)
        scores.append((grams[name] * torch.einsum("chd,che->hde", w, w)).sum((1, 2)))  # (nh,)
    return scores


def kept_heads(scores: torch.Tensor, n_groups: int, keep: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` best-scoring query heads of each of `n_groups` consecutive groups."""
    grouped = scores.view(n_groups, -1)  # (groups, heads per group)
    best = grouped.argsort(dim=1, descending=True, stable=True)[:, :keep].sort(dim=1).values
    return (best + torch.arange(n_groups)[:, None] * grouped.shape[1]).flatten()


def head_rows(heads: torch.Tensor, hs: int, offset: int = 0) -> torch.Tensor:
    """The rows (or columns) of heads `heads` in a stack of heads of width hs starting at `offset`."""
    return (offset + heads[:, None] * hs + torch.arange(hs)).flatten()


@torch.no_grad()
def prune_heads(model, config: PruneConfig, calibration: torch.Tensor):
    """A new model with `sparsity` of every block's attention heads removed (module docstring: with GQA,
    the same number of query heads from every key/value group; without, whole heads)."""
    import dataclasses

    from dozero.model.gpt import GPTModel

    cfg = model.cfg
    nh, nkv, hs = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    gqa = nkv != nh
    units = nh // nkv if gqa else nh  # what one choice picks from: a group's query heads, or all heads
    keep = units - round(config.sparsity * units)
    if keep < 1:
        what = f"all {units} query heads of each key/value group" if gqa else f"all {nh} attention heads"
        raise DozeroError(
            f"prune: sparsity {config.sparsity} removes {what} of every block; "
            f"use a sparsity below {(units - 0.5) / units:.3f}"
        )
    scores = head_importance(model.eval(), calibration)
    new_nh, new_nkv = (nkv * keep, nkv) if gqa else (keep, keep)
    new = GPTModel(dataclasses.replace(cfg, n_heads=new_nh, n_kv_heads=new_nkv if cfg.n_kv_heads else 0, head_size=hs))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.trf_blocks):
        heads = kept_heads(scores[i], nkv if gqa else 1, keep)
        kv = torch.arange(nkv) if gqa else heads  # GQA keeps every key/value head
        rows = torch.cat([head_rows(heads, hs), head_rows(kv, hs, nh * hs), head_rows(kv, hs, (nh + nkv) * hs)])
        p = f"trf_blocks.{i}.att."
        state[p + "qkv.weight"] = block.att.qkv.weight[rows]
        if block.att.qkv.bias is not None:
            state[p + "qkv.bias"] = block.att.qkv.bias[rows]
        state[p + "out_proj.weight"] = block.att.out_proj.weight[:, head_rows(heads, hs)]
    new.load_state_dict(state)
    return new.eval()


def prune(model, config: PruneConfig, calibration: torch.Tensor | None = None):
    """Apply `config` to `model`: unstructured methods change it in place, neurons and heads return a new model."""
    from dozero.model.quantized import is_quantized

    config.check()
    if is_quantized(model):
        raise DozeroError("prune: this model is quantized; prune the float model, then quantize")
    if config.method in ("wanda", "heads") and calibration is None:
        raise DozeroError(f"prune: {config.method} needs calibration text (its activations score the weights)")
    if config.method == "neurons":
        return prune_neurons(model, config)
    if config.method == "heads":
        return prune_heads(model, config, calibration)
    return prune_unstructured(model, config, calibration)


def sparsity_of(model) -> float:
    """Fraction of zeros among the weights of the blocks' linear layers."""
    weights = [m.weight for _, m in block_linears(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def finetune(pruned, original, tokens, config: PruneConfig, progress=None) -> dict[str, float]:
    """Fine-tune `pruned` in place for config.finetune_steps on `tokens` (a 1-D array); the held-out loss
    (on the end of `tokens`) of the unpruned model, of the pruned one, and after the fine-tune.

    It is compress/distill.py's run (the trainer's step, AdamW, schedule, clipping) with the unpruned
    model as the teacher: recovering from a teacher's distributions beat plain training in the pruning
    papers that fine-tune (Sheared LLaMA, Minitron). Zeros stay zero: their gradients are masked, and
    AdamW never moves a weight whose gradient is always zero (zero moments; decay of zero is zero)."""
    from dozero.compress.distill import DistillConfig, distill, held_out_loss, split_tokens

    run = DistillConfig(
        steps=config.finetune_steps,
        lr=config.finetune_lr,
        alpha=config.finetune_alpha,
        warmup_steps=max(1, config.finetune_steps // 10),
    )
    T = min(run.context_length, pruned.cfg.context_length)
    train_tokens, val_tokens = split_tokens(tokens, run.val_fraction, T)
    losses = {"unpruned": held_out_loss(original, val_tokens, T), "pruned": held_out_loss(pruned, val_tokens, T)}
    zeros = [(m.weight, m.weight == 0) for _, m in block_linears(pruned)]
    hooks = [w.register_hook(lambda g, mask=mask: g.masked_fill(mask, 0.0)) for w, mask in zeros if mask.any()]
    try:
        distill(pruned, original if run.alpha > 0 else None, train_tokens, run, progress)
    finally:
        for h in hooks:
            h.remove()
    losses["finetuned"] = held_out_loss(pruned, val_tokens, T)
    return losses
