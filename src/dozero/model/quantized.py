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

Scales are float16 on disk, as llama.cpp's Q8_0 / Q4_0 blocks keep them. A GGUF file's Q4_1 matrices,
run as they are (model/gguf_blocks.py), add one fp16 min per group: W[o, k] = (q + 8) * scale + min.

Three ways to multiply (`kernel`, chosen when quantizing and kept in config.json; one function,
`QuantizedLinear.forward`, applies it):
  * "reference" (default): dequantize the matrix, then `F.linear`. Weight-only: the only error is the
    weights' rounding (SmolLM2-135M int8: perplexity +0.7%). Readable, any device and dtype, but slower
    than fp32 on a CPU (it writes the float matrix before reading it).
  * "packed": PyTorch's weight-only kernels, `torch._weight_int8pack_mm` (int8, one scale per row) and
    `_weight_int4pack_mm_for_cpu` (int4, groups of 32/64/128/256), which read the integers directly and
    multiply in bfloat16: the input row and the result are rounded to bfloat16 (8 significant bits, a
    relative 0.4% at most), the weights are not rounded again. Measured on this project's Xeon (AVX-512,
    AMX; 2 threads; a cache-hot loop): 768 x 3072 one row 0.12 ms int8 / 0.14 ms int4 vs 0.23 ms fp32;
    GPT-2's head 1.5 / 1.2 vs 3.5 ms. Out of cache, in a decoding model, GPT-2's block products average
    0.24 ms in int8 (~7 GB/s; a 64 MB matrix reaches 20). With fp32 inputs the same kernels are 7-10x
    *slower* than fp32 (and on the AVX2 EPYC of MEASURED.md), hence bfloat16. A grouped int8 weight (Q8_0's
    32) is requantized to one scale per row for it, as for FBGEMM; an int4 matrix whose rows are not a
    multiple of 16 gets zero rows to fit. Up to 8 input rows (decoding) go instead through dozero's own
    kernels (model/gemv.c, model/native.py) where the CPU has AVX-512 VNNI: they round each row to 16-bit
    (int4: 15-bit) integers, 1/65534 of its largest value, sum the integer products exactly, read the fp16
    scales as they are, and compute each row as if it were alone. On weights out of cache they run at
    ~1.5-2x PyTorch's kernels, near the memory's speed for int8.
  * "fbgemm": FBGEMM's dynamic int8 linear (`quantized::linear_dynamic`), which also rounds each input
    row to 7 or 8 bits per call and multiplies integers: about as fast as "packed" for int8 (0.09 ms
    above), but the input rounding costs quality where activations have outliers: SmolLM2-135M's
    perplexity went from 41.4 (fp32) to 127 with 7-bit inputs (most of it at the SwiGLU down projection,
    whose inputs reach 100x their mean); 8-bit inputs where the CPU allows (`reduce_range`) and
    SmoothQuant's rescaling before quantizing (compress/smooth.py) bring it to +7%. FBGEMM knows
    one scale per row, so a grouped weight (int4, or int8 with groups) is requantized to int8 per row
    for it: one more rounding, at most half of that row's int8 step.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from dozero.model.native import Int4RowProduct, Int8RowProduct, NativeRowProduct, native_available

QUANT_KEY = "quantization"  # config.json: {"bits": 8|4, "group_size": G or 0 (a row), "head": bool, "kernel": ...}
KERNELS = ("reference", "packed", "fbgemm")


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


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, mins: torch.Tensor | None = None) -> torch.Tensor:
    """Integers (+ packing), scales (..., groups) and Q4_1's mins -> values (..., in) in `compute_dtype(scales)`;
    with mins in llama.cpp's order of operations, scale * (q + 8) + min, so the values equal its own."""
    values = (unpack_int4(q) if bits == 4 else q).float()  # (..., in)
    group = values.shape[-1] // scales.shape[-1]
    scale = scales.float().repeat_interleave(group, dim=-1)
    if mins is None:
        return (values * scale).to(compute_dtype(scales))
    return (scale * (values + 8) + mins.float().repeat_interleave(group, dim=-1)).to(compute_dtype(scales))


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


