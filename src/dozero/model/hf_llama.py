"""Hugging Face Llama <-> dozero: the one place where Llama's tensor and config names appear.

A Hugging Face Llama folder (SmolLM2, TinyLlama, Llama 2/3 shapes) holds `config.json` (model_type
"llama") and safetensors weights named model.layers.{i}.self_attn.q_proj.weight, ... dozero keeps
Llama-style models in the same `GPTModel` as GPT-2, with the course's names; two of its matrices are
stacks of Llama's:

    att.qkv.weight  = [q_proj; k_proj; v_proj]   ((nh + 2 nkv) hs, C)
    ff.fc.weight    = [gate_proj; up_proj]       (2H, C)

RoPE: dozero rotates the first half of each head against the second (transformers' rotate_half), so
Hugging Face's q and k weights load as stored, with no permutation. (GGUF files store them permuted
for the interleaved convention; the GGUF reader undoes that before calling `config_from_hf` and
`state_dict_from_hf` here with Hugging Face's names.)

Biases: Llama's `attention_bias` puts biases on q, k, v and o; `mlp_bias` on the three MLP matrices.
dozero's `qkv_bias` covers q, k, v, and `bias` covers out_proj (o) and the feed-forward. Where the
two groupings differ, the missing biases are zeros: the same function, nothing refused. On export,
attention_bias = qkv_bias or bias (zeros where dozero has none), mlp_bias = bias.

    from dozero.model.checkpoint import load_model, save_model
    model = load_model("path/to/SmolLM2-135M")     # a Hugging Face Llama folder
    save_model(model, "out", format="hf")          # transformers.LlamaForCausalLM.from_pretrained("out")
"""

from __future__ import annotations

import torch

from dozero.config import ModelConfig
from dozero.errors import DozeroError

# dozero name (inside trf_blocks.{i}.) -> the Hugging Face names (inside model.layers.{i}.) it stacks
BLOCK_TABLE = {
    "norm1.scale": ("input_layernorm.weight",),
    "att.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "att.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "att.out_proj.weight": ("self_attn.o_proj.weight",),
    "att.out_proj.bias": ("self_attn.o_proj.bias",),
    "norm2.scale": ("post_attention_layernorm.weight",),
    "ff.fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "ff.fc.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "ff.proj.weight": ("mlp.down_proj.weight",),
    "ff.proj.bias": ("mlp.down_proj.bias",),
}
TOP_TABLE = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight"}
HEAD = ("out_head.weight", "lm_head.weight")
# Buffers some older checkpoints saved beside the weights; dozero recomputes them.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def is_llama_config(config: dict) -> bool:
    return config.get("model_type") == "llama" or "LlamaForCausalLM" in (config.get("architectures") or [])


def is_llama_shape(cfg: ModelConfig) -> bool:
    """True when `cfg` is expressible as a Hugging Face Llama (RMSNorm, RoPE, SwiGLU)."""
    return cfg.norm == "rmsnorm" and cfg.pos_emb == "rope" and cfg.ff == "swiglu"


