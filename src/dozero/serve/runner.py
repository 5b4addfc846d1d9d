"""A step as tensors: the paged KV cache and the model call (nano-vllm's `ModelRunner`).

The pool holds, per layer, keys and values of shape (num_blocks * block_size, nkv, hs): one row per
cache slot; slot = block * block_size + offset. A sequence's token p lives in slot
`table[p // block_size] * block_size + p % block_size`.

The model is dozero's own `GPTModel`, unchanged: each attention layer gets a `PagedLayerCache` as
its `kv_cache`. The layer calls `update(input_pos, k, v, S)` with this step's new keys and values;
the paged cache writes them into their slots and hands back, for every row, the keys and values of
its first S positions gathered from its blocks (B, nkv, S, hs), padded past each row's length. The
attention mask (B, 1, T, S) hides the padding and the future, so the model computes exactly what it
computes with a contiguous cache. Readable gathers, not a fused kernel: the slot indices are built
once per step for all layers, and each layer does one `index_copy_` and one `index_select` per
tensor (profiled on a 16-client SmolLM2-shaped run: the gathers were ~10% of a step, the matrix
multiplies ~80%).

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
        # row reads (B * S,), row after row. The same for all layers.
        self.write_slots: torch.Tensor | None = None
        self.read_slots: torch.Tensor | None = None

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        cfg = model.cfg
        per_token = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * model.tok_emb.weight.element_size()
        return per_token * block_size


class PagedLayerCache(nn.Module):
    """What one attention layer sees as its `kv_cache` (an nn.Module, as `KVCache` is)."""

    def __init__(self, pool: PagedKVCache, layer: int):
        super().__init__()
        self.pool, self.layer = pool, layer

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor, end: int):
        """Write k, v (B, nkv, T, hs) at this step's slots; return every row's keys and values
        (B, nkv, S, hs) read from its blocks. `input_pos` is not used: each row has its own positions.
        `end` is S, the width of the step's mask, which `read_slots` was built for."""
        pool, (B, nkv, T, hs) = self.pool, k.shape
        k_pool, v_pool = pool.k[self.layer], pool.v[self.layer]
        # index_copy_ / index_select over a flat index list: measured 4x and 6x faster on this CPU than
        # the same writes and reads as advanced indexing (k_pool[slots] = ..., k_pool[slots2d]).
        new_k = k.transpose(1, 2).reshape(B * T, nkv, hs)  # (N, nkv, hs)
        new_v = v.transpose(1, 2).reshape(B * T, nkv, hs)
        k_pool.index_copy_(0, pool.write_slots, new_k.to(k_pool.dtype))
        v_pool.index_copy_(0, pool.write_slots, new_v.to(v_pool.dtype))
        S = pool.read_slots.numel() // B
        keys = k_pool.index_select(0, pool.read_slots).view(B, S, nkv, hs)  # (B*S, nkv, hs) -> (B, S, nkv, hs)
        values = v_pool.index_select(0, pool.read_slots).view(B, S, nkv, hs)
        return keys.transpose(1, 2), values.transpose(1, 2)  # (B, nkv, S, hs)


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
        dev, bs, T = self.device, self.cache.block_size, max(num_new)
        starts = [s.num_cached for s in seqs]
        S = max(a + n for a, n in zip(starts, num_new, strict=True))
        # The step's index tensors, built once for all layers from the padded block tables (B, S/bs).
        width = -(-S // bs)
        tables = torch.tensor([(s.block_table + [0] * width)[:width] for s in seqs], device=dev)  # (B, S/bs)
        keys = torch.arange(S, device=dev)  # (S,)
        read = tables[:, keys // bs] * bs + keys % bs  # (B, S): past a row's length, junk that the mask hides
        offsets = torch.arange(T, device=dev)  # (T,)
        start_t, new_t = torch.tensor(starts, device=dev), torch.tensor(num_new, device=dev)  # (B,)
        real = offsets[None, :] < new_t[:, None]  # (B, T): False on a shorter row's padding
        # A padding query repeats its row's last position (its logits are not used).
        positions = start_t[:, None] + torch.minimum(offsets[None, :], new_t[:, None] - 1)  # (B, T)
        write = torch.where(real, read.gather(1, positions), self.cache.scratch)  # padding writes to scratch
        self.cache.write_slots, self.cache.read_slots = write.flatten(), read.flatten()  # (N,), (B * S,)
        tokens = [s.tokens[a : a + n] + [0] * (T - n) for s, a, n in zip(seqs, starts, num_new, strict=True)]
        # Query at position p sees keys 0..p of its own row.
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        same = min(num_new) == T  # no padding: only the last position's logits are needed
        logits = self.model(torch.tensor(tokens, device=dev), keys[:T], positions, mask, last_only=same)
        if same:
            return logits[:, -1]  # (B, V)
        last = torch.tensor([n - 1 for n in num_new], device=dev)
        return logits[torch.arange(len(seqs), device=dev), last]  # (B, T, V) -> (B, V)
