"""Weight-only quantization: a finished model's linear layers (and its tied embedding/head) to int8 or int4.

    from dozero.compress.quantize import QuantizeConfig, quantize, save_quantized
    quantize(model, QuantizeConfig(bits=8))              # in place: nn.Linear -> QuantizedLinear
    save_quantized(model, "out/gpt2-int8", tokenizer)     # safetensors + scales; `load_model` reads it back
    dozero compress quantize --model gpt2-folder --to int8 --out out/gpt2-int8

A transformation applied from outside, as gpt-fast's quantize.py does (STYLE.md, "Quantization"): this
file computes the integers and scales; model/quantized.py holds the modules that run them.

The rounding rules are llama.cpp's, so dozero's numbers and a GGUF file's are the same numbers:
  int8 (Q8_0's rule): d = max|w| / 127 over the group, q = round(w / d) (halves away from zero).
  int4 (Q4_0's rule): d = (the value of largest magnitude, with its sign) / -8, q = clamp(trunc(w / d +
        8.5), 0, 15) - 8: the largest value lands exactly on -8 and the other sign gets 7 steps.
  Both compute q with the fp32 d, and keep d as float16 (so |w - q d16| <= d/2 + |q| |d - d16|).
With group_size 32, int8 is GGUF's Q8_0 and int4 is GGUF's Q4_0, value for value (tests/test_quantize.py
checks that against the `gguf` package). int8's default is one scale per row ("per output channel").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dozero.errors import DozeroError
from dozero.model.quantized import (
    KERNELS,
    QUANT_KEY,
    QuantizedEmbedding,
    QuantizedLinear,
    is_quantized,
    pack_int4,
    quantizable_linears,
    set_kernel,
    set_module,
    tie_quantized_head,
)


@dataclass
class QuantizeConfig:
    """How to quantize a model's weights (only the weights: activations stay in floating point)."""

    bits: int = 8
    """8 (int8) or 4 (int4, two per byte)."""
    group_size: int = 0
    """Inputs that share one scale. 0 = a whole row (int8's default, 'per output channel'); int4 needs
    groups (default 32 when 0 is given for int4, llama.cpp's Q4_0 block)."""
    head: bool = True
    """Also quantize the output head (and the token embedding tied to it): the largest matrix of
    GPT-2 124M (38.6M of 124M parameters) and SmolLM2-135M (28.3M of 134.5M)."""
    kernel: str = "packed"
    """How the quantized layers multiply on a CPU (model/quantized.py): 'packed' (PyTorch's weight-only
    int8 and int4 kernels, inputs and results rounded to bfloat16: SmolLM2-135M int8 perplexity +0.4%, the
    fast one on AVX-512 CPUs), 'reference' (dequantize, then a float product: only the weights' rounding costs
    quality; slow) or 'fbgemm' (FBGEMM's int8 kernel, which also rounds each input row to 8 bits, 7
    without AVX-512 VNNI: SmolLM2-135M's perplexity 1.4x / 3x fp32's, 1.07x with --smooth 0.7). Training,
    GPUs and other dtypes take the reference path whatever is chosen."""
    smooth: float = 0.0
    """SmoothQuant's alpha (compress/smooth.py): before quantizing, move the activations' outliers into
    the weights (same function), measured on calibration text; 0 = off. For --kernel fbgemm (0.7 measured
    best on SmolLM2-135M); the weight-only reference path does not need it."""
    method: str = "rtn"
    """How the integers are chosen: 'rtn' (each weight rounded to its nearest step) or 'gptq' (GPTQ,
    compress/gptq.py: one input column at a time, its rounding error pushed onto the columns not yet
    rounded through the inverse Hessian of the layer's inputs on calibration text; same file format).
    SmolLM2-135M int4 perplexity (fp32 41.4): groups of 32 52.9 -> 50.6, groups of 64 60.2 -> 51.3."""

    def resolved_group(self, width: int, where: str) -> int:
        """The group size for a row of `width` inputs, or a one-line error."""
        if self.bits not in (8, 4):
            raise DozeroError(f"quantize: bits must be 8 or 4 (int8 / int4), got {self.bits}")
        if self.kernel not in KERNELS:
            raise DozeroError(f"quantize: kernel must be one of {', '.join(KERNELS)}, got '{self.kernel}'")
        group = self.group_size or (32 if self.bits == 4 else width)
        if group < 1 or width % group or (self.bits == 4 and group % 2):
            raise DozeroError(
                f"quantize: group size {group} does not divide the width {width} of {where}; "
                f"choose a divisor of {width} (e.g. 32, 64 or 128)"
            )
        return group


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (llama.cpp): 2.5 -> 3, -2.5 -> -3 (torch.round would give 2 and -2)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_weight(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a weight (out, in): q int8 (out, in) or, for int4, packed uint8 (out, in/2); scales
    float16 (out, in/group). llama.cpp's rules (module docstring), computed in fp32 like its reference."""
    out_f, in_f = w.shape
    blocks = w.detach().float().reshape(out_f, in_f // group, group)  # (out, groups, G)
    if bits == 8:
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = round_half_away(blocks * inv).to(torch.int8)
    else:
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        d = blocks.gather(-1, imax) / -8
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = (torch.trunc(blocks * inv + 8.5).clamp(0, 15) - 8).to(torch.int8)
    q = q.reshape(out_f, in_f)
    return (pack_int4(q) if bits == 4 else q), d.reshape(out_f, -1).to(torch.float16)


def quantize(model, config: QuantizeConfig | None = None, calibration: torch.Tensor | None = None):
    """Replace, in place, the model's linear layers (and the tied embedding/head) by int8/int4 ones.
    Returns the model. Every group size is checked before anything changes. `calibration` (token ids)
    is needed for `config.smooth` and `method="gptq"`."""
    config = config or QuantizeConfig()
    if is_quantized(model):
        raise DozeroError("this model is already quantized; quantize the original (float) model instead")
    if config.method not in ("rtn", "gptq"):
        raise DozeroError(f"quantize: method must be 'rtn' or 'gptq', got '{config.method}'")
    if config.method == "gptq" and calibration is None:
        raise DozeroError("quantize: --method gptq needs calibration text (--calibration TEXT, token ids)")
    linears = quantizable_linears(model, config.head)
    groups = {name: config.resolved_group(m.in_features, name) for name, m in linears}
    tied_head = config.head and model.cfg.tie_weights
    if tied_head:
        emb_group = config.resolved_group(model.cfg.emb_dim, "tok_emb")
    if config.smooth:
        if calibration is None:
            raise DozeroError("quantize: --smooth needs calibration text (its activations set the scaling)")
        from dozero.compress.smooth import smooth_activations

        smooth_activations(model, calibration, config.smooth)
        linears = quantizable_linears(model, config.head)
    with torch.no_grad():
        if config.method == "gptq":  # block by block, each fed by the already quantized earlier blocks
            from dozero.compress.gptq import gptq_linears

            tied_group = emb_group if tied_head else None  # the tied table too, as the head's weight
            gptq_linears(model, [name for name, _ in linears], groups, config.bits, calibration, tied_group)
        else:
            for name, module in linears:
                q, scales = quantize_weight(module.weight, config.bits, groups[name])
                bias = None if module.bias is None else module.bias.detach().float()
                set_module(model, name, QuantizedLinear(q, scales, bias, config.bits))
        if tied_head and config.method == "rtn":  # one quantized table serves both the lookup and the head
            q, scales = quantize_weight(model.tok_emb.weight, config.bits, emb_group)
            model.tok_emb = QuantizedEmbedding(q, scales, config.bits)
            tie_quantized_head(model)
    model.quantization = spec_of(config, groups, model.cfg.emb_dim)
    if config.method == "gptq":  # a record of how the integers were chosen; loading does not need it
        model.quantization["method"] = "gptq"
    set_kernel(model, config.kernel)
    return model


def spec_of(config: QuantizeConfig, groups: dict[str, int], width: int) -> dict:
    """config.json's "quantization" entry. group_size 0 = a whole row (differs per matrix)."""
    whole_rows = config.bits == 8 and not config.group_size
    group = 0 if whole_rows else config.resolved_group(width, "the model")
    spec = {"bits": config.bits, "group_size": group, "head": config.head, "kernel": config.kernel}
    return {**spec, "smooth": config.smooth} if config.smooth else spec  # folded in: a record, not a setting


def quantized_state(model) -> dict[str, torch.Tensor]:
    """The state dict to save: a tied head is stored once, as tok_emb (as `save_model` does)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_weights:
        state = {k: v for k, v in state.items() if not k.startswith("out_head.")}
    return state


def save_quantized(model, folder: str | Path, tokenizer=None, metadata: dict | None = None) -> Path:
    """A dozero model folder whose config.json carries {"quantization": ...}; `load_model` reads it.
    Weights (integers, float16 scales, float biases and norms) go to model.safetensors: no pickle."""
    from dozero.files import removed_if_failed, write_json
    from dozero.model.checkpoint import FORMAT, FORMAT_VERSION, MODEL_CONFIG_FILE, WEIGHTS_FILE, write_safetensors

    spec = getattr(model, "quantization", None)
    if spec is None:
        raise DozeroError("save_quantized: this model was not quantized by dozero.compress.quantize")
    folder = Path(folder)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(), QUANT_KEY: spec}
    with removed_if_failed(folder):  # a full disk half-way leaves no folder that was not there before
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / WEIGHTS_FILE, quantized_state(model))
        if tokenizer is not None:
            tokenizer.save(folder)
        write_json(folder / MODEL_CONFIG_FILE, {**config, **(metadata or {})})  # last: then it is complete
    return folder


def weight_bytes(model) -> int:
    """Bytes of the weights as saved (a tied head once): the size on disk, and about what batch-1
    decoding reads per token (all but the embedding rows it does not look up)."""
    state = model.state_dict()
    if model.cfg.tie_weights:
        state = {k: v for k, v in state.items() if not k.startswith("out_head.")}
    return sum(t.numel() * t.element_size() for t in state.values())
