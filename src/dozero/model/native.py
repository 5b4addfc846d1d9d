"""dozero's native code: `gemv.c`, an int8 or int4 matrix times a few input rows at the memory's speed, and
`decode.c`, a quantized model's blocks for one decoded token in one call.

The sources are compiled on first use with the system's C compiler (`$CC`, else `cc`), into
`$XDG_CACHE_HOME/dozero/` (default `~/.cache/dozero/`) under a name that changes with the source, the
compiler, its flags and the CPU, and loaded with ctypes. It needs a CPU with AVX-512 VNNI (the source says why);
anywhere else, when no compiler works, or with `DOZERO_NATIVE=0`, `native_available()` is False and
quantized layers use PyTorch's kernels (model/quantized.py). A failed build warns once, with the
compiler's message, and decoding goes on with PyTorch's kernels.

The library's OpenMP calls resolve to the libgomp that PyTorch has already loaded (same soname), so its
threads are PyTorch's and `torch.set_num_threads` applies. A product object makes its call's arguments
once (building them per call cost ~19 us, more than the kernel takes on SmolLM2's smallest matrix, and
SmolLM2 makes 121 products a token); the memory the kernel writes is one buffer per thread.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("gemv.c", "decode.c")]
HEADER = Path(__file__).with_name("gemv.h")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
P, LONG, INT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
SIGNATURES = {  # (restype, argtypes) as in gemv.c and decode.c; a struct is passed as its address
    "gemv": (None, [P, P, LONG, P, P, INT]),
    "gemv_scratch_bytes": (LONG, [P, LONG]),
    "int8_row_sums": (None, [P, LONG, LONG, P]),
    "decode_blocks": (None, [P, LONG, P, P, P, P, P, LONG, LONG, P, INT]),
    "decode_work_bytes": (LONG, [P, LONG, P]),
}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dozero"


def build(compiler: str) -> Path:
    """The compiled library's path, compiling it unless this source, compiler, flags and CPU (`-march=native`:
    a home folder shared by two machines) were built before. Written beside its final name and renamed, so a
    killed build never leaves a half library."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    cpu = " ".join(sorted(cpu_flags()))
    code = [p.read_text() for p in (*SOURCES, HEADER)]
    key = hashlib.sha256("\n".join([*code, compiler, version, *FLAGS, cpu]).encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            part = Path(tmp) / target.name
            command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(part)]
            subprocess.run(command, capture_output=True, text=True, check=True)
            os.replace(part, target)
    return target


@functools.cache
def library():
    """The loaded library (its functions typed), or None where it cannot run (module docstring)."""
    if os.environ.get("DOZERO_NATIVE", "1") == "0" or not {"avx512_vnni", "avx512bw", "f16c"} <= cpu_flags():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        reason = detail[-1] if detail else e
        warnings.warn(f"dozero's int8/int4 kernels did not build ({reason}); using PyTorch's", stacklevel=2)
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    return lib


def native_available() -> bool:
    return library() is not None


def scratch(nbytes: int) -> int:
    """The address of at least `nbytes` bytes the calling thread's kernels may write: one buffer per thread,
    shared by every layer (a buffer per layer, allocated between the packing's large temporaries, kept
    ~100 MB of freed heap resident for SmolLM2)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch.buffer = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buffer.data_ptr()


_scratch = threading.local()


class Matrix(ctypes.Structure):
    """gemv.h's `struct matrix`: one int8 or int4 matrix, as the kernels read it."""

    _fields_ = [("N", LONG), ("K", LONG), ("group", LONG), ("q", P), ("scale", P), ("extra", P)]


class NativeRowProduct:
    """x (M, K) W^T for one quantized layer and a few input rows (M <= MAX_ROWS: decoding), through gemv.c's
    `gemv`, the matrix described once in a `Matrix` (building a call's 11 arguments took ~19 us, more than the
    kernel takes on SmolLM2's smallest matrix, and SmolLM2 makes 121 products a token). Each row is computed
    as it would be alone, so a row's result never depends on the batch."""

    MAX_ROWS = 8  # more rows (a prompt) go to PyTorch's kernels, which share each weight between them

    def __init__(self, N: int, K: int, group: int, tensors: tuple, extra: torch.Tensor | None):
        q, scale = tensors[:2]
        self.N, self.K, self.group = N, K, group
        self.matrix = Matrix(N, K, group, q.data_ptr(), scale.data_ptr(), None if extra is None else extra.data_ptr())
        self.address = ctypes.addressof(self.matrix)
        self.tensors = tensors  # kept alive: the kernel reads their memory

    def scratch_bytes(self, M: int) -> int:
        return library().gemv_scratch_bytes(self.address, M)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, K) -> (M, N) float32, in `out` (float32, contiguous, M N values) when given."""
        M = x.numel() // self.K
        if not 0 < M <= self.MAX_ROWS or x.numel() != M * self.K:
            raise ValueError(f"expected 1 to {self.MAX_ROWS} rows of {self.K} values, got {tuple(x.shape)}")
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.reshape(M, self.K).float().contiguous()
        if out is None:
            out = torch.empty(M, self.N)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != M * self.N:
            raise ValueError(f"out must be {M * self.N} contiguous float32 values, got {tuple(out.shape)} {out.dtype}")
        work = scratch(self.scratch_bytes(M))
        library().gemv(self.address, x.data_ptr(), M, out.data_ptr(), work, torch.get_num_threads())
        return out


class Int8RowProduct(NativeRowProduct):
    """W[n] = scale[n] * q[n]: q (N, K) int8, scale (N,) float32, on the CPU. `native_available()` first."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        N, K = q.shape
        q, scale = q.contiguous(), scale.float().contiguous()
        rowsum = torch.empty(N, dtype=torch.int32)
        library().int8_row_sums(q.data_ptr(), N, K, rowsum.data_ptr())  # no int32 copy of q, as PyTorch's sum makes
        super().__init__(N, K, 0, (q, scale, rowsum), rowsum)


