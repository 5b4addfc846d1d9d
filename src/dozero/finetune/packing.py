"""Packing: several short conversations in one row, each attending only to itself.

    from dozero.finetune.packing import collate_packed, PackedForward
    x, y = collate_packed(batch, pad_id, window)      # x (R, 2, W): ids and positions; y (R, W) targets
    logits = PackedForward(model)(x)                  # (R, W, V), no attention across conversations

Padding (finetune/data.py `collate`) gives each conversation its own row, as long as the batch's
longest; the rows' tail is computed and thrown away. Packing puts the batch's conversations one after
another into as few rows of at most `window` positions as fit (first fit, in the batch's order), so
almost every position computed is a real token. Two things keep a packed conversation exactly what it
would be alone:

  * positions restart at 0 for each conversation: the learned position embedding (GPT-2) and RoPE
    (Llama) see the same positions as in a row of its own;
  * a block-diagonal causal mask: a token attends to earlier tokens *of its own conversation* only.
    The conversations are found from the positions (a 0 starts one), so a batch carries no more than
    ids and positions. Padding at a row's end gets position 0 each: every padding token is a
    conversation of one and attends to itself (a fully masked row would make softmax return NaN).

The targets are the same per token as padding's (-100 where the mask is 0), so the loss of a batch,
the mean over its answer tokens, is the same number in both forms (tests/test_finetune.py checks
logits and loss to 1e-5); only the cost differs. The batch is one tensor (R, 2, W) because the
trainer's Stepper calls `model(x)` with one input; `PackedForward` unpacks it into the model's
`position_ids` and `attn_mask` arguments.

Legend: R rows in the batch, W the longest row (<= window), V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

IGNORE = -100  # as finetune/data.py: cross_entropy's ignore_index


def pack_rows(lengths: list[int], window: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to at most `window` (first fit, in order)."""
    rows, room = [], []
    for i, n in enumerate(lengths):
        at = next((r for r, free in enumerate(room) if free >= n), None)
        if at is None:
            rows.append([])
            room.append(window)
            at = len(rows) - 1
        rows[at].append(i)
        room[at] -= n
    return rows


def collate_packed(batch: list[tuple[list[int], list[int]]], pad_id: int, window: int):
    """x (R, 2, W): row 0 the input ids, row 1 their positions (restarting at 0 per conversation);
    y (R, W): the next id where the mask is 1, else IGNORE (padding too)."""
    rows = pack_rows([len(ids) - 1 for ids, _ in batch], window)
    W = max(sum(len(batch[i][0]) - 1 for i in row) for row in rows)
    x = torch.zeros((len(rows), 2, W), dtype=torch.long)  # positions of padding: 0 (see the docstring)
    x[:, 0] = pad_id
    y = torch.full((len(rows), W), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, mask = batch[i]
            n = len(ids) - 1
            x[r, 0, at : at + n] = torch.tensor(ids[:-1])
            x[r, 1, at : at + n] = torch.arange(n)
            targets = torch.tensor(ids[1:])
            y[r, at : at + n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), targets, IGNORE)
            at += n
    return x, y


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """positions (R, W) -> (R, 1, W, W) bool, True where query i may attend to key j: j <= i and both in
    the same conversation (a conversation starts wherever the position is 0)."""
    conversation = (positions == 0).cumsum(dim=-1)  # (R, W): 1, 1, 1, 2, 2, 3, ...
    same = conversation[:, :, None] == conversation[:, None, :]  # (R, W, W)
    W = positions.shape[-1]
    causal = torch.ones(W, W, dtype=torch.bool, device=positions.device).tril()  # (W, W)
    return (same & causal)[:, None]  # (R, 1, W, W)


class PackedForward(nn.Module):
    """The model called on packed batches: (R, 2, W) ids and positions -> logits (R, W, V). A plain (B, T)
    batch of ids goes straight through, so validation and the padded form share this wrapper."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.model(x)
        ids, positions = x[:, 0], x[:, 1]  # (R, W) each
        return self.model(ids, position_ids=positions, attn_mask=document_mask(positions))
