"""Calibration: what a model's layers see when it reads real text, gathered by forward hooks.

    from dozero.compress.calibrate import calibration_tokens, fold_inputs, input_maxima, input_norms
    ids = calibration_tokens("tinyshakespeare", tokenizer, 2048)
    norms = input_norms(model, ids)      # ||X[:, i]||_2 per input of every linear layer of the blocks (Wanda)
    maxima = input_maxima(model, ids)    # max |X[:, i]|, the same layers (SmoothQuant)

Every activation-aware method (Wanda's scores, SmoothQuant's scaling, the attention heads' importance)
needs one statistic of some layers' inputs over a few thousand tokens. `fold_inputs` runs the tokens
through the model once, in windows of its context length, and folds each layer's input into a running
value; the methods differ only in the fold.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from dozero.errors import DozeroError


def block_linears(model) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear layer inside the transformer blocks (not the head)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("trf_blocks.")]


@torch.no_grad()
def fold_inputs(model, ids: torch.Tensor, names: list[str], fold: Callable) -> dict:
    """{name: value}, value = fold(previous value or None, x, module) over the calibration windows, where x
    is the module's input as (tokens, in) float32."""
    modules = dict(model.named_modules())
    state, hooks = {}, []
    for name in names:

        def hook(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
            state[name] = fold(state.get(name), x, module)

        hooks.append(modules[name].register_forward_hook(hook))
    try:
        ctx = model.cfg.context_length
        for s in range(0, ids.numel(), ctx):
            model(ids[s : s + ctx][None])
    finally:
        for h in hooks:
            h.remove()
    return state


def input_norms(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X[:, i]||_2 over the calibration tokens for the input of every linear layer of the blocks."""
    names = [n for n, _ in block_linears(model)]
    sums = fold_inputs(model, ids, names, lambda total, x, _: (x * x).sum(0) + (0 if total is None else total))
    return {name: total.sqrt() for name, total in sums.items()}


def input_maxima(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """max |X[:, i]| over the calibration tokens, for the input of every linear layer of the blocks."""

    def fold(peak, x, _):
        x = x.abs().amax(0)  # (in,)
        return x if peak is None else torch.maximum(peak, x)

    return fold_inputs(model, ids, [n for n, _ in block_linears(model)], fold)


def calibration_tokens(path, tokenizer, n: int) -> torch.Tensor:
    """`n` token ids from the middle of a text file (or a bundled text's name). The middle, so that
    calibrating and measuring perplexity on the beginning of the same text do not overlap."""
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