def per_row_int8(q: torch.Tensor, scales: torch.Tensor, bits: int, mins=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (out, in), one fp32 scale per row): the stored integers when they already are that, else the
    dequantized weight requantized to int8 per row (one more rounding, at most half a row's int8 step)."""
    if bits == 8 and scales.shape[-1] == 1:
        return q, scales[:, 0].float()
    width = q.shape[1] * (2 if bits == 4 else 1)
    q8, row_scale = torch.empty(q.shape[0], width, dtype=torch.int8), torch.empty(q.shape[0])
    for start in range(0, q.shape[0], 4096):  # a few MB of floats at a time, not a head's 100+ MB
        rows = slice(start, start + 4096)
        w = dequantize(q[rows], scales[rows], bits, None if mins is None else mins[rows]).float()
        row_scale[rows] = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q8[rows] = torch.round(w / row_scale[rows, None]).clamp(-127, 127)
    return q8, row_scale


def pack_for_fbgemm(q: torch.Tensor, scales: torch.Tensor, bits: int, mins, bias: torch.Tensor | None):
    """FBGEMM's packed int8 weight for `quantized::linear_dynamic`: one scale per row."""
    import warnings

    q8, row_scale = per_row_int8(q, scales, bits, mins)
    zeros = torch.zeros(q8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (not for x86 yet)
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(q8, row_scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())


INT4_GROUPS = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts


def pack_for_packed(q: torch.Tensor, scales: torch.Tensor, bits: int, mins=None) -> tuple:
    """What PyTorch's "packed" kernels read: ("int8", integers, bf16 row scales, fp32 row scales) or ("int4",
    PyTorch's int4 tile layout, bf16 (groups, out, 2) scales and zero points, group size). int4 stores
    unsigned nibbles u = q + 8 and computes (u - 8) * scale + zero, so our q with zero point 0 is exactly our
    value, and Q4_1's scale * u + min is zero point min + 8 * scale. PyTorch's kernel keeps scales and zero
    points in bfloat16: Q4_1's fp16 scale and min each lose 3 bits there (a relative 2^-9 at most); dozero's
    own kernels read the fp16 ones (`QuantizedLinear.few_rows`)."""
    group = q.shape[1] * (2 if bits == 4 else 1) // scales.shape[-1]
    if bits == 8 or group not in INT4_GROUPS:
        q8, row_scale = per_row_int8(q, scales, bits, mins)
        return "int8", q8, row_scale.to(torch.bfloat16), row_scale
    u = (unpack_int4(q) + 8).to(torch.int32)  # (out, in) in [0, 15]
    pad = -u.shape[0] % 16  # the kernel wants whole tiles of 16 rows (GPT-2's head has 50,257)
    u = F.pad(u, (0, 0, 0, pad), value=8)  # value 8 = integer 0: padded rows compute zeros, then are dropped
    s = F.pad(scales.float(), (0, 0, 0, pad)).t()  # (groups, out + pad)
    zero = torch.zeros_like(s) if mins is None else F.pad(mins.float(), (0, 0, 0, pad)).t() + 8 * s
    scale_zero = torch.stack([s, zero], dim=-1).to(torch.bfloat16).contiguous()
    return "int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1), scale_zero, group


def packed_mm(rows: torch.Tensor, packed: tuple, out_features: int) -> torch.Tensor:
    """rows (R, in) fp32 -> (R, out) fp32 through PyTorch's weight-only kernels, in bfloat16 (module docstring)."""
    return packed_mm_bf16(rows.to(torch.bfloat16), packed, out_features).to(rows.dtype)


def packed_mm_bf16(x: torch.Tensor, packed: tuple, out_features: int) -> torch.Tensor:
    """x (R, in) bfloat16 -> (R, out) bfloat16: the kernel call alone (a planned decode step converts the
    input into a buffer of its own and the output where it goes: generate/layout.py)."""
    if packed[0] == "int8":
        return torch._weight_int8pack_mm(x, packed[1], packed[2])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[1], packed[3], packed[2])
    return y if y.shape[1] == out_features else y[:, :out_features]  # rows padded to whole tiles of 16


class QuantizedLinear(nn.Module):
    """`nn.Linear` with int8/int4 weights: buffers `weight_q`, `scales` (and a GGUF Q4_1 matrix's `mins`), and
    the float `bias`."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, bits: int, mins=None):
        super().__init__()
        self.bits = bits
        self.out_features = q.shape[0]
        self.in_features = q.shape[1] * (2 if bits == 4 else 1)
        self.register_buffer("weight_q", q)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)  # None (not in the state dict) but for Q4_1
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.kernel = "reference"  # or "packed" / "fbgemm" where they run (CPU, fp32 input), else the reference
        self._packed = None  # (kernel, its weight), made on the first kernel call; not saved, not copied
        self._few_rows = None  # dozero's own kernel (`few_rows`): None not made yet, False cannot run

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[-1]

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) as floats."""
        return dequantize(self.weight_q, self.scales, self.bits, self.mins)

    def kernel_for(self, x: torch.Tensor) -> str:
        """The kernel this call takes: "packed" / "fbgemm" for fp32 CPU inputs with gradients off (the kernels
        have none: QLoRA trains through frozen quantized layers, and its first one's input needs no gradient
        but its result must equal the float twin's), where PyTorch has them; the reference path otherwise."""
        no_grad = not (x.requires_grad or torch.is_grad_enabled())
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and no_grad
        if not cpu_fp32 or self.kernel == "fbgemm" and not fbgemm_available():
            return "reference"
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_for(x)
        if kernel == "reference":  # dequantize, multiply in x's precision
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized().to(x.dtype), bias)
        rows = x.reshape(-1, self.in_features)  # (R, in)
        if kernel == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(rows, self.packed_weight(kernel), reduce_range())
        else:
            few = rows.shape[0] <= NativeRowProduct.MAX_ROWS and not torch.compiler.is_compiling()
            native = self.few_rows() if few else None  # torch.compile cannot trace its C call
            y = native(rows) if native is not None else packed_mm(rows, self.packed_weight(kernel), self.out_features)
            y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def packed_weight(self, kernel: str = "packed"):
        """What `kernel` reads ("packed": `pack_for_packed`'s tuple, "fbgemm": its packed weight): made on the
        first call, then kept (not saved, not copied)."""
        if self._packed is None or self._packed[0] != kernel:
            packer = pack_for_fbgemm if kernel == "fbgemm" else pack_for_packed
            args = (self.weight_q, self.scales, self.bits, self.mins) + ((self.bias,) if kernel == "fbgemm" else ())
            self._packed = (kernel, packer(*args))
        return self._packed[1]

    def few_rows(self):
        """dozero's own kernel for calls of up to 8 rows (model/native.py), made on the first such call (a
        decoding step: not in a process that only scores prompts), or None where it cannot run."""
        if self._few_rows is None:
            self._few_rows = False
            if self.bits == 4 and Int4RowProduct.fits(self.in_features, self.group_size, self.scales, self.mins):
                self._few_rows = Int4RowProduct(self.weight_q, self.scales, self.mins, self.group_size)
            elif native_available() and (packed := self.packed_weight("packed"))[0] == "int8":
                self._few_rows = Int8RowProduct(packed[1], packed[3])  # the integers PyTorch's kernel reads
        return self._few_rows or None

    def __deepcopy__(self, memo):
        mins = None if self.mins is None else self.mins.clone()
        copy = QuantizedLinear(self.weight_q.clone(), self.scales.clone(), None, self.bits, mins)
        copy.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        copy.kernel = self.kernel
        return copy

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bits={self.bits}, group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """`nn.Embedding` with int8/int4 rows: looks up integer rows and scales, then dequantizes them only.
    A tied output head is a `QuantizedLinear` over the very same buffers (one copy on disk)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, mins=None):
        super().__init__()
        self.bits = bits
        self.register_buffer("weight_q", q)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor on the table's device in its compute precision: what code that asks
        `model.tok_emb.weight.device` / `.dtype` (KV caches, inputs) needs, without dequantizing 50k rows
        per question. The table itself is `dequantized()`."""
        return self.scales.new_empty(0, dtype=compute_dtype(self.scales))

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.weight_q, self.scales, self.bits, self.mins)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return dequantize(
            self.weight_q[idx], self.scales[idx], self.bits, None if self.mins is None else self.mins[idx]
        )


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
    """How every quantized linear layer of `model` multiplies: one of KERNELS (module docstring)."""
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
    model.out_head = QuantizedLinear(emb.weight_q, emb.scales, None, emb.bits, emb.mins)
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
            'whole row, int8 only), "head": true/false, "kernel": "reference", "packed" or "fbgemm"}'
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
    # safetensors hands out views of the mapped file at the offsets it stored them, which PyTorch's int8
    # kernel reads with aligned vector loads (it crashed on one 50 bytes past a 64-byte line): own copies.
    state = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state.items()}
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
        if not name.endswith((".weight_q", ".scales", ".mins")):
            state[name] = tensor.float()
    float_model.load_state_dict(state, strict=True)
    return float_model.eval()
