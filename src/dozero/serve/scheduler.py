"""Who runs this step (nano-vllm's `Scheduler`), with continuous batching.

Requests wait in a queue (first come, first served) until the batch has a place and the pool has
blocks for their prompt. Every step then does one decode token for every sequence that is
generating, and prefill chunks of the oldest sequences still reading their prompt, `prefill_chunk`
prompt tokens at most in all. Sequences join and leave between steps, so a finished or cancelled one
frees its place and its blocks at once, and a long prompt is read a chunk per step while the others
keep streaming.

Blocks are taken as sequences grow. When a generating sequence needs a block and none is free, the
newest sequence is preempted: its blocks go back, and it waits at the head of the queue to be read
again, prompt and generated tokens together (its sampling state is kept, so its text is unchanged).
"""

from __future__ import annotations

from collections import deque

from dozero.serve.block_manager import BlockPool, blocks_needed, prefix_hashes
from dozero.serve.config import ServeConfig
from dozero.serve.sequence import Sequence


class Scheduler:
    def __init__(self, pool: BlockPool, config: ServeConfig):
        self.pool, self.config = pool, config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: holding blocks, in prefill or decoding, oldest first
        self.preemptions = 0
        self.cached_tokens = 0  # prompt tokens taken from shared blocks instead of computed
        # Blocks kept free at admission, so a newcomer does not at once force a preemption.
        self.watermark = max(1, pool.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """(the sequences to prefill and how many of their tokens; the sequences to decode).

        Prefill chunks of several sequences, oldest first, share one model call, up to `prefill_chunk`
        prompt tokens in all (always at least one chunk): requests that arrive together are read
        together instead of one per step."""
        decode = self.make_room([s for s in self.running if not s.in_prefill])
        self.admit()
        prefill, budget = [], self.config.prefill_chunk
        for seq in (s for s in self.running if s.in_prefill):
            n = min(budget, seq.prefill_target - seq.num_cached)
            if n <= 0:
                break
            prefill.append((seq, n))
            budget -= n
        return prefill, decode

    def make_room(self, decode: list[Sequence]) -> list[Sequence]:
        """A block for each decoding sequence's next token, preempting the newest sequences if the
        pool is dry. Returns the sequences that still decode this step."""
        for seq in decode:
            while seq in self.running and not self.pool.grow(seq.block_table, len(seq.tokens)):
                self.preempt(self.running[-1])
        return [s for s in decode if s in self.running]

    def admit(self) -> None:
        """Move waiting sequences into the batch while there is room (in order: none jumps the queue).
        A prompt that starts with blocks already in the pool takes them and skips their prefill."""
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            shared = []
            if self.config.prefix_caching:  # at least one token is left to read: its logits are needed
                shared = self.pool.cached_prefix(prefix_hashes(seq.tokens[: seq.prefill_target - 1], bs))
            # Shared blocks nobody holds now come out of the free list too.
            idle_shared = sum(self.pool.users[b] == 0 for b in shared)
            cost = blocks_needed(seq.prefill_target + 1, bs) - len(shared) + idle_shared
            if cost + (self.watermark if self.running else 0) > self.pool.num_free:
                break
            self.waiting.popleft()
            seq.block_table = self.pool.share(shared) + self.pool.allocate(seq.prefill_target + 1 - len(shared) * bs)
            seq.num_cached = len(shared) * bs
            seq.block_hashes = prefix_hashes(seq.tokens[: seq.num_cached], bs)
            self.cached_tokens += seq.num_cached
            self.running.append(seq)

    def register(self, seq: Sequence) -> None:
        """Name the blocks `seq` has just filled, so later prompts can share them."""
        if not self.config.prefix_caching:
            return
        bs, full = self.pool.block_size, seq.num_cached // self.pool.block_size
        for i in range(len(seq.block_hashes), full):
            previous = seq.block_hashes[-1] if seq.block_hashes else None
            (h,) = prefix_hashes(seq.tokens[i * bs : (i + 1) * bs], bs, previous)
            seq.block_hashes.append(h)
            self.pool.register(seq.block_table[i], h)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.block_table)
        seq.num_cached, seq.prefill_target, seq.block_hashes = 0, len(seq.tokens), []
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and give its blocks back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.block_table)

    def cancelled(self) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.cancelled]
