"""Pruning: remove the weights (or whole feed-forward neurons) that matter least.

    from dozero.compress.prune import PruneConfig, prune
    prune(model, PruneConfig(method="wanda", sparsity=0.5), calibration_ids)   # in place, zeros
    smaller = prune(model, PruneConfig(method="neurons", sparsity=0.25))      # a new, narrower model
    dozero compress prune --model runs/x --method wanda --sparsity 0.5 --out out/x-wanda50

Three methods, each a transformation of a finished model:
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
Attention heads are not pruned: dozero's head size is emb_dim / n_heads (ModelConfig has no separate
head size), so fewer heads would change the size of every remaining head, not remove some.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dozero.errors import DozeroError

METHODS = ("magnitude", "wanda", "neurons")


@dataclass
class PruneConfig:
    """What to prune and how much."""

    method: str = "wanda"
    """magnitude (smallest |W|), wanda (smallest |W| * input norm, per output row) or neurons (whole
    feed-forward neurons: the matrices shrink)."""
    sparsity: float = 0.5
    """Fraction to remove, in [0, 1): of each layer's weights, or of each block's feed-forward neurons."""
    calibration_tokens: int = 2048
    """Tokens of the calibration text whose activations score the weights (wanda only)."""

    def check(self) -> None:
        if self.method not in METHODS:
            raise DozeroError(f"prune: method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if not 0.0 <= self.sparsity < 1.0:
            raise DozeroError(
                f"prune: sparsity must be in [0, 1) (a fraction to remove; 1 would remove everything), "
                f"got {self.sparsity}"
            )


def block_linears(model) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("trf_blocks.")]


def lowest(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """A bool mask of the k lowest scores (over all, or along `dim`); ties broken by position."""
    if dim is None:
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[scores.flatten().argsort(stable=True)[:k]] = True
        return mask.view_as(scores)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, scores.argsort(dim=dim, stable=True)[:, :k], True)


@torch.no_grad()
def input_norms(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X[:, i]||_2 over the calibration tokens for the input of every linear layer of the blocks."""
    sums, hooks = {}, []
    for name, module in block_linears(model):

        def hook(mod, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        hooks.append(module.register_forward_hook(hook))
    try:
        ctx = model.cfg.context_length
        for s in range(0, ids.numel(), ctx):
            model(ids[s : s + ctx][None])
    finally:
        for h in hooks:
            h.remove()
    return {name: total.sqrt() for name, total in sums.items()}


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


def prune(model, config: PruneConfig, calibration: torch.Tensor | None = None):
    """Apply `config` to `model`: unstructured methods change it in place, `neurons` returns a new model."""
    from dozero.model.quantized import is_quantized

    config.check()
    if is_quantized(model):
        raise DozeroError("prune: this model is quantized; prune the float model, then quantize")
    if config.method == "wanda" and calibration is None:
        raise DozeroError("prune: wanda needs calibration text (its activations score the weights)")
    if config.method == "neurons":
        return prune_neurons(model, config)
    return prune_unstructured(model, config, calibration)


def sparsity_of(model) -> float:
    """Fraction of zeros among the weights of the blocks' linear layers."""
    weights = [m.weight for _, m in block_linears(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def calibration_tokens(path, tokenizer, n: int) -> torch.Tensor:
    """`n` token ids from the middle of a text file (or a bundled text's name): Wanda's calibration. The
    middle, so that calibrating and measuring perplexity on the beginning of the same text do not overlap."""
    from pathlib import Path

    from dozero.files import input_path

    p = Path(input_path(path))
    if not p.is_file():
        raise DozeroError(f"calibration text '{path}' not found: give a text file or a bundled text's name")
    text = p.read_text(encoding="utf-8", errors="replace")
    piece = text[len(text) // 2 :][: 16 * n]  # ~4 characters a token: plenty, without encoding the whole file
    ids = tokenizer.encode(piece, special="text")[:n]
    if len(ids) < 16:
        raise DozeroError(f"calibration text '{path}' is too short ({len(ids)} tokens from its middle)")
    return torch.tensor(ids)
