"""Hugging Face GPT-2 <-> dozero: the one place where OpenAI's and Hugging Face's names appear.

A Hugging Face GPT-2 folder holds `config.json` (model_type "gpt2") and `model.safetensors` (or an
older `pytorch_model.bin`). Its weights use OpenAI's names (wte, wpe, h.0.attn.c_attn, ...) and
OpenAI's `Conv1D` layers, which store a linear map as (in, out) where `nn.Linear` stores (out, in):
those weights are transposed on the way in and on the way out. Everything else in dozero uses the
course's names (tok_emb, trf_blocks.0.att.qkv, ...).

    from dozero.model.checkpoint import load_model, save_model
    model = load_model("path/to/hf-gpt2")          # reads a Hugging Face folder
    save_model(model, "out", format="hf")          # transformers.GPT2LMHeadModel.from_pretrained("out")

Command line: `dozero model convert SRC DST --to hf|dozero`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.model import hf_llama

# dozero name (inside trf_blocks.{i}.) -> (Hugging Face name inside h.{i}., stored transposed?)
BLOCK_TABLE = {
    "norm1.scale": ("ln_1.weight", False),
    "norm1.shift": ("ln_1.bias", False),
    "att.qkv.weight": ("attn.c_attn.weight", True),
    "att.qkv.bias": ("attn.c_attn.bias", False),
    "att.out_proj.weight": ("attn.c_proj.weight", True),
    "att.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.scale": ("ln_2.weight", False),
    "norm2.shift": ("ln_2.bias", False),
    "ff.fc.weight": ("mlp.c_fc.weight", True),
    "ff.fc.bias": ("mlp.c_fc.bias", False),
    "ff.proj.weight": ("mlp.c_proj.weight", True),
    "ff.proj.bias": ("mlp.c_proj.bias", False),
}
# dozero name -> Hugging Face name (under `transformer.`)
TOP_TABLE = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
}
HEAD = ("out_head.weight", "lm_head.weight")
# Buffers older checkpoints saved next to the weights: the causal mask (`attn.bias`, 1x1xTxT) and
# the fill value for masked scores (`attn.masked_bias`). dozero recomputes both; they are skipped.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # not c_attn.bias!

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Hugging Face config keys whose non-default values change the arithmetic; dozero refuses them
# rather than silently computing something else.
_UNSUPPORTED = {
    "add_cross_attention": False,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
}
# transformers' names for the two GELUs -> ModelConfig.gelu_approximation. GPT-2 was trained with
# the tanh approximation ("gelu_new"); "gelu" is the exact erf GELU.
_GELU_FROM_HF = {
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu": "none",
    "gelu_python": "none",
}
_GELU_TO_HF = {"tanh": "gelu_new", "none": "gelu"}


def is_hf_config(config: dict) -> bool:
    """A Hugging Face GPT-2 or Llama config (each function below hands Llama to `hf_llama`)."""
    gpt2 = config.get("model_type") == "gpt2" or "GPT2LMHeadModel" in (config.get("architectures") or [])
    return gpt2 or hf_llama.is_llama_config(config)


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """A Hugging Face GPT-2 config dict -> ModelConfig (qkv_bias is always on: OpenAI's layout has it)."""
    if hf_llama.is_llama_config(hf):
        return hf_llama.config_from_hf(hf, where)
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions") if k not in hf]
    if missing:
        raise DozeroError(f"{where}: a GPT-2 config needs {missing}; is this a Hugging Face GPT-2 folder?")
    for key in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"):
        if not isinstance(hf[key], int) or isinstance(hf[key], bool):
            raise DozeroError(f"{where}: {key} must be a whole number, got {hf[key]!r}")
    for key in ("resid_pdrop", "layer_norm_epsilon"):
        if key in hf and (not isinstance(hf[key], int | float) or isinstance(hf[key], bool)):
            raise DozeroError(f"{where}: {key} must be a number, got {hf[key]!r}")
    for key, expected in _UNSUPPORTED.items():
        if hf.get(key, expected) != expected:
            raise DozeroError(f"{where}: {key}={hf[key]} is not supported by dozero's GPT-2 (only {expected})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GELU_FROM_HF:
        raise DozeroError(
            f"{where}: activation_function '{activation}' unsupported; dozero reads {sorted(_GELU_FROM_HF)}"
        )
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise DozeroError(f"{where}: n_inner={hf['n_inner']} unsupported; dozero's feed-forward is 4 x n_embd")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        emb_dim=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        drop_rate=float(hf.get("resid_pdrop", 0.1)),
        qkv_bias=True,
        tie_weights=bool(hf.get("tie_word_embeddings", True)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        gelu_approximation=_GELU_FROM_HF[activation],
    )


def config_to_hf(cfg: ModelConfig, eos_token_id: int | None = None) -> dict:
    """ModelConfig -> the config.json that `transformers.GPT2LMHeadModel.from_pretrained` reads."""
    if hf_llama.hf_family(cfg) == "llama":
        return hf_llama.config_to_hf(cfg, eos_token_id)
    if cfg.n_heads * cfg.head_dim != cfg.emb_dim:  # pruned heads (compress/prune.py): Llama has head_dim
        raise DozeroError(
            "GPT-2 has no shape for pruned heads (Hugging Face's GPT2Config and GGUF's gpt2 take the head width "
            "as n_embd / n_head); keep this model in dozero's format, or prune a Llama-style model"
        )
    if eos_token_id is None and cfg.vocab_size == 50257:
        eos_token_id = 50256  # GPT-2's <|endoftext|>
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": _GELU_TO_HF[cfg.gelu_approximation],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors`, else `pytorch_model.bin` (tensors only, never pickled objects)."""
    from dozero.model.checkpoint import read_json, read_safetensors  # (checkpoint imports hf lazily)

    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: {"weight_map": {tensor name: shard file}}
        shards = shard_paths(folder, index, read_json(index).get("weight_map", {}))
        return {k: v for shard in shards for k, v in read_safetensors(shard).items()}
    path = folder / "pytorch_model.bin"
    if not path.is_file():
        raise DozeroError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    try:
        # weights_only=True: a restricted unpickler that builds tensors and containers, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DozeroError(f"{path}: cannot read it as a PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DozeroError(f"{path}: expected a dict of tensors (a state_dict)")
    return state


def shard_paths(folder: Path, index: Path, weight_map) -> list[Path]:
    """The shard files an index names, each checked to lie inside `folder`: a downloaded index could
    name "../../secret" or "/etc/..." and make dozero read files the user never gave it. Paths are
    resolved, so a symbolic link pointing out of the folder is refused too, except into the `blobs/`
    of a Hugging Face cache, where every file of a `snapshots/<revision>/` folder is such a link."""
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DozeroError(f"{index}: 'weight_map' must map tensor names to shard file names")
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    paths = []
    for name in sorted(set(weight_map.values())):
        path = (folder / name).resolve()
        if Path(name).is_absolute() or not any(path.is_relative_to(a) for a in allowed):
            raise DozeroError(
                f"{index}: shard {name!r} lies outside the model folder {folder}; dozero reads only the folder "
                "it is given (is this index from a trusted source?)"
            )
        paths.append(folder / name)
    return paths


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "weights") -> dict:
    """Hugging Face tensors -> dozero's state dict. Decides `cfg.tie_weights` from the weights: a
    `lm_head.weight` that differs from `wte.weight` (or a config saying untied) means an untied head."""
    if hf_llama.is_llama_shape(cfg):
        return hf_llama.state_dict_from_hf(hf_state, cfg, where)
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    out, used = {}, set()

    def take(hf_name: str, ours: str, transposed: bool) -> None:
        if hf_name not in hf_state:
            raise DozeroError(f"{where}: missing tensor '{hf_name}' (needed for {ours}); the file is incomplete")
        tensor = hf_state[hf_name]
        out[ours] = tensor.t().contiguous() if transposed else tensor
        used.add(hf_name)

    for ours, theirs in TOP_TABLE.items():
        take(theirs, ours, False)
    for i in range(cfg.n_layers):
        for ours, (theirs, transposed) in BLOCK_TABLE.items():
            take(f"h.{i}.{theirs}", f"trf_blocks.{i}.{ours}", transposed)
    return hf_llama.take_head_and_check_rest(hf_state, out, used, cfg, where, f"n_layer ({cfg.n_layers})")


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """dozero's state dict -> Hugging Face names, Conv1D layout, contiguous tensors ready for safetensors.

    OpenAI's layout always has a qkv bias; a model trained without one exports zeros (same function).
    A tied head is not written: transformers re-ties `lm_head.weight` to `wte.weight` on load.
    """
    if hf_llama.hf_family(cfg) == "llama":
        return hf_llama.state_dict_to_hf(state, cfg)
    out = {}
    for ours, theirs in TOP_TABLE.items():
        out[f"transformer.{theirs}"] = state[ours].contiguous()
    for i in range(cfg.n_layers):
        for ours, (theirs, transposed) in BLOCK_TABLE.items():
            name = f"trf_blocks.{i}.{ours}"
            if name not in state and ours == "att.qkv.bias":
                weight = state[f"trf_blocks.{i}.att.qkv.weight"]
                tensor = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            else:
                tensor = state[name]
            out[f"transformer.h.{i}.{theirs}"] = (tensor.t() if transposed else tensor).contiguous()
    if not cfg.tie_weights:
        out[HEAD[1]] = state[HEAD[0]].contiguous()
    return out