class Int4RowProduct(NativeRowProduct):
    """W[n, k] = scale[n, g] * u + zero[n, g] with g = k // group, u = q[n, k] + 8 the stored nibble (low
    nibble first, model/quantized.py), zero = mins or -8 scale: packed (N, K / 2) uint8, scales and mins
    (N, K / group) float16, on the CPU. `fits` first."""

    @staticmethod
    def fits(K: int, group: int, scales: torch.Tensor, mins: torch.Tensor | None) -> bool:
        """What gemv.c's int4 kernel takes: rows of whole 32-column blocks, groups of 32 or 64k, fp16."""
        fp16 = scales.dtype == torch.float16 and (mins is None or mins.dtype == torch.float16)
        return native_available() and K % 32 == 0 and (group == 32 or group % 64 == 0) and fp16

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int):
        N, K = packed.shape[0], packed.shape[1] * 2
        packed, scales = packed.contiguous(), scales.contiguous()
        mins = None if mins is None else mins.contiguous()
        super().__init__(N, K, group, (packed, scales, mins), mins)


class Block(ctypes.Structure):
    """decode.c's `struct block`: one transformer block's matrices, biases, norms and KV cache."""

    _fields_ = [
        *((name, Matrix) for name in ("qkv", "out", "fc", "proj")),
        ("bias", P * 4),
        *((name, P) for name in ("norm1", "shift1", "norm2", "shift2")),
        ("eps1", ctypes.c_float),
        ("eps2", ctypes.c_float),
        ("cache", P),
    ]


class Shape(ctypes.Structure):
    """decode.c's `struct shape`."""

    _fields_ = [(name, LONG) for name in ("C", "nh", "nkv", "hs", "hidden", "S", "activation")]


ACTIVATIONS = {"swiglu": 0, "tanh": 1, "none": 2}  # decode.c's SWIGLU, GELU_TANH (GPT-2's), GELU_ERF


def address(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"decode.c reads contiguous float32 tensors, got {t.dtype} of shape {tuple(t.shape)}")
    return t.data_ptr()


class NativeBlocks:
    """Every block of a quantized model for one decoded token, in one call of decode.c (its comment says why).

    `layers`: per block, a dict with its four products ("qkv", "out", "fc", "proj": `NativeRowProduct`s),
    "biases" (four float32 tensors or None), "norm1" and "norm2" ((scale, shift or None, eps)) and "cache"
    ((2 nkv, S, hs) float32: keys, then values); `shape`: the `Shape` fields but the activation, given by
    name (`ACTIVATIONS`). Every tensor is kept alive here: the C code reads their memory."""

    def __init__(self, layers: list[dict], shape: dict, activation: str):
        self.shape = Shape(**shape, activation=ACTIVATIONS[activation])
        self.blocks = (Block * len(layers))()
        self.tensors = []
        for block, layer in zip(self.blocks, layers, strict=True):
            for name in ("qkv", "out", "fc", "proj"):
                setattr(block, name, layer[name].matrix)
                self.tensors.append(layer[name].tensors)
            block.bias = (P * 4)(*map(address, layer["biases"]))
            (block.norm1, block.shift1, block.eps1), (block.norm2, block.shift2, block.eps2) = (
                (address(scale), address(shift), eps) for scale, shift, eps in (layer["norm1"], layer["norm2"])
            )
            block.cache = address(layer["cache"])
            self.tensors.append((layer["biases"], layer["norm1"], layer["norm2"], layer["cache"]))
        nbytes = library().decode_work_bytes(ctypes.addressof(self.blocks), len(layers), ctypes.addressof(self.shape))
        self.work = torch.empty(nbytes // 4 + 16, dtype=torch.float32)
        self.args = (ctypes.addressof(self.blocks), len(layers), ctypes.addressof(self.shape))

    def __call__(self, x: torch.Tensor, cos: int | None, sin: int | None, mask: torch.Tensor, window: int, slot: int):
        """x (1, C) float32, in place: the token at cache `slot`; cos, sin: the addresses of RoPE's rows for
        its position (None without RoPE); mask: (window) additive, 0 where a slot holds a token."""
        rest = (mask.data_ptr(), window, slot, self.work.data_ptr(), torch.get_num_threads())
        library().decode_blocks(*self.args, x.data_ptr(), cos, sin, *rest)
