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

Training is untouched: these are transformations applied from outside to a finished model, as LoRA
or quantization would be. A model that goes on training keeps `nn.Linear`; `generation_mode` then
only borrows a transposed copy of its output head (`transposed_head`).
"""

from __future__ import annotations

import math
import weakref

import torch

from dozero.model.gpt import TransformerBlock, apply_rope


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
