"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with DTensor's `parallelize_module`.

Inside each block, over the N ranks of a tensor-parallel group:

    att.qkv, ff.fc         column-parallel: each rank computes its own heads / 1/N of the hidden width
    att.out_proj, ff.proj  row-parallel: each rank multiplies its slice; one all-reduce sums them

so a block's forward costs two all-reduces of (B, T, C) and so does its backward; weights, gradients
and AdamW moments of the four matrices are 1/N per rank. Everything else (embeddings, norms, the
head) is replicated: DTensors placed `Replicate()`, so the optimizer, gradient clipping and FSDP
(`fsdp+tp`, a 2-D mesh: data-parallel x tensor-parallel) see one kind of parameter.

Fused layers need their rows reordered first. qkv's rows are [q (nh hs) | k (nkv hs) | v (nkv hs)]
and SwiGLU's fc rows [gate (H) | up (H)]; a column split of that would give rank 0 all the queries
and none of its values. `rank_major_rows` reorders them as [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], where
q_r holds query heads r nh/N .. and k_r, v_r the key/value heads r nkv/N .. that serve them (with
grouped-query attention, nh/nkv consecutive query heads share one key/value head, so the groups
stay whole). Each attention module then counts its local heads. The sharded checkpoint stores the
pieces back in the plain order (`model.tp_segments`, dozero.parallel.dcp).

    mesh = init_device_mesh("cpu", (2,))
    apply_tp(model, mesh)       # in place; run under torchrun --nproc_per_node=2
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dozero.errors import DozeroError
from dozero.parallel.optional import torch_module


def segments(model: nn.Module) -> dict[str, list[int]]:
    """Rows of each fused tensor, by parameter name: qkv [C, nkv hs, nkv hs], SwiGLU fc [H, H]."""
    cfg, found = model.cfg, {}
    kv = cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        for suffix in ("weight", "bias"):
            found[f"trf_blocks.{i}.att.qkv.{suffix}"] = [cfg.n_heads * cfg.head_dim, kv, kv]
            if cfg.ff == "swiglu":
                found[f"trf_blocks.{i}.ff.fc.{suffix}"] = [cfg.hidden_dim, cfg.hidden_dim]
    names = {name for name, _ in model.named_parameters()}
    return {name: rows for name, rows in found.items() if name in names}


def rank_major_rows(rows: list[int], n: int) -> torch.Tensor:
    """Row order that puts each rank's slice of every segment together: [s0_0 s1_0 .. | s0_1 s1_1 .. | ...]."""
    starts = [sum(rows[:i]) for i in range(len(rows))]
    order = [
        torch.arange(start + r * size // n, start + (r + 1) * size // n)
        for r in range(n)
        for start, size in zip(starts, rows, strict=True)
    ]
    return torch.cat(order)


def check_divisible(cfg, n: int) -> None:
    """One line if the heads or widths do not split evenly over `n` tensor-parallel ranks."""
    for what, count in (("query heads", cfg.n_heads), ("key/value heads", cfg.kv_heads),
                        ("feed-forward hidden width", cfg.hidden_dim)):  # fmt: skip
        if count % n:
            raise DozeroError(
                f"tensor parallelism over {n} processes splits the {what} ({count}) evenly, and {n} does not "
                f"divide {count}: use a number of processes (or --tp-size) that divides it"
            )


def reorder_for_tp(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    """Put the fused rows rank-major (weights and any AdamW moments alike), and tell each attention
    module its local head counts. On the plain model, before it is distributed."""
    check_divisible(model.cfg, n)
    params = dict(model.named_parameters())
    model.tp_segments = segments(model)
    with torch.no_grad():
        for name, rows in model.tp_segments.items():
            order = rank_major_rows(rows, n)
            p = params[name]
            p.copy_(p[order])
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.copy_(value[order])
    for block in model.trf_blocks:
        att = block.att
        att.n_heads, att.n_kv_heads, att.kv_dim = att.n_heads // n, att.n_kv_heads // n, att.kv_dim // n


def apply_tp(model: nn.Module, mesh) -> None:
    """Column/row-split each block's four matrices over `mesh` (1-D) and replicate the rest."""
    parallel = torch_module("tensor.parallel", "tp")  # a one-line error on a torch without it

    plan = {"att.qkv": parallel.ColwiseParallel(), "att.out_proj": parallel.RowwiseParallel()}
    plan |= {"ff.fc": parallel.ColwiseParallel(), "ff.proj": parallel.RowwiseParallel()}
    for block in model.trf_blocks:
        parallel.parallelize_module(block, mesh, plan)
    replicate_rest(model, mesh)


def replicate_rest(model: nn.Module, mesh) -> None:
    """Every parameter not yet a DTensor becomes a `Replicate()` DTensor (a tied weight stays one
    parameter); the modules holding them take and return ordinary tensors, as before."""
    from torch.distributed.tensor import DTensor, Replicate

    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        owned = [(k, p) for k, p in module._parameters.items() if p is not None and not isinstance(p, DTensor)]
        for key, p in owned:
            if id(p) not in new:
                new[id(p)] = nn.Parameter(DTensor.from_local(p.data, mesh, [Replicate()], run_check=False))
            module._parameters[key] = new[id(p)]
        if owned:
            module.register_forward_pre_hook(lambda _, args: _as_replicated(args, mesh))
            module.register_forward_hook(lambda _, __, out: out.to_local() if isinstance(out, DTensor) else out)


def _as_replicated(args: tuple, mesh) -> tuple:
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(
        DTensor.from_local(a, mesh, [Replicate()], run_check=False)
        if torch.is_tensor(a) and not isinstance(a, DTensor)
        else a
        for a in args
    )


def tp_degree(strategy: str, tp_size: int, world: int) -> int:
    """Processes that compute one batch together: all of them for tp and pp, tp_size for fsdp+tp, 1 otherwise."""
    if strategy in ("tp", "pp"):
        return world
    if strategy != "fsdp+tp":
        return 1
    if world % tp_size or world == tp_size:
        raise DozeroError(
            f"--parallel fsdp+tp runs groups of --tp-size {tp_size} processes side by side, so the number of "
            f"processes ({world}) must be a multiple of it, and at least twice it (or use --parallel tp)"
        )
    return tp_size


def data_parallel(cfg) -> tuple[int, int]:
    """(this process's index, number) among the groups that read different batches. The processes of
    one tensor-parallel group compute one batch together, so they read the same one; the mesh puts
    them next to each other (ranks g*n .. g*n + n-1 form group g)."""
    from dozero import runtime

    world = runtime.world_size()
    n = tp_degree(getattr(cfg, "parallel", "auto"), getattr(cfg, "tp_size", 1), world)
    return runtime.rank() // n, world // n
