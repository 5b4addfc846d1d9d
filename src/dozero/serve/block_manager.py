"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, handed out and taken back.

Every sequence holds a block table, the list of block numbers its tokens live in: token p of the
sequence sits in block `table[p // block_size]`, at offset `p % block_size`. Blocks are the same
size for everyone, so a finished sequence's blocks fit any new one: no fragmentation, and memory
grows with the tokens really held, not with the longest possible request (Kwon et al. 2023,
"Efficient Memory Management for LLM Serving with PagedAttention").

Blocks are handed out as sequences grow: a sequence is admitted with blocks for its prompt, and
takes one more block each time its tokens fill the last one. When the pool runs dry, the
scheduler preempts the newest sequence: its blocks go back, and it is read again from its tokens
later (recomputation, as vLLM does by default). Pure Python: the tensors live in
`runner.PagedKVCache`.
"""

from __future__ import annotations


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)  # ceil


class BlockPool:
    """Which of `num_blocks` blocks are free. Called from the engine's thread only."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low numbers first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens, self.block_size) <= len(self.free)

    def allocate(self, num_tokens: int) -> list[int]:
        """A block table with room for `num_tokens` tokens. The caller checked `can_allocate`."""
        n = blocks_needed(num_tokens, self.block_size)
        if n > len(self.free):
            raise RuntimeError(f"{n} KV blocks asked for, {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Add blocks to `table` until it has room for `num_tokens` tokens; False (nothing taken) if
        the pool has too few."""
        more = blocks_needed(num_tokens, self.block_size) - len(table)
        if more > len(self.free):
            return False
        table.extend(self.free.pop() for _ in range(max(0, more)))
        return True

    def release(self, table: list[int]) -> None:
        """Take a finished sequence's blocks back (its table is emptied, so a second release is harmless)."""
        self.free.extend(reversed(table))
        table.clear()
