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
from dozero.parallel.fsdp import _torch_module


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's weights and optimizer state by name: DTensors (their local pieces are written) or
    plain tensors (the same on every rank: DCP writes them once)."""
    state = {f"model/{name}": p.detach() for name, p in model.named_parameters()}
    name_of = {id(p): name for name, p in model.named_parameters()}
    for p, moments in optimizer.state.items():
        for key, value in moments.items():
            if torch.is_tensor(value):
                state[f"optimizer/{name_of[id(p)]}/{key}"] = value
    return state


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Write this rank's pieces into `folder` (every rank calls it; ranks share the file system) and
    return the names of all ranks' files, sorted. DCP gathers the plans, dedupes what several ranks
    hold, and raises on every rank if one rank's write fails."""
    fsdp = _torch_module("fsdp")
    for module in model.modules():  # after an evaluation's forward the root holds whole weights: back to shards,
        if isinstance(module, fsdp.FSDPModule):  # the parameters the optimizer knows
            module.reshard()
    dcp = _torch_module("checkpoint", "fsdp")
    hf_storage = _torch_module("checkpoint.hf_storage", "fsdp")
    writer = hf_storage.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save(sharded_state(model, optimizer), storage_writer=writer)
    runtime.barrier()  # every file is closed before rank 0 lists and checksums them
    return sorted(f.name for f in Path(folder).glob("*.safetensors"))
