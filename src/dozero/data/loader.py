"""Training and evaluation batches from a stream of token ids (inputs and targets shifted by one).

    from dozero.data import load_split
    from dozero.data.loader import RandomWindowLoader, SequentialWindowLoader

    train = RandomWindowLoader(load_split("data/shakespeare", "train"), batch_size=12, context_length=64, seed=1337)
    x, y = train.next_batch()           # (B, T) int64 each; y[b, t] is the token after x[b, t]
    for x, y in SequentialWindowLoader(load_split("data/shakespeare", "val"), 12, 64):
        ...                             # every window once, in order (evaluation)

`tokens` is a 1-D numpy array, an `np.memmap`, or the `ShardedTokens` that `load_split` returns
(anything with `__len__` and `windows(starts, length) -> (B, length)` array).

Teacher forcing: a window of T+1 consecutive tokens gives x = window[:-1] and y = window[1:], so
the model learns to predict every next token of the window at once (course, chapter 2 "sliding
window"; nanoGPT `get_batch`).

Random windows and ranks (the scheme). Step s draws ONE global set of `world_size * batch_size`
distinct window starts from a generator seeded by (seed, s); rank r takes the r-th block of
`batch_size` of them. Hence:
  * N ranks never see the same window at the same step (the starts are drawn without replacement);
  * the union of the ranks' batches equals what one process with batch `world_size * batch_size`
    would see, so the data order survives a change of GPU count at equal global batch;
  * the state is just the step counter: `state_dict()` -> {"seed", "step", ...}, and a resumed run
    continues on exactly the batches it would have seen, without replaying anything.
Across different steps, windows are drawn independently (with replacement), as in nanoGPT: with
billions of possible starts a repeat is rare, and overlapping windows are the norm anyway.

Devices: with `device=None` (default) batches are CPU tensors and the trainer moves them. With
`device="cuda"`, the batch is copied through pinned memory with `non_blocking=True`, so the copy
overlaps the GPU's work (nanoGPT does the same).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dozero.errors import DozeroError

# Legend for shape comments: B = batch size, T = context length (tokens per window).


def read_windows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows tokens[s : s + length] for each s in `starts`, as one (len(starts), length) array."""
    if hasattr(tokens, "windows"):  # ShardedTokens (several memory-mapped shards)
        return tokens.windows(starts, length)
    # One fancy-indexing gather instead of a Python loop: (B, 1) + (1, length) -> (B, length) indices.
    return np.asarray(tokens[starts[:, None] + np.arange(length)])


def _check_length(tokens, context_length: int) -> int:
    n_tokens = len(tokens)
    what = getattr(tokens, "name", "this split")  # ShardedTokens says which split of which folder
    if context_length < 1:
        raise DozeroError(f"context_length must be at least 1, got {context_length}")
    if n_tokens < context_length + 1:
        raise DozeroError(
            f"context length {context_length:,} needs at least {context_length + 1:,} tokens, but {what} has only "
            f"{n_tokens:,}; use a shorter --context-length or more data (e.g. a larger validation share)"
        )
    return n_tokens


def _to_tensors(buf: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token array -> x, y (B, T) int64 tensors, y shifted by one."""
    buf = torch.from_numpy(buf.astype(np.int64))  # (B, T+1); int64 is what nn.Embedding and cross_entropy want
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each
    if device is not None and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    if device is not None:
        return x.to(device), y.to(device)
    return x, y


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DozeroError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


class RandomWindowLoader:
    """Random windows of `context_length` + 1 tokens, reproducible from (seed, step); see module docstring."""

    def __init__(
        self, tokens, batch_size: int, context_length: int, seed: int, rank: int = 0, world_size: int = 1, device=None
    ):
        _check_rank(rank, world_size)
        n_tokens = _check_length(tokens, context_length)
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_length = context_length
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.step = 0
        # A window starting at s needs tokens s .. s+T, so starts run over 0 .. n_tokens-T-1.
        self.num_starts = n_tokens - context_length
        if world_size * batch_size > self.num_starts:
            raise DozeroError(
                f"the split has only {self.num_starts:,} distinct windows of {context_length + 1} tokens, fewer than "
                f"the global batch ({world_size} ranks x {batch_size}); use a smaller batch or context length"
            )

    def starts_for_step(self, step: int) -> np.ndarray:
        """This rank's window starts at `step` (B,), a pure function of (seed, step, rank, world_size)."""
        rng = np.random.default_rng([self.seed, step])
        global_batch = self.world_size * self.batch_size
        # Without replacement within a step: different ranks never share a window.
        starts = rng.choice(self.num_starts, size=global_batch, replace=False)  # (world_size * B,)
        return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]  # (B,)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair, each (B, T) int64; y is x shifted left by one token."""
        starts = self.starts_for_step(self.step)
        self.step += 1
        return _to_tensors(read_windows(self.tokens, starts, self.context_length + 1), self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-friendly position; the settings are included so a mismatched resume is caught."""
        return {
            "seed": self.seed,
            "step": self.step,
            "batch_size": self.batch_size,
            "context_length": self.context_length,
            "world_size": self.world_size,
            "num_starts": self.num_starts,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. Changing the GPU count is allowed only at equal global batch."""
        if state.get("num_starts", self.num_starts) != self.num_starts:
            raise DozeroError(
                f"the saved loader state is for a split with {state['num_starts']:,} windows, this one has "
                f"{self.num_starts:,}: the data or context length changed since the checkpoint"
            )
        saved_global = state.get("batch_size", self.batch_size) * state.get("world_size", self.world_size)
        if saved_global != self.batch_size * self.world_size:
            raise DozeroError(
                f"the saved loader state used a global batch of {saved_global}, this run uses "
                f"{self.batch_size * self.world_size}; resuming would not see the same data"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])


class SequentialWindowLoader:
    """Every window once, in order: starts 0, stride, 2*stride, ... (course's GPTDatasetV1).

    `stride` defaults to `context_length` (windows touch but do not overlap). With several ranks,
    window k goes to rank k % world_size, so the ranks split the windows without overlap and their
    counts differ by at most one; the last batch of a rank may be smaller than `batch_size`.
    """

    def __init__(
        self,
        tokens,
        batch_size: int,
        context_length: int,
        stride: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device=None,
    ):
        _check_rank(rank, world_size)
        n_tokens = _check_length(tokens, context_length)
        self.stride = context_length if stride is None else stride
        if self.stride < 1:
            raise DozeroError(f"stride must be at least 1, got {self.stride}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_length = context_length
        self.device = device
        # Same rule as the course: range(0, len(token_ids) - max_length, stride).
        self.all_starts = np.arange(0, n_tokens - context_length, self.stride, dtype=np.int64)
        self.starts = self.all_starts[rank::world_size]  # this rank's windows

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        """Number of batches for this rank."""
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.starts), self.batch_size):
            starts = self.starts[i : i + self.batch_size]
            yield _to_tensors(read_windows(self.tokens, starts, self.context_length + 1), self.device)
