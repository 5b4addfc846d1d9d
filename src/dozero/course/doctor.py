"""What can this computer do? A check-up before training (course stage 2, "preparing the ground").

    dozero doctor                       Python, PyTorch, device, bf16, flash attention, torch.compile,
                                        and whether GPT-2 124M fits here for training and inference
    dozero doctor --preset shakespeare-char --skip-compile

Every capability is *tried* on a tiny input rather than guessed from version numbers, and reported
as "works" or "not available: <reason>". Nothing here fails on a machine without a GPU: no GPU is
a fact to report, not an error.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import torch

from dozero.runtime import pick_device

GIB = 1024**3

# torch.compile is tried in a child process so that a compiler that hangs or crashes cannot take
# `dozero doctor` with it; on a CPU it builds C++ with the system compiler (about 20 s the first time).
COMPILE_TIMEOUT_S = 180
_COMPILE_PROBE = textwrap.dedent(
    """
    import torch
    def f(x):
        return torch.nn.functional.gelu(x) * 2 + 1
    device = {device!r}
    x = torch.randn(8, 16, device=device)
    y = torch.compile(f)(x)
    assert torch.allclose(y, f(x), atol=1e-5), "compiled result differs"
    print("ok")
    """
)


@dataclass
class Check:
    """One line of the report: a name, a verdict ("works" / "not available: ..."), and a detail."""

    name: str
    value: str


@functools.cache  # read once per run, so that every line of the report quotes the same numbers
def system_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of RAM, or None where the OS does not say (sysconf: Linux, macOS)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, None
    try:
        available = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        available = None
    if sys.platform.startswith("linux"):  # MemAvailable counts reclaimable cache, SC_AVPHYS_PAGES does not
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
        except OSError:
            pass
    return total, available


def check_bf16(device: str) -> str:
    """bf16 matmul on the device; on a CUDA GPU also whether the hardware has bf16 units (Ampere+)."""
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return "not available: this GPU has no bf16 units (pre-Ampere); training uses fp16 with a grad scaler"
    try:
        a = torch.randn(16, 16, device=device, dtype=torch.bfloat16)
        (a @ a).float().sum().item()
    except Exception as e:  # noqa: BLE001 - any failure is the answer we report
        return f"not available: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if device == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        return f"works (on this CPU, {capability}; fp32 is usually as fast unless the CPU has AMX/AVX512-BF16)"
    return "works"


def check_flash_attention(device: str) -> str:
    """Run scaled_dot_product_attention restricted to the FlashAttention backend on a tiny input."""
    if device != "cuda":
        return (
            "not available: FlashAttention kernels need a CUDA GPU "
            f"(on {device}, PyTorch's fused scaled_dot_product_attention kernel is used instead)"
        )
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return f"not available: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    return "works"


def check_compile(device: str, timeout_s: float = COMPILE_TIMEOUT_S) -> str:
    """torch.compile a tiny function in a child process and compare with eager."""
    if device == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "not available: no C compiler found (torch.compile on a CPU needs gcc or clang)"
    code = _COMPILE_PROBE.format(device=device)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return f"not available: did not finish within {timeout_s:.0f} s"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return "works"
    last = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"not available: {last[-1][:200] if last else f'exit code {done.returncode}'}"


def check_quantized_kernels() -> str:
    """Which kernels decode an int8/int4 model here, one row at a time (model/native.py)."""
    from dozero.model.native import native_available

    if native_available():
        return "dozero's own (model/gemv.c and decode.c, AVX-512 VNNI: near the memory's speed)"
    return "PyTorch's (dozero's own need AVX-512 VNNI and a C compiler, and DOZERO_NATIVE not 0)"


def environment_checks(device: str, skip_compile: bool = False) -> list[Check]:
    checks = [
        Check("Python", f"{platform.python_version()} ({sys.executable})"),
        Check("PyTorch", torch.__version__ + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build")),
        Check("operating system", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        Check("CPU cores", str(os.cpu_count())),
    ]
    total, available = system_memory()
    if total:
        free = f", {available / GIB:.1f} GiB available" if available else ""
        checks.append(Check("RAM", f"{total / GIB:.1f} GiB{free}"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            checks.append(
                Check(
                    f"GPU {i}", f"{props.name}, {props.total_memory / GIB:.1f} GiB, compute {props.major}.{props.minor}"
                )
            )
    elif torch.backends.mps.is_available():
        checks.append(Check("GPU", "Apple MPS (shares the system RAM)"))
    else:
        checks.append(Check("GPU", "none found: dozero runs on the CPU (fine for the small presets)"))
    checks.append(Check("device dozero will use", device))
    checks.append(Check("bf16", check_bf16(device)))
    checks.append(Check("flash attention", check_flash_attention(device)))
    if device == "cpu":
        checks.append(Check("int8/int4 decoding", check_quantized_kernels()))
    if skip_compile:
        checks.append(Check("torch.compile", "not checked (--skip-compile)"))
    else:
        checks.append(Check("torch.compile", check_compile(device)))
    return checks


def usable_memory(device: str) -> tuple[int | None, str]:
    """Bytes a model may use here, and what they are: GPU memory, or the RAM that is available."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return total, f"GPU memory ({torch.cuda.get_device_name()})"
    total, available = system_memory()
    return (available or total), "available RAM" + (" (shared with the MPS GPU)" if device == "mps" else "")