def _rope_theta(hf: dict, where: str) -> float:
    """RoPE's base from either transformers' layout: 5.x `rope_parameters` {'rope_theta', 'rope_type'},
    4.x `rope_theta` + `rope_scaling`. Scaled variants (linear, dynamic, yarn, llama3, ...) and partial
    rotation change the angles, which dozero does not implement: refused, nothing loaded."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise DozeroError(
                f"{where}: RoPE scaling '{kind}' is not supported by dozero (only plain RoPE, rope_type 'default')"
            )
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            raise DozeroError(f"{where}: partial_rotary_factor={source['partial_rotary_factor']} is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """A Hugging Face Llama config dict -> ModelConfig. Anything that would change the arithmetic and
    that dozero cannot express is refused with one line."""
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in needed if k not in hf]
    if missing:
        raise DozeroError(f"{where}: a Llama config needs {missing}; is this a Hugging Face Llama folder?")
    C, nh = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise DozeroError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported (Llama's SwiGLU uses 'silu')")
    head_size = _head_size(hf, C, nh, where)
    rope_theta = _rope_theta(hf, where)
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 2048),
        emb_dim=C,
        n_heads=nh,
        n_layers=hf["num_hidden_layers"],
        n_kv_heads=hf.get("num_key_value_heads") or nh,
        drop_rate=0.0,  # Llama has no residual dropout; attention_dropout alone is not expressible
        qkv_bias=attention_bias,
        bias=attention_bias or mlp_bias,  # o_proj's bias is attention_bias's; see the module docstring
        tie_weights=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm="rmsnorm",
        pos_emb="rope",
        rope_theta=rope_theta,
        ff="swiglu",
        ff_hidden_dim=hf["intermediate_size"],
        head_size=head_size,
    )


def _head_size(hf: dict, C: int, nh: int, where: str) -> int:
    """ModelConfig.head_size for `head_dim`: 0 (the default, hidden_size / heads) when it says nothing
    else; its value when heads are narrower or wider, as after pruning heads (compress/prune.py)."""
    head_dim = hf.get("head_dim")
    if head_dim is None or head_dim * nh == C:
        if C % nh != 0:
            raise DozeroError(
                f"{where}: hidden_size {C} is not divisible by num_attention_heads {nh} and there is no head_dim"
            )
        return 0
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 2 or head_dim % 2:
        raise DozeroError(f"{where}: head_dim must be an even whole number >= 2 (RoPE rotates pairs), got {head_dim!r}")
    return head_dim


def config_to_hf(cfg: ModelConfig, eos_token_id: int | None = None) -> dict:
    """ModelConfig -> the config.json that `transformers.LlamaForCausalLM.from_pretrained` reads: RoPE
    in 5.x's `rope_parameters`, and `rope_theta` beside it for readers of the older layout."""
    if not is_llama_shape(cfg):
        raise DozeroError(
            f"this model (norm={cfg.norm}, pos_emb={cfg.pos_emb}, ff={cfg.ff}) is neither GPT-2 nor Llama shaped; "
            "Hugging Face's Llama needs rmsnorm + rope + swiglu"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.layer_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.qkv_bias or cfg.bias,
        "attention_dropout": 0.0,
        "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_weights,
        "initializer_range": 0.02,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "weights") -> dict:
    """Hugging Face Llama tensors -> dozero's state dict (q/k/v and gate/up stacked). Decides
    `cfg.tie_weights` from the weights, as the GPT-2 reader does: an lm_head equal to the embedding
    is tied, a different one unties the head."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    out, used = {}, set()

    def take(names: tuple[str, ...], ours: str, like: str | None = None) -> None:
        """Stack `names` into `ours`; a bias dozero has but the file lacks (`like` = its weight) is zeros."""
        present = [n in hf_state for n in names]
        if not all(present):
            if like is None or any(present):
                missing = [n for n, p in zip(names, present, strict=True) if not p]
                raise DozeroError(f"{where}: missing tensor '{missing[0]}' (needed for {ours}); the file is incomplete")
            weight = out[like]
            out[ours] = torch.zeros(weight.shape[0], dtype=weight.dtype)
            return
        out[ours] = torch.cat([hf_state[n] for n in names]) if len(names) > 1 else hf_state[names[0]]
        used.update(names)

    for ours, theirs in TOP_TABLE.items():
        take((theirs,), ours)
    for i in range(cfg.n_layers):
        for ours, theirs in BLOCK_TABLE.items():
            is_bias = ours.endswith(".bias")
            if is_bias and not (cfg.qkv_bias if ours.startswith("att.qkv") else cfg.bias):
                continue
            prefixed = tuple(f"model.layers.{i}.{name}" for name in theirs)
            like = f"trf_blocks.{i}.{ours.removesuffix('.bias')}.weight" if is_bias else None
            take(prefixed, f"trf_blocks.{i}.{ours}", like)
    shape_keys = f"num_hidden_layers ({cfg.n_layers}) and attention_bias/mlp_bias"
    return take_head_and_check_rest(hf_state, out, used, cfg, where, shape_keys)


def take_head_and_check_rest(
    hf_state: dict, out: dict, used: set, cfg: ModelConfig, where: str, shape_keys: str
) -> dict:
    """The end of both readers (GPT-2's in hf.py and Llama's): an lm_head equal to the embedding is tied,
    a different one unties the head (sets `cfg.tie_weights`); a tensor no table took is an error naming
    the config.json keys (`shape_keys`) that decide which tensors exist. Returns `out`."""
    head = hf_state.get(HEAD[1])
    if head is not None:
        used.add(HEAD[1])
        if not cfg.tie_weights or not torch.equal(head, out["tok_emb.weight"]):
            cfg.tie_weights = False
            out[HEAD[0]] = head
    elif not cfg.tie_weights:
        raise DozeroError(f"{where}: tie_word_embeddings is false but there is no '{HEAD[1]}' tensor")
    unexpected = sorted(set(hf_state) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise DozeroError(
            f"{where}: unexpected tensors {unexpected[:3]}{more}; does config.json's {shape_keys} match the weights?"
        )
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """dozero's state dict -> Hugging Face Llama names, stacks split, contiguous for safetensors.
    Biases dozero lacks but `config_to_hf`'s attention_bias implies are written as zeros. A tied head
    is not written: transformers ties lm_head to embed_tokens on load."""
    attention_bias = cfg.qkv_bias or cfg.bias
    sizes = {  # how each stack splits: rows per Hugging Face tensor
        "att.qkv": [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim],
        "ff.fc": [cfg.hidden_dim, cfg.hidden_dim],
    }
    out = {theirs: state[ours].contiguous() for ours, theirs in TOP_TABLE.items()}
    for i in range(cfg.n_layers):
        for ours, theirs in BLOCK_TABLE.items():
            name = f"trf_blocks.{i}.{ours}"
            if name not in state:
                wanted = attention_bias if ours.startswith("att.") else cfg.bias
                if not (ours.endswith(".bias") and wanted):
                    continue
                weight = state[name.removesuffix(".bias") + ".weight"]
                tensor = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            else:
                tensor = state[name]
            parts = tensor.split(sizes[ours.rsplit(".", 1)[0]]) if len(theirs) > 1 else (tensor,)
            for part, their_name in zip(parts, theirs, strict=True):
                out[f"model.layers.{i}.{their_name}"] = part.contiguous()
    if not cfg.tie_weights:
        out[HEAD[1]] = state[HEAD[0]].contiguous()
    return out


def hf_family(cfg: ModelConfig) -> str:
    """Which Hugging Face architecture holds this model: 'gpt2' or 'llama'; a mix of the two (say,
    LayerNorm with RoPE) has no Hugging Face equivalent and is refused in one line."""
    if is_llama_shape(cfg):
        return "llama"
    gpt2 = (cfg.norm, cfg.pos_emb, cfg.ff) == ("layernorm", "learned", "gelu")
    if gpt2 and cfg.kv_heads == cfg.n_heads and cfg.bias:
        return "gpt2"
    raise DozeroError(
        f"no Hugging Face architecture holds this model (norm={cfg.norm}, pos_emb={cfg.pos_emb}, ff={cfg.ff}, "
        f"n_kv_heads={cfg.n_kv_heads}, bias={cfg.bias}): GPT-2 needs layernorm + learned + gelu with biases and "
        "no grouped heads; Llama needs rmsnorm + rope + swiglu"
    )
