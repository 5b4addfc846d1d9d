"""The modules a quantized model runs with: linear layers and an embedding that hold int8 or int4 weights.

`dozero compress quantize` (compress/quantize.py) turns a finished model's `nn.Linear` layers into these
from outside, as gpt-fast's quantize.py does; this file only holds what a quantized model needs to *run*
and to be *loaded*, so `load_model` (model/checkpoint.py) can read a quantized folder without
depending on the compression stage.

A weight W (out, in) is stored as integers q and one scale per group of `group_size` consecutive
inputs of a row (a whole row: "per output channel"):

    W[o, k] ~= q[o, k] * scales[o, k // group_size]

    int8: q in [-127, 127], stored as int8 (out, in)
    int4: q in [-8, 7], stored two per byte as uint8 (out, in / 2): low nibble = even column, + 8

Scales are float16 on disk, as llama.cpp's Q8_0 / Q4_0 blocks keep them.

Two ways to multiply (`kernel`, chosen when quantizing and kept in config.json; one function,
`QuantizedLinear.forward`, applies it):
  * "reference" (default): dequantize the matrix, then `F.linear`. Weight-only: the only error is the
    weights' rounding (SmolLM2-135M int8: perplexity +0.7%). Readable, any device and dtype, but slower
    than fp32 on a CPU (it writes the float matrix before reading it).
  * "fbgemm": FBGEMM's dynamic int8 linear (`quantized::linear_dynamic`), which also rounds each input
    row to 7 bits per call and multiplies integers. Measured on the project's 2-core AVX2 EPYC
    (MEASURED.md): 2.3x faster than fp32 at 768 x 3072, while `torch._weight_int8pack_mm` was 7x and
    `_weight_int4pack_mm_for_cpu` 10x slower than fp32: the only fast int8 path on this CPU. The input
    rounding costs quality where activations have outliers: SmolLM2-135M's perplexity went from 41.4
    (fp32) to 127 with 7-bit inputs (most of it at the SwiGLU down projection, whose inputs reach 100x their
    mean); 8-bit inputs where the CPU allows (`reduce_range`) and SmoothQuant's rescaling before quantizing
    (compress/smooth.py) bring it to +7%. FBGEMM knows
    one scale per row, so a grouped weight (int4, or int8 with groups) is requantized to int8 per row
    for it: one more rounding, at most half of that row's int8 step.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANT_KEY = "quantization"  # config.json: {"bits": 8|4, "group_size": G or 0 (a row), "head": bool, "kernel": ...}
KERNELS = ("reference", "fbgemm")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n/2) -> int8 (..., n) in [-8, 7]: low nibble first."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (..., n) in [-8, 7], n even -> uint8 (..., n/2)."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def compute_dtype(scales: torch.Tensor) -> torch.dtype:
    """The precision a quantized layer computes in: fp32 for the stored fp16 scales, else the scales' own
    (a model cast to bf16 for a GPU computes in bf16)."""
    return torch.float32 if scales.dtype == torch.float16 else scales.dtype


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (+ packing) and scales (..., groups) -> values (..., in) in `compute_dtype(scales)`."""
    values = (unpack_int4(q) if bits == 4 else q).float()  # (..., in)
    group = values.shape[-1] // scales.shape[-1]
    return (values * scales.float().repeat_interleave(group, dim=-1)).to(compute_dtype(scales))


def fbgemm_available() -> bool:
    return torch.backends.quantized.engine in ("x86", "fbgemm")


