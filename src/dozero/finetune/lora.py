"""LoRA (Hu et al. 2021): train two small matrices beside each frozen weight instead of the weight itself.

    from dozero.finetune.lora import LoRAConfig, apply_lora, merge_lora, save_adapter, load_adapter
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets="qkv,out_proj,fc,proj"))   # in place
    save_adapter(model, "out/adapter")       # adapter_config.json + adapter_model.safetensors (PEFT's layout)
    merge_lora(model)                        # W <- W + (alpha/r) B A; plain nn.Linear again

A frozen linear layer y = W x becomes y = W x + (alpha / r) * B (A dropout(x)), with A (r, in) drawn
at random and B (out, r) zero, so training starts from the pretrained model exactly. Only A and B
get gradients and AdamW moments: 2 r (in + out) numbers per layer instead of in * out (r = 8 on a
576 x 576 layer: 9,216 instead of 331,776). Merging adds (alpha/r) B A into W once, so a merged
model runs as fast as the base; unmerging subtracts it again.

Fused layers. dozero stacks the query, key and value projections into one `qkv` (and SwiGLU's gate
and up into `ff.fc`); Hugging Face's Llama keeps them apart (q_proj, k_proj, v_proj) and PEFT trains
one LoRA on each. The fused layer therefore holds one (A_i, B_i) pair per block of output rows:

    delta W = [B_q A_q; B_k A_k; B_v A_v] = blockdiag(B_q, B_k, B_v) @ [A_q; A_k; A_v]

which equals three separate LoRAs exactly (A stacked, B block-diagonal). A single shared A with B
split by rows would be a different, smaller family (rank r for all three together), and PEFT could
not load it. GPT-2's Hugging Face layout fuses q/k/v too (c_attn), so there one pair covers the layer.
Saving writes each pair under PEFT's names; loading accepts PEFT adapters that target only some of
the blocks (the common q_proj + v_proj): the missing blocks get no update (zero A and B).

Over a quantized base (QLoRA, Dettmers et al. 2023; `dozero finetune --quantize int4`): the frozen
layer is an int8/int4 `QuantizedLinear` (model/quantized.py) and A, B stay float. Its gradient for
the layers below, dL/dx = dL/dy W, needs W: the quantized layer computes y with a dequantized float
copy of W, and autograd would keep that copy until the backward pass, one float copy of every layer:
the memory QLoRA exists to save. `FrozenQuantized` recomputes W from the integers in the backward
pass instead. A merged update is not representable in int8/int4, so merging dequantizes the layer
into a float nn.Linear first: the merged model is float, exactly what was trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from dozero.config import suggest
from dozero.errors import DozeroError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TARGETS = {"qkv": "att.qkv", "out_proj": "att.out_proj", "fc": "ff.fc", "proj": "ff.proj"}
"""dozero's target names -> the layer inside each transformer block."""


@dataclass
class LoRAConfig:
    rank: int = 8
    """LoRA rank r: the inner width of B A (0: full fine-tuning, every weight trained)."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / rank (so changing the rank keeps the step size)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input (QLoRA used 0.05-0.1 for small models)."""
    targets: str = "qkv,out_proj,fc,proj"
    """Comma-separated layers that get LoRA, in every block: qkv, out_proj (attention), fc, proj (feed-forward)."""

    def target_list(self) -> list[str]:
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        unknown = [t for t in names if t not in TARGETS]
        if unknown or not names:
            raise DozeroError(
                f"--lora-targets {self.targets!r} matches no layer: {suggest(unknown[0] if unknown else '', TARGETS)}"
            )
        return names


class FrozenQuantized(torch.autograd.Function):
    """y = layer(x) for a frozen QuantizedLinear, saving only x's dtype: the backward pass dequantizes the
    weight again (one more dequantization per layer) rather than keep a float copy alive until then."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        return layer(x)  # (B, T, out); autograd records nothing inside forward

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        W = ctx.layer.dequantized().to(grad_y.dtype)  # (out, in), freed when this returns
        return (grad_y @ W).to(ctx.dtype), None  # (B, T, out) @ (out, in) -> (B, T, in)


def _is_quantized(layer: nn.Module) -> bool:
    from dozero.model.quantized import QuantizedLinear

    return isinstance(layer, QuantizedLinear)


def _float_like(layer: nn.Module) -> dict:
    """Device and dtype for A and B: the weight's, or the precision a quantized layer computes in."""
    if _is_quantized(layer):
        from dozero.model.quantized import compute_dtype

        return {"device": layer.scales.device, "dtype": compute_dtype(layer.scales)}
    return {"device": layer.weight.device, "dtype": layer.weight.dtype}


