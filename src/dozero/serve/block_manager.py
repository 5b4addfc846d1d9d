"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, handed out and taken back.

Every sequence holds a block table, the list of block numbers its tokens live in: token p of the
sequence sits in block `table[p // block_size]`, at offset `p % block_size`. Blocks are the same
size for everyone, so a finished sequence's blocks fit any new one: no fragmentation, and memory
grows with the tokens really held, not with the longest possible request (Kwon et al. 2023,
"Efficient Memory Management for LLM Serving with PagedAttention").

Blocks are handed out as sequences grow: a sequence is admitted with blocks for its prompt, and
takes one more block each time its tokens fill the last one. When the pool runs dry, the
scheduler preempts the newest sequence: its blocks go back, and it is read again from its tokens
later (recomputation, as vLLM does by default).

Prefix sharing: a full block's contents are named by a hash of its tokens and of everything before
them. A new sequence whose prompt starts with blocks already in the pool (a shared system prompt,
the earlier turns of a chat) takes those blocks instead of computing them again; a block counts its
users and returns to the free list when the last one lets go. Free blocks keep their contents until
they are handed out again, oldest-freed first, so a prefix stays findable for a while after its
sequence ended. Pure Python: the tensors live in `runner.PagedKVCache`.
"""

from __future__ import annotations

from collections import Counter, deque


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)  # ceil


def prefix_hashes(tokens: list[int], block_size: int, previous: int | None = None) -> list[int]:
    """One hash per full block of `tokens`, each covering the block and all the blocks before it."""
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = hash((previous, *tokens[start : start + block_size]))
        hashes.append(previous)
    return hashes


class BlockPool:
    """Which of `num_blocks` blocks are free, who shares which, and which full blocks hold which
    prefix. Called from the engine's thread only."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))  # handed out from the left, returned to the right
        self.users = [0] * num_blocks  # sequences holding each block
        self.by_hash: dict[int, int] = {}  # prefix hash -> the block that holds it
        self.hash_of: dict[int, int] = {}  # block -> its prefix hash

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
        return [self._take_free() for _ in range(n)]

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Add blocks to `table` until it has room for `num_tokens` tokens; False (nothing taken) if
        the pool has too few."""
        more = blocks_needed(num_tokens, self.block_size) - len(table)
        if more > len(self.free):
            return False
        table.extend(self._take_free() for _ in range(max(0, more)))
        return True

    def cached_prefix(self, hashes: list[int]) -> list[int]:
        """The blocks holding the longest run of these prefix hashes (not taken yet: see `share`)."""
        blocks = []
        for h in hashes:
            if h not in self.by_hash:
                break
            blocks.append(self.by_hash[h])
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Take blocks found by `cached_prefix` for one more sequence."""
        for b in blocks:
            if self.users[b] == 0:
                self.free.remove(b)
            self.users[b] += 1
        return list(blocks)

    def register(self, block: int, prefix_hash: int) -> None:
        """`block` is full and holds the prefix `prefix_hash`: later prompts may share it."""
        if prefix_hash not in self.by_hash:
            self.by_hash[prefix_hash], self.hash_of[block] = block, prefix_hash

    def release(self, table: list[int]) -> None:
        """Let go of a sequence's blocks (its table is emptied, so a second release is harmless)."""
        for b in table:
            self.users[b] -= 1
            if self.users[b] == 0:
                self.free.append(b)
        table.clear()

    def check(self, tables: list[list[int]]) -> None:
        """Assert that the books balance, given the block tables of every sequence holding blocks: each
        block is either free (no users, on the free list exactly once) or counts exactly the tables
        that hold it. A leak (a block nobody holds and nobody can take) or a block handed out twice
        fails here. O(num_blocks): the engine runs it whenever it falls idle."""
        held = Counter(b for table in tables for b in table)
        on_list = Counter(self.free)
        for b in range(self.num_blocks):
            if self.users[b] != held[b] or on_list[b] != (held[b] == 0):
                raise AssertionError(
                    f"KV block {b}: {self.users[b]} users counted, held by {held[b]} sequences, "
                    f"{on_list[b]} times on the free list"
                )

    def _take_free(self) -> int:
        b = self.free.popleft()
        if b in self.hash_of:  # new contents: the old prefix is gone
            del self.by_hash[self.hash_of.pop(b)]
        self.users[b] = 1
        return b
