"""A step as tensors: the paged KV cache and the model call (nano-vllm's `ModelRunner`).

The pool holds, per layer, keys and values of shape (num_blocks * block_size, nkv, hs): one row per
cache slot; slot = block * block_size + offset. A sequence's token p lives in slot
`table[p // block_size] * block_size + p % block_size`.

The model is dozero's own `GPTModel`, unchanged: each attention layer gets a `PagedLayerCache` as
its `kv_cache`. The layer calls `update(input_pos, k, v, S)` with this step's new keys and values;
the paged cache writes them into their slots and hands back, for every row, the keys and values of
its first S positions gathered from its blocks (B, nkv, S, hs), padded past each row's length. The
attention mask (B, 1, T, S) hides the padding and the future, so the model computes exactly what it
computes with a contiguous cache. Readable gathers, not a fused kernel: correctness first.

Shape legend: B sequences in the step, T tokens per sequence in this call, S key positions,
nkv key/value heads, hs head size, N = B * T new tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dozero.serve.sequence import Sequence


class PagedKVCache:
    """The shared pool of key/value slots of every layer, sized from a memory budget."""

    def __init__(self, model, num_blocks: int, block_size: int):
        cfg, p = model.cfg, model.tok_emb.weight
        self.num_blocks, self.block_size = num_blocks, block_size
        # One slot more than the blocks hold: the padding of a shorter row writes its junk there.
        self.scratch = num_blocks * block_size
        shape = (num_blocks * block_size + 1, cfg.kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        # Set before each model call: where this step's new tokens go (N,), and which slots every
        # row reads (B, S). The same for all layers.
        self.write_slots: torch.Tensor | None = None
        self.read_slots: torch.Tensor | None = None

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        cfg = model.cfg
        per_token = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * model.tok_emb.weight.element_size()
        return per_token * block_size

    def slots(self, table: list[int], positions: range) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]


class PagedLayerCache(nn.Module):
    """What one attention layer sees as its `kv_cache` (an nn.Module, as `KVCache` is)."""

    def __init__(self, pool: PagedKVCache, layer: int):
        super().__init__()
        self.pool, self.layer = pool, layer

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor, end: int):
        """Write k, v (B, nkv, T, hs) at this step's slots; return every row's keys and values
        (B, nkv, S, hs) read from its blocks. `input_pos` is not used: each row has its own positions."""
        pool, (B, nkv, T, hs) = self.pool, k.shape
        k_pool, v_pool = pool.k[self.layer], pool.v[self.layer]
        k_pool[pool.write_slots] = k.transpose(1, 2).reshape(B * T, nkv, hs).to(k_pool.dtype)  # (N, nkv, hs)
        v_pool[pool.write_slots] = v.transpose(1, 2).reshape(B * T, nkv, hs).to(v_pool.dtype)
        read = pool.read_slots[:, :end]  # (B, S)
        return k_pool[read].transpose(1, 2), v_pool[read].transpose(1, 2)  # (B, S, nkv, hs) -> (B, nkv, S, hs)


class ModelRunner:
    """Runs the model on a list of sequences with the paged cache: prefill chunks and decode steps."""

    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model
        self.device = model.tok_emb.weight.device
        self.cache = PagedKVCache(model, num_blocks, block_size)
        self.layers = [PagedLayerCache(self.cache, i) for i in range(model.cfg.n_layers)]

    def close(self) -> None:
        self.model.clear_kv_cache()

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        """Feed each sequence its next `num_new[b]` uncached tokens; return the logits of each one's
        last fed token (B, V). Rows with fewer tokens than the longest are padded on the right."""
        # Installed at every call: `dozero.generate` on the same model in between puts its own caches there.
        for block, layer in zip(self.model.trf_blocks, self.layers, strict=True):
            block.att.kv_cache = layer
        T = max(num_new)
        S = max(s.num_cached + n for s, n in zip(seqs, num_new, strict=True))
        tokens, positions, write, read, lengths = [], [], [], [], []
        for s, n in zip(seqs, num_new, strict=True):
            start, stop = s.num_cached, s.num_cached + n
            pad = T - n
            tokens.append(s.tokens[start:stop] + [0] * pad)
            positions.append(list(range(start, stop)) + [stop - 1] * pad)
            write.append(self.cache.slots(s.block_table, range(start, stop)) + [self.cache.scratch] * pad)
            read.append(self.cache.slots(s.block_table, range(stop)) + [0] * (S - stop))
            lengths.append(stop)
        dev = self.device
        positions_t = torch.tensor(positions, device=dev)  # (B, T)
        self.cache.write_slots = torch.tensor(write, device=dev).flatten()  # (N,)
        self.cache.read_slots = torch.tensor(read, device=dev)  # (B, S)
        # Query at position p sees keys 0..p of its own row.
        keys = torch.arange(S, device=dev)
        mask = (keys[None, None, :] <= positions_t[:, :, None])[:, None]  # (B, 1, T, S)
        same = min(num_new) == T  # no padding: only the last position's logits are needed
        logits = self.model(torch.tensor(tokens, device=dev), keys[:T], positions_t, mask, last_only=same)
        if same:
            return logits[:, -1]  # (B, V)
        last = torch.tensor([n - 1 for n in num_new], device=dev)
        return logits[torch.arange(len(seqs), device=dev), last]  # (B, T, V) -> (B, V)
