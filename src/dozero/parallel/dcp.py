"""Sharded checkpoints: every rank writes the pieces of the weights and AdamW moments it holds, in
parallel, with torch.distributed.checkpoint (DCP); nothing passes through rank 0.

    files = save_sharded(folder / "shards", model, optimizer)     # every rank calls it

DCP writes safetensors files (its HuggingFaceStorageWriter, one file per rank) whose headers give
each piece's offsets in the whole tensor. Reading them back needs neither a process group nor the
number of ranks that wrote them (dozero.model.sharded.read_sharded): a run saved on 4 ranks resumes
on 2, or on 1, and `dozero generate` / `dozero model convert` read the folder as a model.

Names: model/<parameter> (the tied head is the token embedding, stored once) and
optimizer/<parameter>/<state>. The optimizer's hyperparameters (lr, betas, ...) are JSON in
trainer_state.json, as in an ordinary checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dozero import runtime
from dozero.parallel.optional import torch_module


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's weights and optimizer state by name: DTensors (their local pieces are written) or
    plain tensors (the same on every rank: DCP writes them once)."""
    segments = getattr(model, "tp_segments", {})  # fused rows tensor parallelism keeps rank-major (tp.py)
    state, name_of = {}, {}
    for name, p in model.named_parameters():
        state |= _in_plain_order(f"model/{name}", p.detach(), segments.get(name))
        name_of[id(p)] = name
    for p, moments in optimizer.state.items():
        name = name_of[id(p)]
        for key, value in moments.items():
            if torch.is_tensor(value):
                rows = segments.get(name) if value.shape == p.shape else None
                state |= _in_plain_order(f"optimizer/{name}/{key}", value, rows)
    return state


def _in_plain_order(key: str, t: torch.Tensor, rows: list[int] | None) -> dict[str, torch.Tensor]:
    """A tensor whose rows tensor parallelism put rank-major ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...]) as one
    DTensor per segment in the plain order, named key#0, key#1, ...: the checkpoint holds the model's
    own layout (dozero.model.sharded joins them), whatever the number of ranks."""
    if rows is None:
        return {key: t}
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = t.device_mesh
    tp_mesh = mesh if mesh.ndim == 1 else mesh[mesh.mesh_dim_names[-1]]
    if mesh.ndim > 1:  # fsdp+tp: gather FSDP's pieces of this rank's tensor-parallel slice
        t = t.redistribute(mesh, [Replicate()] * (mesh.ndim - 1) + [Shard(0)])
    n, local = tp_mesh.size(), t.to_local()
    pieces = local.split([size // n for size in rows])
    return {
        f"{key}#{i}": DTensor.from_local(piece.contiguous(), tp_mesh, [Shard(0)], run_check=False)
        for i, piece in enumerate(pieces)
    }


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Write this rank's pieces into `folder` (every rank calls it; ranks share the file system) and
    return the names of all ranks' files, sorted. DCP gathers the plans, dedupes what several ranks
    hold, and raises on every rank if one rank's write fails."""
    fsdp = torch_module("fsdp")
    for module in model.modules():  # after an evaluation's forward the root holds whole weights: back to shards,
        if isinstance(module, fsdp.FSDPModule):  # the parameters the optimizer knows
            module.reshard()
    dcp = torch_module("checkpoint", "fsdp")
    hf_storage = torch_module("checkpoint.hf_storage", "fsdp")
    writer = hf_storage.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save(sharded_state(model, optimizer), storage_writer=writer)
    runtime.barrier()  # every file is closed before rank 0 lists and checksums them
    return sorted(f.name for f in Path(folder).glob("*.safetensors"))
