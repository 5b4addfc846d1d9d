"""Device and process facts in one place: which device, which rank, which precision.

Nothing else in dozero reads `RANK`/`WORLD_SIZE` from the environment or imports
`torch.distributed`; it asks this module. A single process is rank 0 of a world of 1, so the
training loop reads the same with or without `torchrun`:

    torchrun --nproc_per_node=2 -m dozero train ...    # each process: rank 0 or 1, world_size 2
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from dozero.errors import DozeroError


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cuda", "cuda:1", "mps", "cpu") or, if None/"auto", the best one available.

    Under torchrun each process takes the GPU of its local rank."""
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DozeroError(f"device '{requested}' asked for, but CUDA is not available here; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DozeroError(f"device '{requested}' asked for, but MPS is not available here; use --device cpu")
        if device.type == "cuda" and device.index is None and is_distributed_launch():
            return torch.device("cuda", local_rank())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank()) if is_distributed_launch() else torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---- ranks -------------------------------------------------------------------------------------


def is_distributed_launch() -> bool:
    """True when started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of training processes (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its own machine (which GPU it takes)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Only the main process (rank 0) prints and writes files."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def init_distributed(device: torch.device) -> bool:
    """Join the process group if launched by torchrun: NCCL between GPUs, gloo on CPU.

    Returns True if this is a distributed run. A no-op for a single process."""
    if not is_distributed_launch() or int(os.environ["WORLD_SIZE"]) == 1:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks (the value itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def any_rank_true(flag: bool, device: torch.device) -> bool:
    """True if `flag` is True on any rank (e.g. a stop signal seen by one process only)."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around a finished model (the model itself in a single process).

    DDP averages gradients over ranks during backward, so every rank takes the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def no_sync(model: torch.nn.Module, skip_sync: bool):
    """Inside gradient accumulation, skip DDP's gradient all-reduce on all micro-steps but the last."""
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


# ---- precision ---------------------------------------------------------------------------------


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """ "auto" -> bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU/MPS.

    On CPU bf16 autocast is slower than float32 for small models (no AMX on most laptops), so
    "auto" keeps float32 there; ask for --dtype bfloat16 explicitly to try it."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested not in names:
        raise DozeroError(f"--dtype '{requested}' is not known; choose auto, float32, bfloat16 or float16")
    if requested == "float16" and device.type == "cpu":
        raise DozeroError("--dtype float16 needs a GPU; on CPU use float32 or bfloat16")
    return names[requested]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for forward passes: matmuls in `dtype`, weights stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype):
    """A GradScaler for float16 (whose small range underflows gradients), else None.

    bfloat16 has float32's range and needs no scaling."""
    if dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (for honest timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- hardware facts ----------------------------------------------------------------------------

# Dense bf16 tensor-core peak, FLOP/s, without sparsity, from each vendor's data sheet
# (NVIDIA A100/H100/H200/L4/L40/L40S/A10/T4 data sheets; RTX 3090/4090: Ada/Ampere whitepapers, FP16
# accumulate FP32). Matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),  # before "L4": "NVIDIA L40" contains "L4"
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 tensor cores (no bf16)
    ("T4", 65e12),  # fp16 tensor cores (no bf16)
]


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense bf16/fp16 FLOP/s, or None if unknown (CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def describe_hardware(device: torch.device) -> str:
    """One line naming the device, for reports."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x {world_size()} (CUDA {torch.version.cuda})"
    import platform

    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads x {world_size()} process(es)"


# ---- random state ------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every random generator training touches (python, numpy, torch CPU, CUDA), as JSON-able data."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": _to_jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_jsonable(x):
    return [_to_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