@functools.cache
def reduce_range() -> bool:
    """FBGEMM rounds inputs to 7 bits (True) or 8 (False). Without AVX-512 VNNI its kernel sums pairs of
    8-bit products in 16 bits, which 8-bit inputs can saturate, so torch.ao's dynamic Linear always asks
    for 7; VNNI sums them in 32 bits. 8 bits halves the rounding: SmolLM2-135M's perplexity 127 -> 59
    (fp32 41.4; measured on an AVX-512 VNNI Xeon)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "avx512_vnni" not in f.read(1 << 16)
    except OSError:
        return True


def pack_for_kernel(q: torch.Tensor, scales: torch.Tensor, bits: int, bias: torch.Tensor | None):
    """FBGEMM's packed int8 weight for `quantized::linear_dynamic`: one scale per row."""
    import warnings

    if bits == 8 and scales.shape[-1] == 1:
        q8, row_scale = q, scales[:, 0].double()  # the stored integers, exactly
    else:  # one scale per row: requantize the dequantized weight to int8 (one more rounding)
        w = dequantize(q, scales, bits)
        row_scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        q8 = torch.round(w / row_scale[:, None]).clamp(-127, 127).to(torch.int8)
    zeros = torch.zeros(q8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (not for x86 yet)
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(q8, row_scale, zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())


class QuantizedLinear(nn.Module):
    """`nn.Linear` with int8/int4 weights: buffers `weight_q` and `scales`, and the float `bias`."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, bits: int):
        super().__init__()
        self.bits = bits
        self.out_features = q.shape[0]
        self.in_features = q.shape[1] * (2 if bits == 4 else 1)
        self.register_buffer("weight_q", q)
        self.register_buffer("scales", scales)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.kernel = "reference"  # or "fbgemm": FBGEMM where it runs (CPU, fp32 input), else the reference
        self._packed = None  # made on the first kernel call; not saved, not copied

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[-1]

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) as floats."""
        return dequantize(self.weight_q, self.scales, self.bits)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """FBGEMM for fp32 CPU inputs that need no gradient (the kernel has none)."""
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
        return self.kernel == "fbgemm" and cpu_fp32 and not x.requires_grad and fbgemm_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):  # reference: dequantize, multiply in x's precision
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized().to(x.dtype), bias)
        if self._packed is None:
            self._packed = pack_for_kernel(self.weight_q, self.scales, self.bits, self.bias)
        rows = x.reshape(-1, self.in_features)  # (R, in)
        y = torch.ops.quantized.linear_dynamic(rows, self._packed, reduce_range())
        return y.view(*x.shape[:-1], self.out_features)

    def __deepcopy__(self, memo):
        copy = QuantizedLinear(self.weight_q.clone(), self.scales.clone(), None, self.bits)
        copy.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        copy.kernel = self.kernel
        return copy

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bits={self.bits}, group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """`nn.Embedding` with int8/int4 rows: looks up integer rows and scales, then dequantizes them only.
    A tied output head is a `QuantizedLinear` over the very same buffers (one copy on disk)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("weight_q", q)
        self.register_buffer("scales", scales)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor on the table's device in its compute precision: what code that asks
        `model.tok_emb.weight.device` / `.dtype` (KV caches, inputs) needs, without dequantizing 50k rows
        per question. The table itself is `dequantized()`."""
        return self.scales.new_empty(0, dtype=compute_dtype(self.scales))

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.weight_q, self.scales, self.bits)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantize(self.weight_q[idx], self.scales[idx], self.bits)  # (B, T) -> (B, T, C)


