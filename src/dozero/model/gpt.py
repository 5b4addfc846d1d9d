"""GPT-2, written to be read top to bottom next to the course "LLM do Zero", with Llama's options.

Order follows the paper and the course: LayerNorm -> feed-forward (GELU) -> masked multi-head
attention -> transformer block -> GPT. The module is a pure `nn.Module`: no optimizer, no I/O,
no distributed code. Training, LoRA, compile and quantization are applied to it from outside.

The same classes build Llama-style models (Touvron et al. 2023) when `ModelConfig` asks for them:
RMSNorm beside LayerNorm, SwiGLU beside GELU, rotary position embeddings (RoPE) instead of learned
ones, fewer key/value heads than query heads (grouped-query attention), no biases. The defaults are
GPT-2's; `get_model_config("smollm2-135m")` is a real Llama-style shape.

Shape legend, used in every comment below:
    B  batch size              T  tokens in this call (query positions)
    S  key/value positions     C  emb_dim (model width)
    nh n_heads                 hs head size = C // nh
    nkv n_kv_heads (= nh unless grouped-query attention)
    H  feed-forward hidden width (4C for GPT-2)
    V  vocab_size

    >>> import torch
    >>> from dozero.config import get_model_config
    >>> model = GPTModel(get_model_config("shakespeare-char"))
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 65])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dozero.config import ModelConfig


class LayerNorm(nn.Module):
    """Normalize each token vector to mean 0, variance 1, then apply a learned scale and shift
    (no shift when `bias` is off)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm is the same arithmetic as the course's mean/var version (biased variance),
        # in one fused kernel.
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class RMSNorm(nn.Module):
    """Divide each token vector by its root mean square, then apply a learned scale: LayerNorm without
    the mean and the shift (Zhang & Sennrich 2019), as Llama does."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps) * scale, in one fused kernel.
        return F.rms_norm(x, (x.shape[-1],), self.scale, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.emb_dim, cfg.layer_norm_eps)
    return LayerNorm(cfg.emb_dim, cfg.layer_norm_eps, cfg.bias)


class FeedForward(nn.Module):
    """Expand 4x, GELU, project back; or, with `cfg.ff == "swiglu"`, Llama's gated form
    proj(silu(gate(x)) * up(x)) (Shazeer 2020).

    GPT-2 was trained with GELU's tanh approximation; models trained here from scratch may use the
    exact (erf) GELU, which PyTorch computes several times faster on CPUs (`cfg.gelu_approximation`).
    SwiGLU's gate and up matrices are stacked in `fc` (rows [0, H) gate, [H, 2H) up): the same
    arithmetic as two matrices, one matrix multiply, and the course's two names.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gelu_approximation = cfg.gelu_approximation
        self.swiglu = cfg.ff == "swiglu"
        H = cfg.hidden_dim
        self.fc = nn.Linear(cfg.emb_dim, 2 * H if self.swiglu else H, bias=cfg.bias)
        self.proj = nn.Linear(H, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)  # (B, T, C) -> 2 x (B, T, H)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(self.fc(x), approximate=self.gelu_approximation)  # (B, T, C) -> (B, T, H)
        return self.proj(hidden)  # (B, T, H) -> (B, T, C)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, hs) of RoPE's angles: position p turns dimension pair i by p * theta^(-2i/hs).

    Pairs are (i, i + hs/2), the first and second half of each head (Hugging Face's "rotate_half"
    layout, so Llama weights load as published). Computed in float32, as transformers does.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, hs): each angle serves both halves
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1, x2) of x (B, nh, T, hs) by its angle: (x1 cos - x2 sin, x2 cos + x1 sin).
    cos, sin (B or 1, 1, T, hs): the tables at these tokens' positions."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, nh, T, hs)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated once for a whole generation.

    Decoding one token then costs one new key/value per layer instead of recomputing the prompt.
    """

    def __init__(self, batch_size: int, max_len: int, n_heads: int, head_dim: int, dtype, device):
        """n_heads: the key/value heads (n_kv_heads: grouped-query attention stores only those)."""
        super().__init__()
        shape = (batch_size, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int):
        """Write k, v (B, nkv, T, hs) at slots `input_pos` (T,); return slots [0, end) (B, nkv, S, hs)."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))  # one kernel; k[:, :, pos] = ... took 2x as long
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadAttention(nn.Module):
    """Masked (causal) multi-head self-attention.

    The course's W_query, W_key and W_value are fused into one projection `qkv`: the same
    arithmetic, one matrix multiply instead of three. Its output rows are the queries (C), then
    keys and values (nkv * hs each; C with plain multi-head attention). With grouped-query attention
    each key/value head serves nh / nkv consecutive query heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.drop_rate = cfg.drop_rate
        self.kv_dim = self.n_kv_heads * self.head_dim
        self.gqa = self.n_kv_heads != self.n_heads  # SDPA then serves each key/value head to its group
        self.qkv = nn.Linear(cfg.emb_dim, self.n_heads * self.head_dim + 2 * self.kv_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, cfg.emb_dim, bias=cfg.bias)  # C x C unless pruned
        self.kv_cache: KVCache | None = None

    def forward(self, x, input_pos=None, attn_mask=None, need_weights=False, rope=None):
        """x (B, T, C) -> (B, T, C), and the attention weights (B, nh, T, S) if `need_weights`.

        input_pos (T,): cache slots of these tokens (only with a KV cache).
        attn_mask (B, 1, T, S) bool, True = may attend; replaces the causal mask when given. With a
            KV cache, the attention reads cache slots [0, S).
        rope: (cos, sin), each (B or 1, 1, T, hs), RoPE's tables at these tokens' positions, or None.
        """
        B, T, C = x.shape
        # Widths from the head counts, not C: tensor parallelism (dozero.parallel.tp) gives each process
        # some of the heads and sets n_heads, n_kv_heads, kv_dim to its share.
        q_dim = self.n_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, self.kv_dim, self.kv_dim], dim=2)  # (B, T, C), 2 x (B, T, nkv*hs)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:  # rotate before caching: cached keys keep their own position
            cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)  # (autocast: q is bf16, tables fp32)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.kv_cache is not None:
            if attn_mask is None:  # causal over cache slots: key slot <= query slot
                end = int(input_pos[-1]) + 1  # a host sync on GPU: generate passes attn_mask instead
                slots = torch.arange(end, device=x.device)
                attn_mask = (slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, S)
            # The mask's width says how many cache slots to read, known on the host without a sync.
            k, v = self.kv_cache.update(input_pos, k, v, attn_mask.shape[-1])  # (B, nkv, S, hs)

        dropout = self.drop_rate if self.training else 0.0
        if need_weights:
            y, weights = explicit_attention(q, k, v, attn_mask, dropout, self.training)
        else:
            # Fused kernel (FlashAttention / memory-efficient on GPU). is_causal only when no
            # mask is given, so both paths compute exactly the same function.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=attn_mask is None, enable_gqa=self.gqa
            )
            weights = None
        y = y.transpose(1, 2).contiguous().view(B, T, q_dim)  # re-assemble heads: (B, T, C)
        return self.out_proj(y), weights


def explicit_attention(q, k, v, attn_mask=None, dropout=0.0, training=False):
    """softmax(q k^T / sqrt(hs) + mask) v, step by step, returning the weights for inspection.

    q (B, nh, T, hs), k and v (B, nkv, S, hs) -> y (B, nh, T, hs), weights (B, nh, T, S).
    """
    T, S = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:  # grouped-query: key/value head j serves query heads j*g .. j*g + g-1
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    if attn_mask is None:  # causal: token t sees tokens 0..t (queries are the last T of S keys)
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    # A fully masked row (a padding query) gives NaN after softmax; its output is never used.
    weights = torch.nan_to_num(weights, nan=0.0)
    y = F.dropout(weights, dropout, training) @ v  # (B, nh, T, hs)
    return y, weights


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm1(x)), then x + feed-forward(norm2(x)) (GPT-2 and Llama alike)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, input_pos=None, attn_mask=None, need_weights=False, rope=None):
        attended, weights = self.att(self.norm1(x), input_pos, attn_mask, need_weights, rope)
        x = x + self.drop_shortcut(attended)  # shortcut (residual) connection
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x, weights


class GPTModel(nn.Module):
    """Token + position embeddings -> n_layers transformer blocks -> final norm -> output head.

    With RoPE there is no position embedding (`pos_emb` is None): the blocks rotate queries and keys
    by the tables `rope_cos`, `rope_sin` (context_length, hs), buffers that are not saved.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.pos_emb == "learned" else None
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            # GPT-2 reads and writes tokens with the same matrix (Press & Wolf 2017).
            self.out_head.weight = self.tok_emb.weight
        self.reset_parameters()
        # RoPE's tables are not saved; a model built on the meta device gets them when its weights arrive.
        self.register_load_state_dict_post_hook(GPTModel.reset_buffers)

    def reset_buffers(self, *_) -> None:
        """(Re)compute RoPE's tables, on the device of the weights (`*_`: what load_state_dict's hook gets)."""
        if self.cfg.pos_emb == "rope":
            device = self.tok_emb.weight.device
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.context_length, self.cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def reset_parameters(self) -> None:
        """GPT-2 initialization: N(0, 0.02) everywhere, zero biases, unit LayerNorms, and the two
        projections that write into the residual stream scaled by 1/sqrt(2 * n_layers), so the
        stream's variance does not grow with depth (GPT-2 paper, section 2.3). RoPE's tables too."""
        self.reset_buffers()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (LayerNorm, RMSNorm)):
                nn.init.ones_(module.scale)
                if getattr(module, "shift", None) is not None:
                    nn.init.zeros_(module.shift)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ff.proj.weight, mean=0.0, std=residual_std)

    def forward(
        self, in_idx, input_pos=None, position_ids=None, attn_mask=None, return_attention=False, last_only=False
    ):
        """Token ids (B, T) -> logits (B, T, V); with `return_attention`, also a list of the
        n_layers attention-weight tensors (B, nh, T, S) from the explicit attention path.

        input_pos (T,): KV-cache slots of these tokens (default 0..T-1).
        position_ids (B, T) or (T,): positions (learned embedding or RoPE; default input_pos);
            differs from input_pos only for left-padded batches.
        attn_mask (B, 1, T, S) bool: who may attend to whom (default causal).
        last_only: logits of the last position only (B, 1, V); generation needs no more, and the
            output head is the largest matrix multiply of a short prompt.
        """
        B, T = in_idx.shape
        if input_pos is None:
            if T > self.cfg.context_length:  # checked here, without a device sync
                raise ValueError(f"{T} tokens exceed the context length {self.cfg.context_length}")
            input_pos = torch.arange(T, device=in_idx.device)
        if position_ids is None:
            position_ids = input_pos
        rope = None
        if self.pos_emb is not None:
            x = self.tok_emb(in_idx) + self.pos_emb(position_ids)  # (B, T, C)
        else:  # RoPE: each token's angles, shared by every layer: 2 x (B or 1, 1, T, hs)
            x = self.tok_emb(in_idx)  # (B, T, C)
            rope = (self.rope_cos[position_ids].unsqueeze(-3), self.rope_sin[position_ids].unsqueeze(-3))
        x = self.drop_emb(x)
        all_weights = []
        for block in self.trf_blocks:
            x, weights = block(x, input_pos, attn_mask, return_attention, rope)
            all_weights.append(weights)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        logits = self.out_head(self.final_norm(x))  # (B, T, V)
        return (logits, all_weights) if return_attention else logits

    def setup_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None):
        """Give every attention layer a preallocated cache of `max_len` (default context) slots."""
        p = self.tok_emb.weight
        max_len = max_len or self.cfg.context_length
        for block in self.trf_blocks:
            block.att.kv_cache = KVCache(
                batch_size, max_len, block.att.n_kv_heads, self.cfg.head_dim, dtype or p.dtype, device or p.device
            )

    def clear_kv_cache(self) -> None:
        for block in self.trf_blocks:
            block.att.kv_cache = None

    def num_parameters(self) -> int:
        """Parameters counted once (a tied head is the embedding, not a second matrix)."""
        return sum(p.numel() for p in self.parameters())
