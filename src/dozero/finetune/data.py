"""Fine-tuning data: JSONL conversations -> (ids, mask) examples -> padded batches with masked targets.

Two line formats, both JSON objects, one per line (blank lines are skipped):

    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}   OpenAI chat
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}                       Alpaca

An Alpaca line becomes a user turn (instruction, then input after a blank line when there is one) and
an assistant turn (output). Every line is checked; an error names the file and line number.

A batch pads each conversation to the longest one in the batch (not to the context): the targets are
the next tokens, with -100 (cross_entropy's ignore_index) wherever the mask is 0 and on padding, so
the trainer's unchanged `F.cross_entropy(logits, y)` is the mean over answer tokens only. Or, with
`window`, the batch's conversations are packed into rows of at most `window` positions, kept apart by
a block-diagonal mask (finetune/packing.py): the same loss, fewer positions computed.

Legend: B batch size, L the longest conversation in the batch (tokens).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dozero.errors import DozeroError
from dozero.files import iter_jsonl
from dozero.finetune.chat import check_messages, render
from dozero.finetune.packing import IGNORE, collate_packed


@dataclass
class DataStats:
    conversations: int = 0
    truncated: int = 0
    """Longer than the context: cut to fit (the part kept still has answer tokens)."""
    dropped: int = 0
    """Longer than the context with no answer token in what fits, or --too-long drop."""
    tokens: int = 0
    target_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"{self.conversations} conversations, {self.tokens:,} tokens of which {self.target_tokens:,} scored "
            f"(answers); {self.truncated} truncated and {self.dropped} dropped as longer than the context"
        )


def parse_line(obj, where: str) -> list[dict]:
    """One JSONL record -> messages."""
    if not isinstance(obj, dict):
        raise DozeroError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        messages = check_messages(obj["messages"], where)
    elif "instruction" in obj and "output" in obj:
        parts = [obj["instruction"], obj.get("input") or ""]
        if not all(isinstance(p, str) for p in parts + [obj["output"]]):
            raise DozeroError(f"{where}: 'instruction', 'input' and 'output' should be strings")
        question = parts[0] + ("\n\n" + parts[1] if parts[1] else "")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": obj["output"]}]
    else:
        raise DozeroError(
            f'{where}: neither a chat record ({{"messages": [...]}}) nor an Alpaca record '
            f"(instruction, input, output); keys found: {sorted(obj)[:6]}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DozeroError(f"{where}: no assistant message: nothing to learn from")
    return messages


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Every conversation in a JSONL file, each line validated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DozeroError(f"--data {path}: no such file (give a .jsonl of chat or Alpaca records)")
    conversations = [parse_line(obj, f"{path}:{n}") for n, obj in iter_jsonl(path)]
    if not conversations:
        raise DozeroError(f"--data {path}: the file holds no records")
    return conversations


def tokenize(conversations, tokenizer, template: str, max_tokens: int, too_long: str = "truncate"):
    """(examples, stats): each conversation as (ids, mask), at most `max_tokens` ids (the context + 1:
    inputs are ids[:-1], targets ids[1:]). Conversations with no answer token left are dropped, counted."""
    if too_long not in ("truncate", "drop"):
        raise DozeroError(f"--too-long must be 'truncate' or 'drop', got {too_long!r}")
    stats, examples = DataStats(conversations=len(conversations)), []
    for messages in conversations:
        ids, mask = render(tokenizer, messages, template)
        if len(ids) > max_tokens:
            if too_long == "drop" or sum(mask[1:max_tokens]) == 0:
                stats.dropped += 1
                continue
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            stats.truncated += 1
        stats.tokens += len(ids)
        stats.target_tokens += sum(mask[1:])
        examples.append((ids, mask))
    if not examples:
        raise DozeroError(
            f"no conversation is left to train on ({stats.describe()}); use shorter conversations or a model "
            "with a longer context"
        )
    return examples, stats


def split(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a random `val_fraction` of the conversations (at least one) for validation."""
    if len(examples) < 2:
        raise DozeroError(f"only {len(examples)} usable conversation(s): need at least 2 (train and validation)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * val_fraction)))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L-1) input ids, y (B, L-1) targets: the next id where the mask is 1, else IGNORE. Padding is
    ignored by position, never by id, so an end token equal to `pad_id` is still learned."""
    L = max(len(ids) for ids, _ in batch)
    x = torch.full((len(batch), L - 1), pad_id, dtype=torch.long)
    y = torch.full((len(batch), L - 1), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(batch):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        targets = torch.tensor(ids[1:])
        y[b, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), targets, IGNORE)
    return x, y


class SFTLoader:
    """Batches of `batch_size` conversations in a shuffled order, a new order each epoch (seed + epoch),
    so the position (epoch, index) is all a checkpoint needs for an exact resume. Under DDP, rank r
    takes every world-th batch of the same order. `window` 0: each batch padded (`collate`); > 0: packed
    into rows of at most `window` positions (`packing.collate_packed`, for `packing.PackedForward`)."""

    def __init__(self, examples: list, batch_size: int, seed: int, pad_id: int, rank: int = 0, world_size: int = 1,
                 window: int = 0):  # fmt: skip
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.rank, self.world_size, self.window = rank, world_size, window
        self.epoch, self.index = 0, 0
        self.padded, self.real = 0, 0  # positions in the batches so far, and the real ones among them

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._order()
        start = (self.index * self.world_size + self.rank) * self.batch_size
        if start >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order, start = self._order(), self.rank * self.batch_size
        picked = [self.examples[i] for i in (order * 2)[start : start + self.batch_size]]  # wraps at the end
        self.index += 1
        x, y = collate_packed(picked, self.pad_id, self.window) if self.window else collate(picked, self.pad_id)
        self.padded += y.numel()
        self.real += sum(len(ids) - 1 for ids, _ in picked)
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