def _float_linear(layer: nn.Module) -> nn.Linear:
    """A QuantizedLinear's weights as a plain float nn.Linear (the bias object itself is kept)."""
    W = layer.dequantized()  # (out, in)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=W.device, dtype=W.dtype)
    linear.weight = nn.Parameter(W, requires_grad=False)
    linear.bias = layer.bias
    return linear


class LoRALinear(nn.Module):
    """A frozen nn.Linear or QuantizedLinear (`base`) plus one low-rank update per block of output rows
    (`groups`)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, groups: list[int]):
        super().__init__()
        assert sum(groups) == base.out_features
        self.base, self.groups, self.rank, self.scale = base, list(groups), rank, alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        like = _float_like(base)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, base.in_features, **like)) for _ in groups)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(rows, rank, **like)) for rows in groups)
        for A in self.lora_A:  # PEFT's (and nn.Linear's) default init for A; B = 0 makes the update 0
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = _is_quantized(self.base) and torch.is_grad_enabled()
        y = FrozenQuantized.apply(x, self.base) if quantized else self.base(x)  # (B, T, out)
        if self.merged:
            return y
        h = self.dropout(x)  # (B, T, in)
        update = torch.cat([(h @ A.t()) @ B.t() for A, B in zip(self.lora_A, self.lora_B, strict=True)], dim=-1)
        return y + self.scale * update  # (B, T, out): each block's (B, T, r) -> (B, T, rows)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) blockdiag(B) @ stack(A): (out, in), what merging adds to the base weight."""
        return self.scale * torch.cat([B @ A for A, B in zip(self.lora_A, self.lora_B, strict=True)], dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            if _is_quantized(self.base):  # the sum is no int8/int4 matrix: the layer becomes float
                self.base = _float_linear(self.base)
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


# ----------------------------------------------------------------------------- applying and merging


def output_groups(cfg, target: str) -> list[tuple[str, int]]:
    """(Hugging Face module name inside a block, output rows) for each block of the target's rows."""
    from dozero.model.hf_llama import hf_family

    C, kv, H = cfg.emb_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    if hf_family(cfg) == "llama":
        return {
            "qkv": [("self_attn.q_proj", C), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
            "out_proj": [("self_attn.o_proj", C)],
            "fc": [("mlp.gate_proj", H), ("mlp.up_proj", H)],
            "proj": [("mlp.down_proj", C)],
        }[target]
    return {
        "qkv": [("attn.c_attn", C + 2 * kv)],
        "out_proj": [("attn.c_proj", C)],
        "fc": [("mlp.c_fc", H)],
        "proj": [("mlp.c_proj", C)],
    }[target]


def _layer(block: nn.Module, target: str) -> nn.Module:
    owner, name = TARGETS[target].split(".")
    return getattr(getattr(block, owner), name)


def _set_layer(block: nn.Module, target: str, layer: nn.Module) -> None:
    owner, name = TARGETS[target].split(".")
    setattr(getattr(block, owner), name, layer)


def apply_lora(model, lora: LoRAConfig):
    """Freeze every weight of `model` and put a LoRALinear around each target layer of every block.
    The model is changed in place (as torch.nn.utils' parametrizations are) and returned."""
    targets = lora.target_list()
    if lora.rank < 1:
        raise DozeroError(f"--lora-rank must be >= 1, got {lora.rank}")
    if not 0 <= lora.dropout < 1:
        raise DozeroError(f"--lora-dropout must be in [0, 1), got {lora.dropout}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.trf_blocks:
        for target in targets:
            layer = _layer(block, target)
            if isinstance(layer, LoRALinear):
                raise DozeroError(f"'{target}' already has LoRA; merge it (merge_lora) before adding another")
            groups = [rows for _, rows in output_groups(model.cfg, target)]
            if lora.rank > min(layer.in_features, *groups):
                raise DozeroError(
                    f"--lora-rank {lora.rank} is larger than the layer '{target}' ({layer.in_features} inputs, "
                    f"output blocks of {groups} rows): a rank above the smaller side adds nothing; lower it"
                )
            _set_layer(block, target, LoRALinear(layer, lora.rank, lora.alpha, lora.dropout, groups))
    return model


def lora_layers(model) -> list[tuple[int, str, LoRALinear]]:
    found = []
    for i, block in enumerate(model.trf_blocks):
        found += [(i, t, _layer(block, t)) for t in TARGETS if isinstance(_layer(block, t), LoRALinear)]
    return found


def merge_lora(model):
    """Add every LoRA update into its base weight and put the plain nn.Linear back (in place; returned).
    The result is an ordinary GPTModel: save_model, generation and export see no trace of LoRA."""
    for i, target, layer in lora_layers(model):
        layer.merge()
        _set_layer(model.trf_blocks[i], target, layer.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- PEFT's file layout


def _prefix(cfg) -> str:
    from dozero.model.hf_llama import hf_family

    return "base_model.model." + ("model.layers" if hf_family(cfg) == "llama" else "transformer.h")


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Every A and B under PEFT's names (base_model.model.<HF module>.lora_A.weight)."""
    tensors, prefix = {}, _prefix(model.cfg)
    for i, target, layer in lora_layers(model):
        for (name, _), A, B in zip(output_groups(model.cfg, target), layer.lora_A, layer.lora_B, strict=True):
            tensors[f"{prefix}.{i}.{name}.lora_A.weight"] = A.detach().float().cpu()
            tensors[f"{prefix}.{i}.{name}.lora_B.weight"] = B.detach().float().cpu()
    return tensors


def save_adapter(model, folder: str | Path, base_model: str = "") -> Path:
    """adapter_config.json + adapter_model.safetensors, the layout PeftModel.from_pretrained reads."""
    from dozero.files import write_json
    from dozero.model.checkpoint import write_safetensors
    from dozero.model.hf_llama import hf_family

    layers = lora_layers(model)
    if not layers:
        raise DozeroError("the model has no LoRA layers to save (apply_lora first, and save before merging)")
    first = layers[0][2]
    targets = sorted({t for _, t, _ in layers})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / ADAPTER_WEIGHTS, adapter_tensors(model))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.rank,
        "lora_alpha": first.scale * first.rank,
        "lora_dropout": first.dropout.p,
        "target_modules": sorted({n.split(".")[-1] for t in targets for n, _ in output_groups(model.cfg, t)}),
        "bias": "none",
        "fan_in_fan_out": hf_family(model.cfg) == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
        "inference_mode": True,
    }
    write_json(folder / ADAPTER_CONFIG, config, indent=1)  # last: a folder with the config is complete
    return folder


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise DozeroError(f"{folder}: no {ADAPTER_CONFIG}; an adapter folder holds it and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DozeroError(f"{path}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise DozeroError(f"{path}: peft_type {config.get('peft_type')!r}; dozero reads LoRA adapters only")
    for unsupported in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(unsupported):
            raise DozeroError(f"{path}: '{unsupported}' is set; dozero reads plain LoRA adapters only")
    return config


def load_adapter(model, folder: str | Path):
    """Put the LoRA adapter in `folder` (dozero's or PEFT's) onto `model` (in place; returned unmerged).
    Every tensor must find its layer and fit its shape, or nothing is changed."""
    from dozero.model.checkpoint import read_safetensors

    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS)
    modules = config.get("target_modules") or []
    modules = {modules} if isinstance(modules, str) else set(modules)
    short = {t: {n.split(".")[-1] for n, _ in output_groups(model.cfg, t)} for t in TARGETS}
    targets = [t for t in TARGETS if short[t] & modules]
    if not targets:
        raise DozeroError(f"{folder}: target_modules {sorted(modules)} name no layer of this model")
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    prefix = _prefix(model.cfg)
    planned, used = [], set()  # check everything before touching the model
    for i in range(len(model.trf_blocks)):
        for target in targets:
            in_features = _layer(model.trf_blocks[i], target).in_features
            for name, rows in output_groups(model.cfg, target):
                key = f"{prefix}.{i}.{name}"
                pair = [tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")]
                if pair[0] is None and name.split(".")[-1] not in modules:
                    pair = [torch.zeros(rank, in_features), torch.zeros(rows, rank)]  # a block PEFT left alone
                elif pair[0] is None or pair[1] is None:
                    raise DozeroError(f"{folder}: no LoRA weights for {key}; the adapter is from another model")
                else:
                    used |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight"}
                if tuple(pair[0].shape) != (rank, in_features) or tuple(pair[1].shape) != (rows, rank):
                    raise DozeroError(
                        f"{folder}: {key} has LoRA shapes {tuple(pair[0].shape)}, {tuple(pair[1].shape)} but this "
                        f"model needs {(rank, in_features)}, {(rows, rank)}: the adapter was made for another model"
                    )
                planned.append(pair)
    extra = sorted(k for k in set(tensors) - used if k.endswith(".weight") and ".lora_" in k)
    if extra or len(used) < len(tensors):
        left = extra or sorted(set(tensors) - used)
        raise DozeroError(f"{folder}: {len(left)} tensors fit no layer of this model (e.g. {left[0]}); another model?")
    apply_lora(model, LoRAConfig(rank, alpha, float(config.get("lora_dropout", 0.0)), ",".join(targets)))
    pairs = iter(planned)
    with torch.no_grad():
        for _, _, layer in lora_layers(model):
            for A, B in zip(layer.lora_A, layer.lora_B, strict=True):
                a, b = next(pairs)
                A.copy_(a)
                B.copy_(b)
    return model
