"""llama.cpp's block formats Q8_0, Q4_0 and Q4_1 <-> dozero's quantized tables, bit for bit.

A GGUF matrix of these types is a run of blocks, each holding 32 consecutive values of a row:

    Q8_0 (34 bytes): d (fp16), 32 x int8 q                  value = d * q
    Q4_0 (18 bytes): d (fp16), 16 bytes of 4-bit u          value = d * (u - 8)
    Q4_1 (20 bytes): d (fp16), m (fp16), 16 bytes of u      value = d * u + m

In a 4-bit block, byte j holds value j in its low nibble and value j + 16 in its high one.

dozero's `QuantizedLinear` / `QuantizedEmbedding` (model/quantized.py) hold the same numbers as tables:
integers q (int8; int4 as q = u - 8, packed two per byte, even column in the low nibble), one fp16
scale per group of 32 (d) and, for Q4_1 only, one fp16 min per group (m). `decode` and `encode` move
between the two without rounding anything, so a GGUF model can run on its own 4- and 8-bit weights
(`load_gguf_model(..., keep_quantized=True)`: `keep_blocks`) and be written back unchanged (`save_gguf`:
`stored_blocks`), as can a model that `dozero compress quantize` (GPTQ included) made with groups of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from dozero.model.gguf import GPT2_BLOCK, GPT2_TOP, LLAMA_BLOCK, LLAMA_TOP, _check_data, _llama_rows
from dozero.tokenizer.gguf import GGUFHeader

BLOCK = 32
BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}  # the types kept as they are; every other type is dequantized
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


@dataclass
class Blocks:
    """One matrix (rows, cols) as tables: q int8 (rows, cols) in [-127, 127] or [-8, 7], scales and (Q4_1)
    mins fp16 (rows, cols / 32)."""

    kind: str
    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return BITS[self.kind]


def decode(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> Blocks:
    """The bytes of one GGUF matrix of type `kind` (uint8, rows * cols / 32 blocks) -> Blocks."""
    rows, cols = shape
    blocks = raw.reshape(rows, cols // BLOCK, BLOCK_BYTES[kind])
    scales = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])  # (rows, groups)
    if kind == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8)  # (rows, groups, 32)
        return Blocks(kind, torch.from_numpy(q.reshape(rows, cols)), scales)
    start = 4 if kind == "Q4_1" else 2
    nibbles = blocks[..., start:]  # (rows, groups, 16): low nibbles values 0-15, high nibbles 16-31
    u = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8)  # (rows, groups, 32)
    q = torch.from_numpy((u - 8).reshape(rows, cols))
    mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]) if kind == "Q4_1" else None
    return Blocks(kind, q, scales, mins)


def encode(blocks: Blocks) -> np.ndarray:
    """Blocks -> the GGUF bytes (uint8, (rows, cols / 32 * block bytes)): the inverse of `decode`."""
    rows, cols = blocks.q.shape
    groups = cols // BLOCK
    d = blocks.scales.to(torch.float16).numpy().reshape(rows, groups, 1).view(np.uint8)  # (rows, groups, 2)
    parts = [d]
    if blocks.kind == "Q8_0":
        parts.append(blocks.q.numpy().reshape(rows, groups, BLOCK).view(np.uint8))
    else:
        if blocks.kind == "Q4_1":
            parts.append(blocks.mins.to(torch.float16).numpy().reshape(rows, groups, 1).view(np.uint8))
        u = (blocks.q.numpy().reshape(rows, groups, BLOCK) + 8).astype(np.uint8)
        parts.append(u[..., :16] | (u[..., 16:] << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


# ----------------------------------------------------------------------------- a GGUF model, kept


def _gguf_sources(config: dict, n_layers: int) -> dict[str, tuple[str, ...]]:
    """dozero weight name -> the GGUF tensors whose rows it stacks (Llama's q/k/v, gate/up), in order: the
    Hugging Face tables both readers use, composed with the GGUF <-> Hugging Face tables above."""
    if config["model_type"] == "gpt2":
        from dozero.model.hf import BLOCK_TABLE, TOP_TABLE

        block = {ours: (theirs,) for ours, (theirs, _) in BLOCK_TABLE.items()}
        top_names = {hf.removeprefix("transformer."): g for g, hf in GPT2_TOP.items()}
        block_names = {hf: g for g, (hf, _) in GPT2_BLOCK.items()}
    else:
        from dozero.model.hf_llama import BLOCK_TABLE as block
        from dozero.model.hf_llama import TOP_TABLE

        top_names, block_names = {hf: g for g, hf in LLAMA_TOP.items()}, {hf: g for g, hf in LLAMA_BLOCK.items()}
    sources = {ours: (top_names[theirs],) for ours, theirs in TOP_TABLE.items()} | {
        "out_head.weight": ("output.weight",)
    }
    for i in range(n_layers):
        for ours, theirs in block.items():
            if ours.endswith(".weight"):
                sources[f"trf_blocks.{i}.{ours}"] = tuple(f"blk.{i}.{block_names[t]}" for t in theirs)
    return sources


def kept_plan(h: GGUFHeader, config: dict) -> dict[str, tuple[str, tuple[str, ...]]]:
    """dozero module name -> (GGUF type, the GGUF tensors it stacks) for every linear layer and the token
    embedding whose tensors are all Q8_0, all Q4_0 or all Q4_1: what `keep_blocks` keeps. GPT-2's position
    table stays float (a few rows read per token); a tied head is the embedding's."""
    n_layers = config.get("n_layer") or config["num_hidden_layers"]
    plan = {}
    for weight, names in _gguf_sources(config, n_layers).items():
        kinds = {GGMLQuantizationType(h.tensors[n].ggml_type).name if n in h.tensors else None for n in names}
        if weight != "pos_emb.weight" and len(kinds) == 1 and kinds <= set(BITS):
            plan[weight.removesuffix(".weight")] = (kinds.pop(), names)
    return plan


def keep_blocks(model, h: GGUFHeader, config: dict, plan: dict) -> None:
    """Give `model` (just read from `h`, the layers of `plan` as meta placeholders: `load_gguf_model`) the file's
    own 8- and 4-bit matrices: each layer of `plan` becomes a `QuantizedLinear` (the token embedding a
    `QuantizedEmbedding`, and so a tied head) holding those blocks bit for bit, run by the "packed" kernels;
    the rest (norms, other types) stays fp32. llama.cpp runs a file this way; the values are the fp32
    model's, the products round inputs and scales to bfloat16 (model/quantized.py)."""
    import torch.nn as nn

    from dozero.model.quantized import (
        QuantizedEmbedding,
        QuantizedLinear,
        pack_int4,
        set_kernel,
        set_module,
        tie_quantized_head,
    )

    data = np.memmap(h.path, dtype=np.uint8, mode="r")
    for name, (kind, names) in plan.items():
        planes = [_kept_planes(h, data, n, kind, config) for n in names]  # per tensor: q, scales, mins
        q, scales, mins = (None if p[0] is None else torch.cat(p) for p in zip(*planes, strict=True))
        q, bits, module = pack_int4(q) if BITS[kind] == 4 else q, BITS[kind], model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            set_module(model, name, QuantizedEmbedding(q, scales, bits, mins))
        else:
            set_module(model, name, QuantizedLinear(q, scales, module.bias, bits, mins))
    del data
    if model.cfg.tie_weights and isinstance(model.tok_emb, QuantizedEmbedding):
        tie_quantized_head(model)
    set_kernel(model, "packed")
    model.reset_buffers()  # RoPE's tables where the embedding now is (it was a meta placeholder)


def _kept_planes(h: GGUFHeader, data: np.ndarray, name: str, kind: str, config: dict) -> list:
    """[q, scales, mins or None] of GGUF tensor `name`, rows in dozero's order: Llama's query and key rows
    permuted back as the float import does (`_to_hf`); GGUF's (out, in) is already dozero's layout."""
    info, heads = h.tensors[name], _permuted_heads(name, config)
    blocks = decode(np.asarray(data[info.offset : info.offset + _check_data(h, name)]), kind, info.shape)
    planes = [blocks.q, blocks.scales, blocks.mins]
    return planes if heads is None else [None if p is None else _llama_rows(p, heads, False) for p in planes]


def _permuted_heads(name: str, config: dict) -> int | None:
    """The head count of a Llama query or key matrix, whose rows llama.cpp stores permuted; else None."""
    if config["model_type"] != "llama" or not name.endswith(("attn_q.weight", "attn_k.weight")):
        return None
    return config["num_attention_heads" if name.endswith("attn_q.weight") else "num_key_value_heads"]


def stored_blocks(model, config: dict, shapes: dict[str, tuple]) -> dict[str, Blocks]:
    """GGUF tensor name -> the blocks a quantized layer of `model` already holds in one of llama.cpp's formats
    (groups of 32: int8 = Q8_0, int4 = Q4_0, int4 with mins = Q4_1), split into the file's tensors (`shapes`:
    each one's (rows, cols)) and in its row order: what `save_gguf` writes instead of rounding the layer's
    values a second time (GPTQ's scales are not the max / 7 that llama.cpp's Q4_0 quantizer would choose)."""
    from dozero.model.quantized import QuantizedEmbedding, QuantizedLinear, unpack_int4

    sources, found = _gguf_sources(config, model.cfg.n_layers), {}
    for name, module in model.named_modules():
        names = [n for n in sources.get(f"{name}.weight", ()) if n in shapes]  # a tied head: none
        if not (isinstance(module, QuantizedLinear | QuantizedEmbedding) and names):
            continue
        q = unpack_int4(module.weight_q) if module.bits == 4 else module.weight_q
        if module.scales.shape[1] * BLOCK != q.shape[1]:
            continue  # groups other than 32: no llama.cpp block holds them
        kind = "Q8_0" if module.bits == 8 else "Q4_0" if module.mins is None else "Q4_1"
        start = 0
        for n in names:
            rows, heads = slice(start, start + shapes[n][0]), _permuted_heads(n, config)
            start = rows.stop
            part = [None if p is None else p[rows] for p in (q, module.scales, module.mins)]
            if heads is not None:
                part = [None if p is None else _llama_rows(p, heads, True) for p in part]
            found[n] = Blocks(kind, *(None if p is None else p.contiguous() for p in part))
    return found
