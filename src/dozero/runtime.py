"""Device and process facts in one place: which device, which rank, which precision.

Nothing else in dozero reads `RANK`/`WORLD_SIZE` from the environment or imports
`torch.distributed`; it asks this module. A single process is rank 0 of a world of 1, so the
training loop reads the same with or without `torchrun`:

    torchrun --nproc_per_node=2 -m dozero train ...    # each process: rank 0 or 1, world_size 2
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

import torch
import torch.distributed as dist

from dozero.errors import DozeroError


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cuda", "cuda:1", "mps", "cpu") or, if None/"auto", the best one available.

    Under torchrun each process takes the GPU of its local rank."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:  # torch's message lists two dozen device types dozero does not run on
            raise DozeroError(f"--device '{requested}' is not known; choose auto, cpu, cuda, cuda:N or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise DozeroError(f"--device '{requested}' is not supported; choose auto, cpu, cuda, cuda:N or mps")
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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DozeroError(
            f"the environment variable {name}={value!r} is not a whole number; launch with torchrun, or unset {name}"
        ) from None


def is_distributed_launch() -> bool:
    """True when started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if is_distributed_launch() else 0


def world_size() -> int:
    """Number of training processes (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1) if is_distributed_launch() else 1


def local_rank() -> int:
    """This process's index on its own machine (which GPU it takes)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Only the main process (rank 0) prints and writes files."""
    return rank() == 0


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_cpu_group = None  # a gloo group beside NCCL, for small host-side agreements (see any_rank_max)


def check_launch() -> None:
    """One-line errors for a distributed environment that cannot work, before anything waits on it.
    Without these a stray WORLD_SIZE=2 left in a shell made init_process_group wait, silently, for
    processes that never come."""
    present = {v: os.environ[v] for v in LAUNCH_VARS if v in os.environ}
    given = ", ".join(f"{k}={v}" for k, v in present.items())
    world, rank_ = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    _env_int("LOCAL_RANK", 0)
    if world <= 1 and "RANK" not in present:
        return
    if world < 1 or not 0 <= rank_ < world:
        raise DozeroError(f"RANK must be in 0..WORLD_SIZE-1 and WORLD_SIZE >= 1 (found {given})")
    if world == 1:
        return
    unset = f"or unset {', '.join(present)} for a single process"
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in present]
    if missing:
        raise DozeroError(f"{given} is set but not {', '.join(missing)}: launch with torchrun {unset}")
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        raise DozeroError(
            f"{given} is set, but this process was not started by torchrun (no TORCHELASTIC_RUN_ID), so it would "
            f"wait for {world - 1} other process(es) that may never come: use torchrun --nproc_per_node=N {unset}"
        )


def init_distributed(device: torch.device) -> bool:
    """Join the process group if launched by torchrun: NCCL between GPUs, gloo on CPU.

    Returns True if this is a distributed run. A no-op for a single process."""
    global _cpu_group
    check_launch()
    if world_size() == 1:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    _cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    return True


def destroy_distributed() -> None:
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


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


def any_rank_max(value: int) -> int:
    """The largest `value` over all ranks (e.g. a stop signal seen by one process only). Cheap enough
    for every step: a CPU tensor all-reduced over gloo, so no device sync (under NCCL a separate
    gloo group carries it)."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group)
        return int(t.item())
    return value


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


@contextlib.contextmanager
def torch_settings(device: torch.device, threads: int = 0):
    """Inside: `threads` CPU threads (0: unchanged) and TF32 matmuls for the float32 parts on
    CUDA (Ampere+). Both are process-wide switches, so they are put back on exit, and so is the random
    generators' state (training seeds them): a Python caller of train() finds torch as it left it."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rng_devices = [device] if device.type == "cuda" and torch.cuda.is_available() else []  # and the CPU one
    try:
        if threads:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        with torch.random.fork_rng(devices=rng_devices):
            yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def free_memory(device: torch.device) -> int | None:
    """Bytes free for this process: on CUDA the device's free memory; on CPU the machine's
    MemAvailable shared among the processes of this machine; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available // max(1, _env_int("LOCAL_WORLD_SIZE", 1))


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


# ---- stop signals ------------------------------------------------------------------------------


class StopFlag:
    signum: int = 0
    """The number of the first SIGINT/SIGTERM received (0: none)."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals():
    """While inside: the first SIGINT/SIGTERM asks the loop to stop after the current step (with a
    checkpoint); a second one ends the process at once with status 128 + its number (130 after
    Ctrl-C, 143 after SIGTERM), even in the middle of a step that never ends."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield flag
        return
    # None: a handler set outside Python; the default action is the closest stand-in.
    previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in STOP_SIGNALS}

    def handler(signum, frame):  # the loop reads the flag at a step boundary; _watch does the rest
        flag.signum = flag.signum or signum

    # Why a watcher thread: CPython runs a Python handler only between bytecodes of the main thread.
    # Inside one long C call (a step with an absurd context length: minutes in one matmul or one
    # backward) the first and second signal both arrive before the handler runs, merge into one call,
    # and the second is lost. CPython's C-level handler runs at once for every signal and writes its
    # number to the wakeup fd; a thread reading that fd sees both (torch releases the GIL in its ops).
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # the C handler must never block
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(reader, previous_fd), daemon=True, name="dozero-stop-signals")
    watcher.start()
    try:
        yield flag
    finally:
        signal.set_wakeup_fd(previous_fd)  # one wakeup fd per process: asyncio's comes back
        for sig, old in previous.items():
            signal.signal(sig, old)
        writer.close()  # the watcher reads the end of the stream and returns
        watcher.join(timeout=5)
        reader.close()


def _watch(reader: socket.socket, previous_fd: int) -> None:
    """Read signal numbers from the wakeup socket: say what the first SIGINT/SIGTERM does; on the
    second, end the process at once (os._exit: the main thread may be stuck in C for minutes)."""
    seen = 0
    while data := reader.recv(64):
        if previous_fd != -1:  # whoever set a wakeup fd before (asyncio) still hears of every signal
            with contextlib.suppress(OSError):
                os.write(previous_fd, data)
        for signum in data:
            if signum not in STOP_SIGNALS:
                continue
            seen += 1
            # os.write, not print: the main thread may be in the middle of a write to the same stream.
            name = signal.Signals(signum).name
            if seen == 1:
                os.write(2, f"\n{name}: stopping after this step with a checkpoint (again: stop at once)\n".encode())
            else:
                os.write(2, f"\n{name} again: stopping at once\n".encode())
                os._exit(128 + signum)  # as a shell reports a process ended by the signal; train/loop.py's codes


def resident_bytes(field: str = "VmRSS") -> int | None:
    """This process's memory from /proc/self/status: resident now (VmRSS) or the peak (VmHWM, since the
    start or the last `reset_peak_memory`), in bytes. None where there is no /proc (macOS, Windows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except OSError:
        pass
    return None


def reset_peak_memory() -> None:
    """Set VmHWM to what is resident now (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the next
    peak read measures only what follows."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
