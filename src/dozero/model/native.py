"""dozero's one native kernel, `int8_gemv.c`: an int8 matrix times one input row at the memory's speed.

It is compiled on first use with the system's C compiler (`$CC`, else `cc`), into
`$XDG_CACHE_HOME/dozero/` (default `~/.cache/dozero/`) under a name that changes with the source, the
compiler and its flags, and loaded with ctypes. It needs a CPU with AVX-512 VNNI (the source says why);
anywhere else, when no compiler works, or with `DOZERO_NATIVE=0`, `int8_gemv_available()` is False and
quantized layers use PyTorch's kernel (model/quantized.py). A failed build warns once, with the
compiler's message, and decoding goes on with PyTorch's kernel.

The library's OpenMP calls resolve to the libgomp that PyTorch has already loaded (same soname), so its
threads are PyTorch's and `torch.set_num_threads` applies.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int8_gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


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
    """The compiled library's path, compiling it unless this source, compiler and flags were built before.
    Written beside its final name and renamed, so a killed build never leaves a half library."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, version, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"int8_gemv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            part = Path(tmp) / target.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(part)], capture_output=True, text=True, check=True)
            os.replace(part, target)
    return target


@functools.cache
def library():
    """The loaded kernel, or None where it cannot run (module docstring)."""
    if os.environ.get("DOZERO_NATIVE", "1") == "0" or not {"avx512_vnni", "avx512bw"} <= cpu_flags():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        warnings.warn(
            f"dozero's int8 kernel did not build ({detail[-1] if detail else e}); using PyTorch's", stacklevel=2
        )
        return None
    fn = lib.int8_gemv
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_long, *[ctypes.c_void_p] * 6, ctypes.c_long, ctypes.c_int]
    return fn


def int8_gemv_available() -> bool:
    return library() is not None


class Int8RowProduct:
    """One int8 layer's product with one input row through `int8_gemv.c`: x (1, K) W^T with
    W[n] = scale[n] * q[n]. Its arguments are made once: building them per call cost ~19 us, more than the
    kernel takes on SmolLM2's smallest matrix (~13 us), and SmolLM2 makes 121 such products a token.
    `int8_gemv_available()` first."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        """q (N, K) int8, scale (N,) float32, on the CPU; kept alive here (the kernel reads their memory)."""
        self.N, self.K = q.shape
        rowsum = q.sum(1, dtype=torch.int32)
        self.scratch = torch.empty(2, self.K, dtype=torch.uint8)
        self.row = torch.empty(self.K)  # a copy of an input row that is not float32 and contiguous
        self.tensors = q, rowsum, scale = q.contiguous(), rowsum, scale.float().contiguous()
        self.fixed = (
            self.scratch[0].data_ptr(),
            self.scratch[1].data_ptr(),
            q.data_ptr(),
            rowsum.data_ptr(),
            scale.data_ptr(),
        )

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (1, K) -> (1, N) float32, in `out` (float32, contiguous, N values) when given."""
        if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != self.K:
            x = self.row.copy_(x.reshape(self.K))
        if out is None:
            out = torch.empty(1, self.N)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != self.N:
            raise ValueError(
                f"int8_gemv: out must be {self.N} contiguous float32 values, got {tuple(out.shape)} {out.dtype}"
            )
        library()(x.data_ptr(), self.K, *self.fixed, out.data_ptr(), self.N, torch.get_num_threads())
        return out
