"""One request's state inside the engine (nano-vllm's `Sequence`).

Its tokens (prompt, then generated), how many of them are already in the KV cache, its block table,
its own sampling settings and random generator, and `emit`: where its text goes (an asyncio queue
behind the HTTP layer, a plain queue for Python callers). The engine thread is the only writer;
`cancel()` may be called from any thread and takes effect at the next step.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dozero.generate.config import GenerationConfig
from dozero.generate.stream import TextSink

_ids = itertools.count()


@dataclass
class Event:
    """What a sequence sends out: a piece of text, and at the end why it stopped."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)  # a sequence is itself: `seq in running` compares identities, not every field
class Sequence:
    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    sink: TextSink
    tokens: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys and values are in the cache
    prefill_target: int = 0  # tokens to read before decoding: the prompt, or all tokens after a preemption
    block_hashes: list[int] = field(default_factory=list)  # prefix hashes of its full, computed blocks
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    cancelled: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.prefill_target = len(self.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.prefill_target

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, reason: str) -> None:
        """Send the held-back text and the end (once)."""
        if self.finished:
            return
        self.finished = True
        tail = self.sink.close() if reason in ("stop", "length") else ""
        self.emit(Event(tail, reason, len(self.prompt), self.num_generated))
