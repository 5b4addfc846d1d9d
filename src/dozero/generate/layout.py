"""How the weights sit in memory for decoding on a CPU: same values, faster one token at a time.

Decoding one token multiplies a single vector by every weight matrix: each matrix is read once
from memory and used for one multiply-add per number, so memory traffic sets the speed (GPT-2 124M
reads ~500 MB of fp32 weights per token). Two things make that traffic faster on a CPU:

1. the (in, out) layout: `x @ W` with W stored (in, out) reads whole rows, and MKL's kernel for it is
   faster here than for the (out, in) layout `nn.Linear` keeps;
2. every core reading its own slice: MKL runs a matrix-vector product on one core, which reaches
   ~17 GB/s of the machine's ~29 GB/s (2-core AMD EPYC, `sum()` over 512 MB). `DecodingLinear`
   splits the input dimension into one slice per thread and lets `torch.bmm` give each core one.

    use_decoding_layout(model)   # once, after loading a model to generate (the CLI does it)

A small, deep model (SmolLM2-135M: 30 layers x 576) is then held back by the number of tensor calls
per token more than by memory: the generation engine decodes one sequence through `OneTokenStep`,
the same arithmetic planned once per generation (buffers, views, fused adds): 521 calls per token
instead of 1,515.

Training is untouched: these are transformations applied from outside to a finished model, as LoRA
or quantization would be. A model that goes on training keeps `nn.Linear`; `generation_mode` then
only borrows a transposed copy of its output head (`transposed_head`).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from dozero.model.gpt import LayerNorm, RMSNorm, TransformerBlock, apply_rope
from dozero.model.native import ACTIVATIONS, NativeBlocks
from dozero.model.quantized import QuantizedEmbedding, QuantizedLinear, packed_mm_bf16


def is_decoding_layout(weight: torch.Tensor) -> bool:
    """True for an (out, in) weight that is a view of (in, out) storage."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


