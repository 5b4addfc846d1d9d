"""How big is a model, and how much memory does it need? Arithmetic on a ModelConfig, no weights.

    from dozero.config import get_model_config
    from dozero.model.info import parameter_breakdown, memory_estimate, layer_summary
    cfg = get_model_config("gpt2")
    parameter_breakdown(cfg)["total"]            # 124,439,808
    memory_estimate(cfg, batch_size=8, context_length=1024)["bf16"]["training"]   # bytes
    layer_summary(cfg, batch_size=1, tokens=4)   # the course's table of shapes, layer by layer

Command line: `dozero model info gpt2`, `dozero model summary gpt2`.
"""

from __future__ import annotations

from typing import NamedTuple

from dozero.config import ModelConfig

BYTES = {"fp32": 4, "bf16": 2}


def _qkv_width(cfg: ModelConfig) -> int:
    """Rows of the fused qkv projection: queries nh * hs (C unless pruned), keys and values nkv * hs each."""
    return (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim


def _fc_width(cfg: ModelConfig) -> int:
    """Rows of ff.fc: the hidden width H, twice that for SwiGLU (gate and up stacked)."""
    return 2 * cfg.hidden_dim if cfg.ff == "swiglu" else cfg.hidden_dim


def _norm_parameters(cfg: ModelConfig) -> int:
    """One norm layer: scale, plus LayerNorm's shift when biases are on (RMSNorm has none)."""
    return cfg.emb_dim * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def _block_parameters(cfg: ModelConfig) -> dict[str, int]:
    C, H, qkv, fc, b = cfg.emb_dim, cfg.hidden_dim, _qkv_width(cfg), _fc_width(cfg), int(cfg.bias)
    attention = C * qkv + (qkv if cfg.qkv_bias else 0) + cfg.n_heads * cfg.head_dim * C + b * C  # qkv, out_proj
    feed_forward = C * fc + b * fc + H * C + b * C  # fc (+bias), proj (+bias)
    norms = 2 * _norm_parameters(cfg)  # norm1, norm2
    return {"attention": attention, "feed_forward": feed_forward, "norms": norms}


def parameter_breakdown(cfg: ModelConfig) -> dict:
    """Parameter counts by part, each parameter counted once.

    Keys: embeddings (token + learned position; RoPE has no parameters), attention, feed_forward,
    norms (all LayerNorms/RMSNorms incl. the final one), head (0 when tied: the head *is* the token
    embedding), head_tied (bool), total.
    """
    block = _block_parameters(cfg)
    positions = cfg.context_length * cfg.emb_dim if cfg.pos_emb == "learned" else 0
    parts = {
        "embeddings": cfg.vocab_size * cfg.emb_dim + positions,
        "attention": cfg.n_layers * block["attention"],
        "feed_forward": cfg.n_layers * block["feed_forward"],
        "norms": cfg.n_layers * block["norms"] + _norm_parameters(cfg),
        "head": 0 if cfg.tie_weights else cfg.vocab_size * cfg.emb_dim,
    }
    return {**parts, "head_tied": cfg.tie_weights, "total": sum(parts.values())}


def activation_bytes(cfg: ModelConfig, batch_size: int, context_length: int, precision: str) -> int:
    """Bytes of the tensors a forward pass keeps for the backward pass (training).

    Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", section 4.1: per layer s*b*h*(34 + 5*a*s/h) bytes with 16-bit values and 1-byte dropout
    masks. Adapted to dozero:
      * SDPA (flash / memory-efficient kernels) does not keep the (T x T) attention matrix, its
        softmax or its dropout mask: the 5*a*s/h term becomes a log-sum-exp per head and token (fp32).
      * What remains, per token and layer, in values: LayerNorm inputs 2C, qkv input C, q k v 3C,
        attention output C, fc input C, GELU input 4C, GELU output 4C = 16C (34 bytes minus the two
        dropout masks, halved). Under bf16 autocast the residual stream and LayerNorm inputs stay
        fp32 (2C x 4 bytes), the other 14C values are bf16.
      * Llama-style options (measured the same way): the qkv output is C + 2 nkv hs values, and RoPE
        keeps the rotated q and k beside it (C + nkv hs; v stays a view of the qkv output); SwiGLU
        keeps gate and up (2H), silu(gate) (H) and their product (H) instead of GELU's 2H; PyTorch's
        CPU RMSNorm is not one fused kernel and keeps its normalized input too (C, fp32 here).
      * Dropout masks (1 byte per value: two residual ones per layer, one on the embeddings) only
        when drop_rate > 0.
      * Outside the blocks: final norm input and output (2C), the logits (V, in the activation dtype;
        the training loop holds them) and cross-entropy's log-softmax (V, fp32 under autocast too).
    Checked against the tensors autograd actually saves in tests/test_model.py.
    """
    C, V, nh, L = cfg.emb_dim, cfg.vocab_size, cfg.n_heads, cfg.n_layers
    low = BYTES[precision]  # bytes of a matmul input/output value
    feed_forward = (4 if cfg.ff == "swiglu" else 2) * cfg.hidden_dim
    rotated = C + cfg.kv_heads * cfg.head_dim if cfg.pos_emb == "rope" else 0
    per_layer = (3 * C + _qkv_width(cfg) + rotated + feed_forward) * low + 2 * C * 4 + 4 * nh
    per_layer += 2 * C if cfg.drop_rate > 0 else 0
    rms = C * 4 if cfg.norm == "rmsnorm" else 0  # per norm layer
    per_layer += 2 * rms
    outside = 2 * C * low + V * (low + 4) + (C if cfg.drop_rate > 0 else 0) + rms
    return batch_size * context_length * (L * per_layer + outside)


def memory_estimate(cfg: ModelConfig, batch_size: int, context_length: int | None = None) -> dict:
    """Memory needed to train (AdamW) and to run the model, in bytes, for fp32 and bf16.

    Returns {"parameters": N, "batch_size": B, "context_length": T, "fp32": {...}, "bf16": {...}}
    where each precision's dict holds
      weights      weights during training: fp32 4N; bf16 = mixed precision (torch.autocast) keeps
                   fp32 master weights 4N plus the bf16 copies autocast casts them to, 2N
      gradients    4N (gradients have the dtype of the fp32 weights in both cases)
      optimizer    AdamW's two moments, fp32: 8N
      activations  saved for the backward pass, see `activation_bytes`
      training     weights + gradients + optimizer + activations
      inference_weights  the model cast to this precision: 4N or 2N
      kv_cache     keys and values of B sequences of T tokens: 2 * L * B * T * nkv * hs values
      inference    inference_weights + kv_cache + one (B, T, V) logits tensor (the prompt's forward)
    Not counted: framework overhead (CUDA context ~0.5 GB), allocator fragmentation, temporary
    buffers inside kernels; plan for 10-20% more.
    """
    T = context_length or cfg.context_length
    N = parameter_breakdown(cfg)["total"]
    out = {"parameters": N, "batch_size": batch_size, "context_length": T}
    for precision, size in BYTES.items():
        weights = 4 * N + (2 * N if precision == "bf16" else 0)
        row = {"weights": weights, "gradients": 4 * N, "optimizer": 8 * N}
        row["activations"] = activation_bytes(cfg, batch_size, T, precision)
        row["training"] = sum(row.values())
        row["inference_weights"] = size * N
        row["kv_cache"] = 2 * cfg.n_layers * batch_size * T * cfg.kv_heads * cfg.head_dim * size
        row["inference"] = row["inference_weights"] + row["kv_cache"] + batch_size * T * cfg.vocab_size * size
        out[precision] = row
    return out


DATA_PARALLEL = ("ddp", "zero2", "fsdp", "fsdp+ac")
"""The data-parallel strategies, least communication first (least memory last): `suggest_strategy`'s choice."""
STRATEGIES = (*DATA_PARALLEL, "tp", "pp")
"""Ways to spread training over processes (dozero train --parallel, --activation-checkpointing): the
data-parallel ones, then tensor and pipeline parallelism."""
USABLE_MEMORY = 0.85
"""The share of a device's memory a suggestion plans with: 15% kept spare for the framework (the CUDA
context, the allocator's cache, communication buffers; memory_estimate's 10-20% caveat)."""


def strategy_flags(strategy: str) -> str:
    """What to pass to `dozero train --parallel` for a strategy of STRATEGIES."""
    return {"fsdp+ac": "fsdp --activation-checkpointing"}.get(strategy, strategy)


def strategy_memory(
    cfg: ModelConfig, batch_size: int, world_size: int, precision: str = "bf16", context_length: int | None = None
) -> dict:
    """Bytes one device needs to train with each strategy in STRATEGIES, `batch_size` sequences per
    device, `world_size` processes (the arithmetic of ZeRO, Rajbhandari et al. 2020, section 5):

      ddp      every device: the whole training row of `memory_estimate`.
      zero2    fp32 weights, gradients and AdamW moments (16 bytes/parameter) split over the devices;
               the whole fp32 weights gathered in forward stay until backward (4 bytes/parameter),
               plus autocast's bf16 copies; all activations.
      fsdp     the same split; only the root's weights (embeddings, head, final norm) and two blocks
               (the one running, the next one prefetched) are whole at a time; all activations.
      fsdp+ac  fsdp with activation checkpointing: each block keeps its input (B, T, C) in fp32, and
               one block's activations exist at a time while it is recomputed.
      tp       tensor parallelism over all `world_size` devices: the four matrices of each block split
               (their 16 bytes/parameter and the activations between them: q, k, v, the attention
               output, the feed-forward's hidden ones), the rest whole on every device (Korthikanti
               et al. 2022, section 4.2.1, without sequence parallelism).
      pp       pipeline parallelism, one stage of L/N blocks per device: the busiest stage, the last (its
               blocks, the final norm and the head, a copy of a tied head; with GPipe it keeps every
               micro-batch's activations of its blocks until their backward: the whole batch's).
    Same caveats as memory_estimate (plan for 10-20% more); communication buffers are not counted.
    """
    est, counts = memory_estimate(cfg, batch_size, context_length), parameter_breakdown(cfg)
    row, N, W, L = est[precision], counts["total"], world_size, cfg.n_layers
    cast = 2 if precision == "bf16" else 0  # bytes/parameter of autocast's copies
    sharded = 16 * N / W
    block = sum(_block_parameters(cfg).values())
    root = N - L * block
    activations, T = row["activations"], est["context_length"]
    one_block = activation_bytes(_layers(cfg, 2), batch_size, T, precision) - activation_bytes(
        _layers(cfg, 1), batch_size, T, precision
    )
    checkpointed = activations - (L - 1) * one_block + L * batch_size * T * cfg.emb_dim * 4
    gathered_two = (4 + cast) * (root + min(2, L) * block)
    # The four matrices of every block, and the column-split ones' biases (the row-split ones' biases
    # are added after the all-reduce: whole on every device).
    split = L * (block - 2 * _norm_parameters(cfg) - 2 * cfg.emb_dim * int(cfg.bias))
    split_activations = _split_activation_bytes(cfg, batch_size, T, precision)
    return {
        "ddp": row["training"],
        "zero2": int(sharded + (4 + cast) * N + activations),
        "fsdp": int(sharded + gathered_two + activations),
        "fsdp+ac": int(sharded + gathered_two + checkpointed),
        "tp": int((16 + cast) * (N - split + split / W) + activations - split_activations * (W - 1) / W),
        "pp": row["training"] if W == 1 else _last_stage_bytes(cfg, batch_size, T, precision, W),
    }


def _last_stage_bytes(cfg: ModelConfig, batch_size: int, context_length: int, precision: str, stages: int) -> int:
    """Training bytes of the last of `stages` pipeline stages: ceil(L / stages) blocks, the final norm
    and the head, each parameter 16 bytes (+ autocast's copy), and those blocks' activations."""
    cast = 2 if precision == "bf16" else 0
    blocks = -(-cfg.n_layers // stages)
    params = blocks * sum(_block_parameters(cfg).values()) + _norm_parameters(cfg) + cfg.vocab_size * cfg.emb_dim
    return int((16 + cast) * params + activation_bytes(_layers(cfg, blocks), batch_size, context_length, precision))


def _split_activation_bytes(cfg: ModelConfig, batch_size: int, context_length: int, precision: str) -> int:
    """The part of `activation_bytes` that tensor parallelism splits over its devices: per layer the
    qkv output (and RoPE's rotated q, k), the attention output, the feed-forward's hidden values and
    one log-sum-exp per head; the norms' inputs and the residual stream stay whole."""
    low = BYTES[precision]
    feed_forward = (4 if cfg.ff == "swiglu" else 2) * cfg.hidden_dim
    rotated = cfg.emb_dim + cfg.kv_heads * cfg.head_dim if cfg.pos_emb == "rope" else 0
    per_layer = (_qkv_width(cfg) + rotated + cfg.emb_dim + feed_forward) * low + 4 * cfg.n_heads
    return batch_size * context_length * cfg.n_layers * per_layer


def _layers(cfg: ModelConfig, n_layers: int) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, n_layers=n_layers)


def suggest_strategy(
    cfg: ModelConfig, batch_size: int, world_size: int, memory: int, precision: str = "bf16"
) -> str | None:
    """The first strategy (least communication first) whose estimate fits in `memory` bytes per device, or None."""
    need = strategy_memory(cfg, batch_size, world_size, precision)
    candidates = DATA_PARALLEL if world_size > 1 else ("ddp",)
    return next((s for s in candidates if need[s] <= memory), None)


def strategy_advice(cfg: ModelConfig, batch_size: int, memory: int, worlds=(1, 2, 4, 8)) -> str:
    """One line: for each number of devices of `memory` bytes (15% kept spare for the framework), the
    --parallel to use (`suggest_strategy`), or that none fits."""
    budget = int(memory * USABLE_MEMORY)
    picks = []
    for world in worlds:
        pick = suggest_strategy(cfg, batch_size, world, budget)
        if pick == "ddp" and world == 1:
            pick = "one process"
        elif pick is not None:
            pick = strategy_flags(pick)
        picks.append(f"{world} GPU{'s' if world > 1 else ''}: {pick or 'does not fit, lower the batch'}")
    return f"{human_bytes(memory)} per GPU: " + " · ".join(picks)


class LayerRow(NamedTuple):
    name: str  # the module's name in GPTModel (the course's names)
    dims: str  # output shape in the legend's letters, e.g. "(B, T, 3C)"
    shape: tuple  # the same shape in numbers
    params: int  # parameters of this row (inner rows: already counted in their block's row)
    depth: int  # 0 = a top-level row (they sum to the total); 1 = a step inside a block
    note: str = ""


def layer_summary(cfg: ModelConfig, batch_size: int = 1, tokens: int | None = None, expand_blocks=(0,)) -> list:
    """The model as a table, input ids to logits: LayerRow(name, dims, shape, params, depth, note).

    Depth-0 rows add up to the parameter count. Blocks listed in `expand_blocks` (default: the
    first; "all" for every one) also get depth-1 rows for each step inside them.
    """
    C, V, H, b = cfg.emb_dim, cfg.vocab_size, cfg.hidden_dim, int(cfg.bias)
    qkv_dim = "3C" if cfg.kv_heads == cfg.n_heads else "C+2kv"  # kv = nkv * hs (grouped-query attention)
    hidden_dim = "4C" if H == 4 * C else "H"
    fc_dim = f"2{hidden_dim}" if cfg.ff == "swiglu" else hidden_dim
    size = {"B": batch_size, "T": tokens or cfg.context_length, "C": C, qkv_dim: _qkv_width(cfg)}
    size.update({hidden_dim: H, fc_dim: _fc_width(cfg), "nh": cfg.n_heads, "hs": cfg.head_dim, "V": V})
    block = _block_parameters(cfg)
    qkv = C * _qkv_width(cfg) + (_qkv_width(cfg) if cfg.qkv_bias else 0)
    out_proj = block["attention"] - qkv  # C x C (+ bias); (nh * hs) x C once heads are pruned
    norm = _norm_parameters(cfg)
    activation = "SwiGLU: silu(gate) * up" if cfg.ff == "swiglu" else "then GELU"
    kv_note = "" if qkv_dim == "3C" else f" (kv = {cfg.kv_heads} heads x hs)"

    def row(name, dims, params, depth=0, note=""):
        return LayerRow(name, f"({', '.join(dims)})", tuple(size[d] for d in dims), params, depth, note)

    rows = [
        row("in_idx", ("B", "T"), 0, note="token ids"),
        row("tok_emb", ("B", "T", "C"), V * C),
    ]
    if cfg.pos_emb == "learned":
        rows.append(row("pos_emb", ("T", "C"), cfg.context_length * C, note="broadcast over the batch"))
        rows.append(row("drop_emb", ("B", "T", "C"), 0, note="tok_emb + pos_emb, dropout"))
    else:
        rows.append(row("drop_emb", ("B", "T", "C"), 0, note="dropout; RoPE rotates q and k in each block"))
    for i in range(cfg.n_layers):
        rows.append(row(f"trf_blocks.{i}", ("B", "T", "C"), sum(block.values())))
        if expand_blocks == "all" or i in expand_blocks:
            p = f"trf_blocks.{i}."
            rows += [
                row(p + "norm1", ("B", "T", "C"), norm, 1),
                row(p + "att.qkv", ("B", "T", qkv_dim), qkv, 1, "queries, keys, values" + kv_note),
                row(p + "att (heads)", ("B", "nh", "T", "hs"), 0, 1, "softmax(q k^T / sqrt(hs)) v"),
                row(p + "att.out_proj", ("B", "T", "C"), out_proj, 1, "heads re-assembled, projected"),
                row(p + "drop_shortcut", ("B", "T", "C"), 0, 1, "+ shortcut"),
                row(p + "norm2", ("B", "T", "C"), norm, 1),
                row(p + "ff.fc", ("B", "T", fc_dim), C * _fc_width(cfg) + b * _fc_width(cfg), 1, activation),
                row(p + "ff.proj", ("B", "T", "C"), H * C + b * C, 1),
                row(p + "drop_shortcut", ("B", "T", "C"), 0, 1, "+ shortcut"),
            ]
    rows.append(row("final_norm", ("B", "T", "C"), norm))
    head_note = "tied to tok_emb (counted there)" if cfg.tie_weights else ""
    rows.append(row("out_head", ("B", "T", "V"), 0 if cfg.tie_weights else V * C, note=head_note))
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """124439808 -> '124.4M'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)
