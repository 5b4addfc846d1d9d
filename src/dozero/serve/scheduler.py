"""Who runs this step (nano-vllm's `Scheduler`), with continuous batching.

Requests wait in a queue (first come, first served) until the batch has a place and the pool has
blocks for them. Every step then does at most one prefill chunk (`prefill_chunk` prompt tokens of
the oldest sequence still reading its prompt) and one decode token for every sequence that is
generating. Sequences join and leave between steps, so a finished or cancelled one frees its place
and its blocks at once, and a long prompt is read a chunk per step while the others keep streaming.
"""

from __future__ import annotations

from collections import deque

from dozero.serve.block_manager import BlockPool
from dozero.serve.config import ServeConfig
from dozero.serve.sequence import Sequence


class Scheduler:
    def __init__(self, pool: BlockPool, config: ServeConfig):
        self.pool, self.config = pool, config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: holding blocks, in prefill or decoding

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> None:
        """Move waiting sequences into the batch while there is room (in order: none jumps the queue)."""
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            if not self.pool.can_allocate(seq.max_length):
                break
            self.waiting.popleft()
            seq.block_table = self.pool.allocate(seq.max_length)
            self.running.append(seq)

    def schedule(self) -> tuple[tuple[Sequence, int] | None, list[Sequence]]:
        """(the sequence to prefill and how many of its prompt tokens, or None; the sequences to decode)."""
        self.admit()
        decode = [s for s in self.running if not s.in_prefill]
        prefill = next((s for s in self.running if s.in_prefill), None)
        if prefill is None:
            return None, decode
        return (prefill, min(self.config.prefill_chunk, len(prefill.prompt) - prefill.num_cached)), decode

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and give its blocks back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.block_table)

    def cancelled(self) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.cancelled]