def _estimate_bytes(estimate: dict, training: bool, bf16: bool) -> int:
    """One total from `dozero.model.info.memory_estimate`: training (AdamW) or inference bytes."""
    return estimate["bf16" if bf16 else "fp32"]["training" if training else "inference"]


def fit_checks(preset: str, device: str, batch_size: int | None, context_length: int | None) -> list[Check]:
    """Does `preset` fit here for inference and for training, and which micro-batch fits?"""
    from dozero.config import get_model_config
    from dozero.model.info import memory_estimate

    cfg = get_model_config(preset)
    context = context_length or cfg.context_length
    memory, what = usable_memory(device)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    precision = "bf16 autocast" if bf16 else "fp32"
    if memory is None:
        return [Check(f"{preset}", "cannot tell: this system does not report its memory")]
    # Keep a margin for the framework, the CUDA context, fragmentation and the rest of the system.
    budget = int(memory * (0.9 if device == "cuda" else 0.7))
    checks = [Check("memory budget", f"{budget / GIB:.1f} GiB (of {memory / GIB:.1f} GiB {what}), {precision}")]

    infer = memory_estimate(cfg, 1, context)
    infer_bytes = _estimate_bytes(infer, training=False, bf16=bf16)
    verdict = "fits" if infer_bytes <= budget else "does NOT fit"
    checks.append(Check(f"{preset} inference (batch 1 x {context})", f"{verdict}: needs ~{infer_bytes / GIB:.2f} GiB"))

    sizes = [batch_size] if batch_size else [2**k for k in range(0, 9)]  # 1 .. 256
    fitting = []
    for b in sizes:
        need = _estimate_bytes(memory_estimate(cfg, b, context), training=True, bf16=bf16)
        if need <= budget:
            fitting.append((b, need))
        else:
            if batch_size:
                checks.append(
                    Check(
                        f"{preset} training (batch {b} x {context})",
                        f"does NOT fit: needs ~{need / GIB:.2f} GiB; try a smaller --batch-size",
                    )
                )
            break
    if batch_size and fitting:
        checks.append(
            Check(f"{preset} training (batch {batch_size} x {context})", f"fits: needs ~{fitting[0][1] / GIB:.2f} GiB")
        )
    elif not batch_size and fitting:
        b, need = fitting[-1]
        checks.append(Check(f"{preset} training", "fits"))
        checks.append(
            Check(
                "suggested micro-batch",
                f"{b} sequences x {context} tokens (~{need / GIB:.2f} GiB); reach a larger batch "
                "with gradient accumulation",
            )
        )
    elif not batch_size:
        need = _estimate_bytes(memory_estimate(cfg, 1, context), training=True, bf16=bf16)
        checks.append(
            Check(
                f"{preset} training",
                f"does NOT fit even at batch 1 (needs ~{need / GIB:.2f} GiB); "
                "pick a smaller preset or a shorter --context-length",
            )
        )
    if device == "cuda":
        checks.append(parallel_check(cfg, batch_size or 1, memory, torch.cuda.device_count()))
    if device == "cpu" and fitting and cfg.n_layers * cfg.emb_dim >= 12 * 768:
        checks.append(
            Check(
                "note",
                "it fits in RAM, but training a model this size on a CPU takes days; "
                "use a GPU or the shakespeare-char preset",
            )
        )
    return checks


def parallel_check(cfg, batch_size: int, memory: int, devices: int) -> Check:
    """Which `dozero train --parallel` to use on the GPUs of this machine (the first strategy whose
    estimate fits with 15% spare; dozero.model.info.suggest_strategy), one line."""
    from dozero.model import info

    pick = info.suggest_strategy(cfg, batch_size, devices, int(memory * info.USABLE_MEMORY))
    where = f"{devices} GPU{'s' if devices > 1 else ''} of {info.human_bytes(memory)}, batch {batch_size} per GPU"
    if pick is None:
        more = "more GPUs, " if devices < 8 else ""
        return Check("--parallel", f"nothing fits on {where}: {more}a smaller batch or a shorter context")
    if devices == 1:
        return Check("--parallel", f"one process fits on {where}: no --parallel needed")
    flags = info.strategy_flags(pick)
    return Check(
        "--parallel", f"{flags} on {where}: torchrun --nproc_per_node={devices} -m dozero train --parallel {flags}"
    )


def run_doctor(
    preset: str = "gpt2",
    batch_size: int | None = None,
    context_length: int | None = None,
    skip_compile: bool = False,
    log=print,
) -> list[Check]:
    """Print the check-up and return its lines (the CLI's `dozero doctor`)."""
    from dozero.config import get_model_config

    get_model_config(preset)  # a mistyped preset fails now, not after the slow checks
    device = pick_device().type
    checks = environment_checks(device, skip_compile)
    checks += fit_checks(preset, device, batch_size, context_length)
    width = max(len(c.name) for c in checks)
    for c in checks:
        log(f"{c.name:<{width}}  {c.value}")
    return checks