class DecodingLinear(torch.nn.Module):
    """`nn.Linear` for decoding on a multi-core CPU, holding the very same parameters (so a tied head
    stays tied and the state dict keeps its keys) with the weight stored (in, out).

    An input of a few rows (one token per sequence, a short prompt) is computed as `threads` partial
    products over slices of the input dimension, summed: x (R, K) @ W (K, N) = sum_i x_i (R, K/s) @ W_i
    (K/s, N). In the (in, out) storage each W_i is a view, so nothing is copied. Measured (2 threads,
    AMD EPYC, fp32, weights out of cache): the 48 block matrices of GPT-2 124M take 12 instead of
    18 ms per token, its output head 4.0 instead of 5.7 ms; a 16-token prompt 43 instead of 68 ms.
    From ~128 rows on, MKL's own matrix-matrix product spreads over the cores and wins, and a small
    matrix that stays in cache gains nothing from a second core: those take one `x @ W`. Sums in
    another order: results match `nn.Linear` to fp32 rounding (~1e-6).
    """

    SPLIT_MAX_ROWS = 64  # measured crossover: 64 rows 98 vs 115 ms (split vs F.linear), 256 rows 78 vs 74
    SPLIT_MIN_WEIGHTS = 1 << 18  # one row: 128 x 512 took 16 vs 10 us split, 256 x 1024 30 vs 33 us

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # (out, in); a Parameter stays the same object (and a tied one, tied)
        self.bias = bias
        self._slices = None  # (threads, the weight's address, its (s, K/s, N) view): made once, not per token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        # Under torch.compile: one product, which inductor plans itself (get_num_threads would also
        # break the graph in two).
        splits = 1 if torch.compiler.is_compiling() else torch.get_num_threads()
        rows = x.numel() // K
        w_slices = self.weight_slices(splits) if 1 < splits and rows <= self.SPLIT_MAX_ROWS else None
        if w_slices is not None:
            # (s, R, K/s); one row (decoding one token) is a plain view, no transpose
            slices = x.reshape(splits, 1, K // splits) if rows == 1 else x.reshape(rows, splits, -1).transpose(0, 1)
            y = torch.bmm(slices, w_slices).sum(0).view(*x.shape[:-1], N)  # (s, R, N) partial products, summed
        else:
            y = x @ self.weight.t()  # (..., K) @ (K, N), read as stored (F.linear was slower on this layout)
        return y if self.bias is None else y + self.bias

    def weight_slices(self, splits: int) -> torch.Tensor | None:
        """The weight as `splits` slices of its input dimension (s, K/s, N), a view of the (in, out) storage;
        None when it is not split (too small, not laid out, K not divisible). Kept between calls: building
        the view took 2 of the 7 calls of a one-token product (SmolLM2 makes 121 products per token). A
        weight given new storage (`.data =`, `.to()`) has another address, so its view is made again.
        With gradients on, a fresh view every call: one kept from inference mode carries no gradient."""
        K, N = self.in_features, self.out_features
        cached, keep = self._slices, not torch.is_grad_enabled()
        if keep and cached is not None and cached[0] == splits and cached[1] == self.weight.data_ptr():
            return cached[2]
        w = self.weight.t()  # (K, N): contiguous in the decoding layout
        split = K % splits == 0 and K * N >= self.SPLIT_MIN_WEIGHTS and w.is_contiguous()
        view = w.view(splits, K // splits, N) if split else None
        if keep:
            self._slices = (splits, self.weight.data_ptr(), view)
        return view

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class DecodingBlock(TransformerBlock):
    """A `TransformerBlock` (the same modules and parameters) with a short path for decoding one token
    per row from a KV cache: a deep, narrow model such as SmolLM2-135M (30 layers x 576) spends a third
    of each token's time calling ~70 small operations per layer from Python, not multiplying.

    The short path is the block's own arithmetic in fewer calls: queries and keys turned by RoPE in one
    rotation, and grouped-query attention as one product per key/value head with its group of query heads
    as the rows (no copied keys, and no fused-attention kernel set up to read a single query row). Every
    other call (a prompt, training, attention weights asked for) takes `TransformerBlock.forward`.
    Results equal it to fp32 rounding (the softmax is summed in another order).
    """

    def forward(self, x, input_pos=None, attn_mask=None, need_weights=False, rope=None):
        att = self.att
        if x.shape[1] != 1 or att.kv_cache is None or attn_mask is None or need_weights or self.training:
            return super().forward(x, input_pos, attn_mask, need_weights, rope)
        B = x.shape[0]  # legend: model/gpt.py; here T = 1, g = nh / nkv query heads per key/value head
        nh, nkv, hs = att.n_heads, att.n_kv_heads, att.head_dim
        heads = att.qkv(self.norm1(x)).view(B, 1, nh + 2 * nkv, hs)  # (B, 1, nh + 2 nkv, hs): q, k, v heads
        qk, v = heads[:, :, : nh + nkv], heads[:, :, nh + nkv :]
        if rope is not None:  # cos, sin (B or 1, 1, 1, hs) broadcast over every query and key head at once
            cos, sin = rope if rope[0].dtype == qk.dtype else (rope[0].to(qk.dtype), rope[1].to(qk.dtype))
            qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, :nh], qk[:, :, nh:]
        keys, values = att.kv_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2), attn_mask.shape[-1])
        q = q.reshape(B, nkv, nh // nkv, hs) * (1.0 / math.sqrt(hs))  # (B, nkv, g, hs): a group's queries as rows
        scores = q @ keys.transpose(-2, -1)  # (B, nkv, g, hs) @ (B, nkv, hs, S) -> (B, nkv, g, S)
        scores = torch.where(attn_mask, scores, float("-inf"))  # mask (B or 1, 1, 1, S), True = may attend
        y = torch.softmax(scores, dim=-1) @ values  # (B, nkv, g, S) @ (B, nkv, S, hs) -> (B, nkv, g, hs)
        x = x + att.out_proj(y.reshape(B, 1, nh * hs))  # heads in order: key/value head j serves query heads j*g ..
        return x + self.ff(self.norm2(x)), None


def use_decoding_layout(model) -> None:
    """Lay a CPU model out for decoding, once, in place: every big `nn.Linear` weight (and so the tied
    embedding) stored (in, out), and its `nn.Linear` replaced by a `DecodingLinear` holding the same
    parameters. Same values, same shapes, same state dict, no second copy of any weight. Matrices
    below `DecodingLinear.SPLIT_MIN_WEIGHTS` stay as they are: in cache, their layout does not matter,
    and a plain `nn.Linear` call costs less Python (the 128-wide model decoded 3-8% slower with all of
    them laid out).

    Whole generation (benchmarks/generate_speed.py, GPT-2 124M, 2 threads): the (in, out) layout alone
    gave +3% tokens/s; with `DecodingLinear`, see the README. Embedding lookups then read a strided row,
    which costs nothing at one token per step.

    It is a one-time cost (~0.25 s at 124M), not done per call: laying out and restoring 340 MB around
    each `generate` took 230 ms, as long as the time it saved over 128 tokens. A laid-out model still
    saves and loads as usual. A model in training is not laid out (its optimizer state keeps the
    weights' first layout); `generation_mode` borrows a transposed copy of its output head only.
    """
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is not torch.nn.Linear or child.weight.device.type != "cpu":
                    continue
                if child.weight.numel() < DecodingLinear.SPLIT_MIN_WEIGHTS:
                    continue  # in cache, its layout does not matter, and nn.Linear's call is cheaper
                if not is_decoding_layout(child.weight):
                    child.weight.data = child.weight.data.t().contiguous().t()  # (out, in) view of (in, out)
                setattr(parent, name, DecodingLinear(child.weight, child.bias))
    for block in model.modules():
        if type(block) is TransformerBlock:
            block.__class__ = DecodingBlock  # the same object, modules and parameters: only forward changes


_TRANSPOSED_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transposed_head(head: torch.nn.Linear, reuse: bool = True) -> DecodingLinear:
    """A `DecodingLinear` over an (in, out) copy of the output head's weight, for a model that keeps its
    own layout (one in training): one token at a time the GPT-2 head takes 5.9 instead of 10.5 ms in
    that layout (1 thread), a 128-wide one 0.63 instead of 1.7 ms. With `reuse`, made once and reused
    while the weight is unchanged: the copy (10 ms for a 25 MB head here) would otherwise add to every
    call's first token. A model in training must pass reuse=False: fused AdamW writes the weight in
    place without bumping its `_version` (checked: 0 -> 0 after a step), so no cheap key can tell that
    the weight changed, and a cached copy would sample from a stale head."""
    weight = head.weight
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    cached = _TRANSPOSED_HEADS.get(head) if reuse else None
    if cached is None or cached[0] != key:
        laid_out = weight.detach().t().contiguous().t()  # (V, C) view of (C, V) storage
        cached = (key, DecodingLinear(laid_out))
        if reuse:
            _TRANSPOSED_HEADS[head] = cached
    return cached[1]


def split_columns(weight: torch.Tensor, splits: int) -> torch.Tensor:
    """An (out, in) weight as `splits` slices of its output columns, (s, in, out/s): a view in either layout.
    `torch.bmm(x.expand(s, 1, in), slices)` gives each core one slice and the (s, 1, out/s) result IS the
    (1, out) row in memory: no partial sums to add (splitting the input dimension needs one more call)."""
    N, K = weight.shape
    return weight.t().view(K, splits, N // splits).transpose(0, 1)


class OneTokenStep:
    """The decode step of ONE sequence on a CPU, planned once per generation: the arithmetic of
    `DecodingBlock`'s short path in 17 tensor calls per layer instead of ~50 (16 for GPT-2's). At
    SmolLM2-135M's size a step spent ~16 of its ~45 ms calling 1,515 small operations from Python, not
    multiplying; it now makes 521.

    - Every tensor a layer writes (its heads, their rotation, attention output, feed-forward hidden) is
      allocated once and the products write into it (`out=`); every view of it (query groups, the new
      keys and values, the split rows) is made once too.
    - Products split over output columns, one slice per thread (`split_columns`); the residual add is
      the product's own (`baddbmm_` into the residual stream, beta = 1).
    - RoPE as x cos + roll(x) sin, the sign of rotate_half folded into the sin table, on queries, keys
      and values at once (values: cos 1, sin 0, unchanged); 1/sqrt(hs) as `baddbmm`'s alpha.
    - Each layer's keys and values sit in one buffer (2 nkv, S, hs), the KV cache's k and v being views
      of it: one `index_copy_` stores both. Attention reads a window of slots rounded up to `WINDOW`,
      the unfilled ones masked by an additive -inf, so its views are remade once every `WINDOW` tokens.

    Results equal the model's to fp32 rounding (sums in another order; RoPE's multiply-add is fused).
    `one_token_step` builds it where it applies; elsewhere the model's own forward runs.
    """

    WINDOW = 32  # attention slots are read in steps of this many (a wider window costs only masked zeros)

    def __init__(self, model, cache_len: int, filled: int):
        w = model.tok_emb.weight
        threads = torch.get_num_threads()
        att0 = model.trf_blocks[0].att
        nh, nkv, hs = att0.n_heads, att0.n_kv_heads, att0.head_dim
        H = nh + 2 * nkv  # heads of one qkv product: queries, keys, values
        self.scale, self.tok_emb = 1.0 / math.sqrt(hs), w
        self.quantized_emb = model.tok_emb if isinstance(model.tok_emb, QuantizedEmbedding) else None
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight
        self.x = x = w.new_zeros(1, model.cfg.emb_dim)  # the residual stream (1, C), written in place
        self.mask = w.new_full((1, 1, cache_len), float("-inf"))  # additive: 0 where a slot holds a token
        self.mask[..., :filled] = 0.0
        self.rope = model.pos_emb is None
        if self.rope:  # per token, the rows of the (H, 1, hs) tables for queries and keys take its angles
            half = torch.cat([-torch.ones(hs // 2), torch.ones(hs // 2)])  # rotate_half's signs
            self.cos_table = model.rope_cos[:cache_len].to(w.dtype)
            self.sin_table = (model.rope_sin[:cache_len] * half).to(w.dtype)
            self.cos, self.sin = w.new_ones(H, 1, hs), w.new_zeros(H, 1, hs)
            self.cos_qk, self.sin_qk = self.cos[: nh + nkv], self.sin[: nh + nkv]
        self.layers = [LayerPlan(b, x, threads, cache_len, self.rope) for b in model.trf_blocks]
        self.native = native_blocks(model, self.layers, cache_len)
        self.final_norm = norm_function(model.final_norm)
        self.head = RowProduct(model.out_head, threads)
        self.window = 0

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens (1,) at cache slot `pos` (1,) (`slot` as a Python int) -> logits (1, V)."""
        x = self.x
        if self.quantized_emb is None:
            torch.index_select(self.tok_emb, 0, tokens, out=x)  # (1, C)
        else:
            x.copy_(self.quantized_emb(tokens))
        if self.pos_emb is not None:
            x.add_(self.pos_emb[pos])
        self.mask.index_fill_(2, pos, 0.0)
        if slot >= self.window:
            self.widen(slot + 1)
        if self.native is not None:  # every block in one call of decode.c
            rows = (self.cos_table[slot].data_ptr(), self.sin_table[slot].data_ptr()) if self.rope else (None, None)
            self.native(x, *rows, self.mask, self.window, slot)
        else:
            if self.rope:
                self.cos_qk.copy_(self.cos_table[pos])  # (1, hs) into every query and key row
                self.sin_qk.copy_(self.sin_table[pos])
            for layer in self.layers:
                layer(x, pos, self)
        h = self.final_norm(x)
        return self.head(h)  # (1, V)

    def widen(self, needed: int) -> None:
        """Read attention's slots [0, window) from now on: views of each layer's cache and of the mask."""
        self.window = min(self.mask.shape[-1], -(-needed // self.WINDOW) * self.WINDOW)
        self.window_mask = self.mask[..., : self.window]  # (1, 1, W)
        for layer in self.layers:
            layer.widen(self.window)


class LayerPlan:
    """One block's weights, buffers and views for `OneTokenStep` (legend: model/gpt.py; g = nh / nkv)."""

    def __init__(self, block, x: torch.Tensor, threads: int, cache_len: int, rope: bool):
        att, ff, w = block.att, block.ff, block.norm1.scale  # w: the dtype and device of every buffer
        nh, nkv, hs = att.n_heads, att.n_kv_heads, att.head_dim
        self.nkv, H = nkv, nh + 2 * nkv
        self.norm1, self.norm2 = norm_function(block.norm1), norm_function(block.norm2)
        self.qkv = RowProduct(att.qkv, threads)
        self.heads = w.new_empty(self.qkv.splits, 1, H * hs // self.qkv.splits)  # the product's output ...
        heads = self.heads.view(H, 1, hs)  # ... as heads: nh queries, nkv keys, nkv values
        self.turned = w.new_empty(H, 1, hs) if rope else heads  # after RoPE
        self.heads_view, self.rolled_half = heads, hs // 2
        self.q = self.turned[:nh].view(nkv, nh // nkv, hs)  # (nkv, g, hs): a group's queries as rows
        self.new_kv = self.turned[nh:]  # (2 nkv, 1, hs): this token's keys and values
        att.kv_cache.k = att.kv_cache.v = None  # freed first: a long cache is not held twice
        self.cache = w.new_zeros(2 * nkv, cache_len, hs)  # (2 nkv, S, hs): keys, then values
        att.kv_cache.k, att.kv_cache.v = self.cache[None, :nkv], self.cache[None, nkv:]  # what prefill fills
        self.y = w.new_empty(nkv, nh // nkv, hs)  # attention's output, heads in order
        self.out = RowProduct(att.out_proj, threads, self.y.view(1, -1), x)  # x += y W_out + b
        self.swiglu, self.gelu_approximation = ff.swiglu, ff.gelu_approximation
        self.fc = RowProduct(ff.fc, threads)
        self.fc_out = w.new_empty(self.fc.splits, 1, ff.fc.out_features // self.fc.splits)
        flat = self.fc_out.view(1, -1)
        hidden = ff.proj.in_features
        self.gate, self.up = flat[:, :hidden], flat[:, hidden:]  # SwiGLU's stacked rows (see FeedForward)
        self.hidden = w.new_empty(1, hidden)
        self.proj = RowProduct(ff.proj, threads, self.hidden, x)  # x += hidden W_proj + b

    def widen(self, window: int) -> None:
        nkv = self.nkv
        self.keys_t = self.cache[:nkv, :window].transpose(1, 2)  # (nkv, hs, W)
        self.values = self.cache[nkv:, :window]  # (nkv, W, hs)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, step: OneTokenStep) -> None:
        """Add this block's attention and feed-forward to the residual stream x (1, C), in place."""
        self.qkv.into(self.norm1(x), self.heads)  # (s, 1, (nh + 2 nkv) hs / s)
        if step.rope:
            torch.mul(self.heads_view, step.cos, out=self.turned)
            self.turned.addcmul_(self.heads_view.roll(self.rolled_half, -1), step.sin)
        self.cache.index_copy_(1, pos, self.new_kv)
        # (nkv, g, hs) @ (nkv, hs, W) -> (nkv, g, W), scaled, plus the mask (0 or -inf)
        scores = torch.baddbmm(step.window_mask, self.q, self.keys_t, alpha=step.scale)
        torch.bmm(torch.softmax(scores, dim=-1), self.values, out=self.y)  # (nkv, g, hs)
        self.out.add()  # x += y W_out + b: the shortcut
        self.fc.into(self.norm2(x), self.fc_out)  # (s, 1, 2H / s) or (s, 1, H / s)
        if self.swiglu:
            torch.mul(F.silu(self.gate), self.up, out=self.hidden)
        else:
            self.hidden.copy_(F.gelu(self.gate, approximate=self.gelu_approximation))
        self.proj.add()


class RowProduct:
    """One layer's product with one row, planned once. A float weight: `split_columns` slices, one per
    thread, and `baddbmm` writing the result where it goes (the bias or the residual stream as its
    addend). A quantized layer (model/quantized.py): its own kernel, then one copy or add; with the
    "packed" kernel, called directly: dozero's own on the float row, PyTorch's on a bfloat16 copy of the row
    kept for it (2-3 tensor calls where the module makes ~10: SmolLM2 makes 121 products a token). Given the
    buffers `h` (1, K) it reads and
    `x` (1, N) it adds to, their views are made here, once."""

    def __init__(self, linear, threads: int, h: torch.Tensor | None = None, x: torch.Tensor | None = None):
        self.quantized = isinstance(linear, QuantizedLinear)
        self.linear, self.bias, self.h, self.x = linear, linear.bias, h, x
        self.splits = 1 if self.quantized else splits_for(linear.weight, threads)
        self.packed = self.quantized and linear.kernel_for(linear.scales.new_empty(1, dtype=torch.float32)) == "packed"
        if self.packed:
            self.one_row = linear.few_rows()  # dozero's own kernel (model/native.py), or None: PyTorch's
            if self.one_row is None:
                self.h_bf16 = torch.empty(1, linear.in_features, dtype=torch.bfloat16)
                self.weights = linear.packed_weight()
            self.y = torch.empty(1, linear.out_features)  # where it writes
        if not self.quantized:
            self.slices = split_columns(linear.weight, self.splits)
            self.column_bias = column_bias(linear, self.splits)
            if h is not None:
                self.h_in, self.x_out = h.view(1, 1, -1).expand(self.splits, 1, -1), x.view(self.splits, 1, -1)

    def product(self, h: torch.Tensor) -> torch.Tensor:
        """h (1, K) W^T + b: the quantized layer's (1, N), float32 from dozero's kernel (in `self.y`, which
        the next call overwrites), bfloat16 from PyTorch's."""
        if not self.packed:
            return self.linear(h)
        if self.one_row is not None:  # reads the float row itself
            y = self.one_row(h, self.y)
        else:
            self.h_bf16.copy_(h)
            y = packed_mm_bf16(self.h_bf16, self.weights, self.linear.out_features)
        return y if self.bias is None else y + self.bias

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h (1, K) W^T + b, a new (1, N) tensor (the output head's logits)."""
        if self.quantized:
            return self.product(h).to(h.dtype, copy=True)  # not `self.y`, which the next call overwrites
        y = torch.bmm(h.expand(self.splits, 1, -1), self.slices).view(1, -1)
        return y if self.bias is None else y + self.bias

    def into(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """out (s, 1, N/s) = h (1, K) W^T + b."""
        if self.quantized:
            out.view(1, -1).copy_(self.product(h))
        else:
            torch.baddbmm(self.column_bias, h.expand(self.splits, 1, -1), self.slices, out=out)

    def add(self) -> None:
        """x += h W^T + b, in place, for the planned h and x."""
        if self.quantized:
            self.x.add_(self.product(self.h))
            return
        self.x_out.baddbmm_(self.h_in, self.slices)
        if self.bias is not None:
            self.x.add_(self.bias)


def splits_for(weight: torch.Tensor, threads: int) -> int:
    """Column slices of a one-row product: one per thread, or one for a matrix that stays in cache."""
    big = weight.numel() >= DecodingLinear.SPLIT_MIN_WEIGHTS
    return threads if big and weight.shape[0] % threads == 0 else 1


def column_bias(linear, splits: int) -> torch.Tensor:
    """A layer's bias as `split_columns`' output (s, 1, out/s); zeros without one (baddbmm adds it)."""
    out = linear.weight.shape[0]
    bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(out)
    return bias.view(splits, 1, out // splits)


def norm_function(norm):
    """The norm's own fused kernel, called without the module (a module call costs more than the kernel)."""
    shape = (norm.scale.shape[0],)
    if type(norm) is RMSNorm:
        return lambda x: torch.rms_norm(x, shape, norm.scale, norm.eps)
    return lambda x: torch.layer_norm(x, shape, norm.scale, norm.shift, norm.eps)


PLAIN_LINEAR = (torch.nn.Linear, DecodingLinear)


def native_blocks(model, plans: list[LayerPlan], cache_len: int) -> NativeBlocks | None:
    """decode.c's one call for every block (model/native.py), where each of their products runs dozero's own
    int8/int4 kernel and the weights the C code reads are float32; None elsewhere (a float model, PyTorch's
    kernels, `DOZERO_NATIVE=0`), where `LayerPlan`s run the blocks."""
    products = [(plan.qkv, plan.out, plan.fc, plan.proj) for plan in plans]
    if not all(p.packed and p.one_row is not None for group in products for p in group):
        return None
    blocks = list(model.trf_blocks)
    floats = [t for b in blocks for t in (b.norm1.scale, b.norm2.scale)] + [p.bias for g in products for p in g]
    floats.append(plans[0].cache)  # and so the stream, the mask and RoPE's tables (the same dtype)
    activation = "swiglu" if blocks[0].ff.swiglu else blocks[0].ff.gelu_approximation
    if any(t is not None and t.dtype != torch.float32 for t in floats) or activation not in ACTIVATIONS:
        return None
    layers = []
    for block, plan, group in zip(blocks, plans, products, strict=True):
        layer = {name: p.one_row for name, p in zip(("qkv", "out", "fc", "proj"), group, strict=True)}
        layer["biases"] = [p.bias if p.bias is None else p.bias.detach() for p in group]
        for name, n in (("norm1", block.norm1), ("norm2", block.norm2)):
            layer[name] = (n.scale, getattr(n, "shift", None), n.eps)  # LayerNorm's shift, or None: RMSNorm
        layer["cache"] = plan.cache
        layers.append(layer)
    att, hidden = blocks[0].att, blocks[0].ff.proj.in_features
    shape = dict(C=model.cfg.emb_dim, nh=att.n_heads, nkv=att.n_kv_heads, hs=att.head_dim, hidden=hidden, S=cache_len)
    return NativeBlocks(layers, shape, activation)


def one_token_step(model, batch_size: int, cache_len: int, filled: int) -> OneTokenStep | None:
    """The planned step for a model laid out for decoding (`use_decoding_layout`), after `setup_kv_cache`
    and before the prompt fills `filled` slots; None where it does not apply: a batch, a model in
    training or off the CPU, layers it does not know (LoRA, sharded), blocks of several shapes. Quantized
    layers (model/quantized.py) run their own kernel inside the plan."""
    blocks = list(model.trf_blocks)
    linears = [m for b in blocks for m in (b.att.qkv, b.att.out_proj, b.ff.fc, b.ff.proj)] + [model.out_head]
    linears = [m for m in linears if type(m) is not QuantizedLinear]
    embeddings = [e for e in (model.tok_emb, model.pos_emb) if e is not None and type(e) is not QuantizedEmbedding]
    shapes = {(b.att.n_heads, b.att.n_kv_heads, b.att.head_dim) for b in blocks}
    norms = [n for b in blocks for n in (b.norm1, b.norm2)] + [model.final_norm]
    applies = (
        batch_size == 1
        and not model.training
        and not torch.is_grad_enabled()  # the products write into buffers (`out=`), which autograd refuses
        and model.tok_emb.weight.device.type == "cpu"
        and all(type(e) is torch.nn.Embedding for e in embeddings)
        and all(type(b) is DecodingBlock and b.att.kv_cache is not None for b in blocks)
        and all(type(m) in PLAIN_LINEAR and type(m.weight.data) is torch.Tensor for m in linears)
        and all(m.weight.is_contiguous() or is_decoding_layout(m.weight) for m in linears)
        and len({p.dtype for p in model.parameters()} | {b.att.kv_cache.k.dtype for b in blocks}) == 1
        and all(type(n) in (RMSNorm, LayerNorm) for n in norms)
        and len(shapes) == 1
    )
    return OneTokenStep(model, cache_len, filled) if applies else None
