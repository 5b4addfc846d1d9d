"""Data parallelism that shards (FSDP2, ZeRO-3 / ZeRO-2-like), and activation checkpointing.

DDP (dozero.runtime.wrap_ddp) keeps a whole copy of the weights, gradients and AdamW moments on
every process: 16 bytes per parameter in float32. FSDP (Zhao et al. 2023; ZeRO, Rajbhandari et al.
2020) keeps 1/N of each on each of N processes and all-gathers one block's weights just before
that block runs:

    fsdp   (ZeRO-3)   weights, gradients, moments sharded; a block's gathered weights are freed after
                      its forward and gathered again for its backward (least memory).
    zero2             the same, but the weights gathered in forward stay until backward (one gather
                      per step instead of two: more memory, less communication).
    cpu_offload       shards live in CPU memory; the optimizer step runs on the CPU.

Each block is its own FSDP unit (`fully_shard(block)`), then the root holds what is left (the
embeddings, the tied head, the final norm), as torchtitan's apply_fsdp does. The gradients are
reduce-scattered as averages, so N ranks x B sequences take the same step as one process x N*B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from dozero import runtime
from dozero.errors import DozeroError
from dozero.parallel import pp, tp
from dozero.parallel.optional import torch_module
from dozero.train.config import PARALLEL_STRATEGIES

STRATEGIES = PARALLEL_STRATEGIES
"""auto: DDP under torchrun, nothing in one process; ddp; fsdp (ZeRO-3); zero2 (FSDP, weights kept
from forward to backward); tp (tensor parallelism over all processes, tp.py); fsdp+tp (a 2-D mesh:
tp within groups of --tp-size, FSDP across them); pp (one stage of blocks per process, pp.py).
Defined with TrainConfig's --parallel."""


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each block's input during forward and recompute its inside during backward: the
    activations saved for backward shrink from every block's intermediates to one tensor (B, T, C)
    per block, for about one more forward pass of compute. The block's own forward is wrapped on the
    instance, so the state_dict's names do not change. Dropout draws the same masks on recompute
    (checkpoint saves and restores the RNG state)."""
    for block in model.trf_blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation, generation: nothing is saved anyway
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_fsdp(
    model: torch.nn.Module,
    device: torch.device,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    param_dtype: torch.dtype = torch.float32,
    mesh=None,
) -> torch.nn.Module:
    """Shard `model` in place over all processes: each transformer block, then the root.

    With `param_dtype` bfloat16 the shards stay float32 (the optimizer's master weights) but are
    all-gathered as bfloat16 (half the traffic, and the forward computes in bf16); gradients are
    reduce-scattered in float32, so the average over ranks loses nothing (torchtitan's default).
    `mesh`: the processes to shard over (default: all; fsdp+tp: the data-parallel dimension)."""
    fsdp = torch_module("fsdp")
    if mesh is None:
        mesh = torch_module("device_mesh").init_device_mesh(device.type, (runtime.world_size(),))
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype != torch.float32:
        options["mp_policy"] = fsdp.MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = fsdp.CPUOffloadPolicy()
    for block in model.trf_blocks:
        fsdp.fully_shard(block, **options)
    # The root's parameters are needed again at once by the loss (the head), so it never reshards.
    fsdp.fully_shard(model, **{**options, "reshard_after_forward": False})
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the parameters are spread over processes (FSDP, tensor parallelism, pipeline stages):
    then every rank runs each forward pass (evaluation too) and every rank takes part in a save.
    (FSDP is asked directly: between an evaluation's forward and the next backward, zero2's
    parameters are whole tensors, not DTensors.)"""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without FSDP2 / public DTensors shards nothing
        return False
    if isinstance(model, FSDPModule) or getattr(model, "pipeline", None) is not None:
        return True
    return any(isinstance(p, DTensor) for p in model.parameters())


def parallelize(model, optimizer, make_optimizer, cfg, device):
    """Apply `cfg.parallel` (STRATEGIES), cfg.cpu_offload, cfg.activation_checkpointing and cfg.compile
    to a finished model whose optimizer may hold restored state; `make_optimizer(model)` builds a new
    one. Returns (what the forward pass calls, the optimizer).

    Sharding replaces the parameters, so FSDP and tensor parallelism need a new optimizer; a restored
    state is carried over by parameter name (full tensors in, shards out)."""
    strategy, compile = cfg.parallel, cfg.compile
    if strategy not in STRATEGIES:
        raise DozeroError(f"--parallel '{strategy}' is not known: choose one of {', '.join(STRATEGIES)}")
    if cfg.cpu_offload and device.type == "cpu":  # FSDP's offload policy needs an accelerator to copy to
        raise DozeroError("--cpu-offload moves FSDP's shards from the GPU to CPU memory; on the CPU they are there")
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if strategy in ("auto", "ddp"):
        forward = torch.compile(model) if compile else model
        return runtime.wrap_ddp(forward, device), optimizer
    torch_module("fsdp", strategy)  # (tensor parallelism's own module: imported by apply_tp alone)
    if not (dist.is_available() and dist.is_initialized()):
        raise DozeroError(
            f"--parallel {strategy} shards the model over processes: launch with torchrun --nproc_per_node=N "
            "(or use --parallel auto in one process)"
        )
    if strategy == "pp":
        return pp.apply_pp(model, optimizer, make_optimizer, cfg, device)
    return _shard(model, optimizer, make_optimizer, cfg, device)


def _shard(model, optimizer, make_optimizer, cfg, device):
    """FSDP and/or tensor parallelism over a (data-parallel x tensor-parallel) mesh of all processes."""
    strategy, world = cfg.parallel, runtime.world_size()
    n = tp.tp_degree(strategy, cfg.tp_size, world)
    if n > 1:  # the fused rows rank-major, moments too, while both are still whole
        tp.reorder_for_tp(model, optimizer, n)
    state_dict = torch_module("checkpoint.state_dict")
    restored = state_dict.get_optimizer_state_dict(model, optimizer) if optimizer.state else None  # by name
    dp_mesh = None  # FSDP alone: over all processes
    if n > 1:
        mesh = torch_module("device_mesh").init_device_mesh(device.type, (world // n, n), mesh_dim_names=("dp", "tp"))
        tp.apply_tp(model, mesh["tp"])
        dp_mesh = mesh["dp"]
    if strategy != "tp":
        param_dtype = runtime.resolve_dtype(cfg.dtype, device)
        apply_fsdp(model, device, strategy != "zero2", cfg.cpu_offload, param_dtype, dp_mesh)
    optimizer = make_optimizer(model)
    if restored is not None:
        options = state_dict.StateDictOptions(full_state_dict=True)
        state_dict.set_optimizer_state_dict(model, optimizer, restored, options=options)
    return (torch.compile(model) if cfg.compile else model), optimizer


def full_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model and optimizer state, gathered from the shards into CPU tensors. Every rank
    must call it (it all-gathers); the tensors arrive on rank 0 only (others get empty dicts)."""
    state_dict = torch_module("checkpoint.state_dict")
    options = state_dict.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = state_dict.get_model_state_dict(model, options=options)
    return weights, state_dict.get_optimizer_state_dict(model, optimizer, options=options)


def gather_to_plain(model, optimizer, make_model, make_optimizer):
    """For saving a sharded run as an ordinary checkpoint: every rank calls it; rank 0 gets
    (a `make_model()` holding the gathered weights, a new optimizer from `make_optimizer(plain_model)`
    holding the gathered moments), the others (None, None). The whole model passes through rank 0's
    CPU memory."""
    weights, moments = full_training_state(model, optimizer)
    if not runtime.is_main():
        return None, None
    plain_model = make_model()
    plain_model.load_state_dict(weights)
    plain_optimizer = make_optimizer(plain_model)
    # The gathered state is keyed by parameter name; torch.optim's by position in the groups.
    name_of = {id(p): n for n, p in plain_model.named_parameters()}
    order = [name_of[id(p)] for g in plain_optimizer.param_groups for p in g["params"]]
    state = {i: moments["state"][n] for i, n in enumerate(order) if n in moments["state"]}
    groups, start = [], 0
    for own, saved in zip(plain_optimizer.param_groups, moments["param_groups"], strict=True):
        groups.append({**saved, "params": list(range(start, start + len(own["params"])))})
        start += len(own["params"])
    plain_optimizer.load_state_dict({"state": state, "param_groups": groups})
    return plain_model, plain_optimizer


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights and optimizer state held by this process (its shards under FSDP)."""

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this process's shard
        return t.numel() * t.element_size()

    params = sum(size(p) for p in model.parameters())
    moments = sum(size(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return params + moments