def empty_quantized(model: nn.Module, spec: dict) -> None:
    """Give a (meta-device) model the quantized modules that `spec` describes, shaped to receive a saved
    state dict: the structure `compress.quantize.quantize` builds, without computing anything."""
    bits, group, head = spec["bits"], spec["group_size"], spec["head"]

    def shapes(out_f: int, in_f: int):
        groups = in_f // group if group else 1
        q = torch.empty(out_f, in_f // 2 if bits == 4 else in_f, dtype=torch.uint8 if bits == 4 else torch.int8)
        return q, torch.empty(out_f, groups, dtype=torch.float16)

    for name, module in quantizable_linears(model, head):
        q, s = shapes(module.out_features, module.in_features)
        set_module(model, name, QuantizedLinear(q, s, module.bias, bits))
    if head and model.cfg.tie_weights:
        V, C = model.tok_emb.weight.shape
        model.tok_emb = QuantizedEmbedding(*shapes(V, C), bits)
        tie_quantized_head(model)
    set_kernel(model, spec.get("kernel", "reference"))


def set_kernel(model: nn.Module, kernel: str) -> None:
    """How every quantized linear layer of `model` multiplies: "reference" or "fbgemm" (module docstring)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernel = kernel


def quantizable_linears(model: nn.Module, head: bool) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs to quantize: every Linear of the blocks, and the head if asked."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("trf_blocks.")]
    if head and not model.cfg.tie_weights:
        found.append(("out_head", model.out_head))
    return found


def tie_quantized_head(model: nn.Module) -> None:
    """The output head reads the quantized embedding's buffers (GPT-2 and SmolLM2 tie them)."""
    emb, kernel = model.tok_emb, getattr(model.out_head, "kernel", "reference")
    model.out_head = QuantizedLinear(emb.weight_q, emb.scales, None, emb.bits)
    model.out_head.kernel = kernel


def set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def check_spec(spec, where: str) -> dict:
    """config.json's "quantization" entry, validated: {"bits": 8|4, "group_size": int >= 0, "head": bool}."""
    from dozero.errors import DozeroError

    ok = isinstance(spec, dict) and spec.get("bits") in (8, 4) and isinstance(spec.get("head"), bool)
    group = spec.get("group_size") if isinstance(spec, dict) else None
    ok = ok and spec.get("kernel", "reference") in KERNELS
    if not ok or not isinstance(group, int) or group < 0 or (spec["bits"] == 4 and (group == 0 or group % 2)):
        raise DozeroError(
            f'{where}: bad "{QUANT_KEY}" entry {spec!r}; expected {{"bits": 8 or 4, "group_size": G (even; 0 = a '
            'whole row, int8 only), "head": true/false, "kernel": "reference" or "fbgemm"}'
        )
    return spec


def quantized_model_from_state_dict(cfg, state: dict[str, torch.Tensor], spec: dict, where: str):
    """A quantized GPTModel (eval) from a saved state dict, every name and shape checked first."""
    from dozero.errors import DozeroError
    from dozero.model.gpt import GPTModel

    with torch.device("meta"):
        model = GPTModel(cfg)
        empty_quantized(model, check_spec(spec, where))
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if cfg.tie_weights:  # the tied head is stored once, as tok_emb (or tok_emb.weight_q / scales)
        expected = {k: v for k, v in expected.items() if not k.startswith("out_head.")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise DozeroError(f"{where}: the weights do not fit the quantized config ({detail})")
    for name, (shape, dtype) in expected.items():
        if (tuple(state[name].shape), state[name].dtype) != (shape, dtype):
            raise DozeroError(
                f"{where}: '{name}' is {state[name].dtype} {tuple(state[name].shape)} but the config needs "
                f"{dtype} {shape}; config.json does not match the weights"
            )
    model.load_state_dict(state, assign=True, strict=False)
    if cfg.tie_weights:
        if isinstance(model.tok_emb, QuantizedEmbedding):
            tie_quantized_head(model)
        else:
            model.out_head.weight = model.tok_emb.weight
    model.reset_buffers()
    return model.eval()


def dequantized_model(model):
    """A float copy of a quantized model (GPTModel with nn.Linear / nn.Embedding), for the exports (GGUF,
    Hugging Face) and to measure what the rounding alone costs, without the kernel's input rounding."""
    from dozero.model.gpt import GPTModel

    float_model = GPTModel(model.cfg)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            state[f"{name}.weight"] = module.dequantized().float()
    for name, tensor in model.state_dict().items():
        if not name.endswith((".weight_q", ".scales")):
            state[name] = tensor.float()
    float_model.load_state_dict(state, strict=True)
    return float_model.eval()
