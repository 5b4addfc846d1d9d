"""Scaling past one device: strategies applied to a finished model from outside (torchtitan's
parallelize.py), one function each.

    from dozero.parallel import apply_activation_checkpointing, apply_fsdp, apply_tp
    apply_activation_checkpointing(model)      # recompute each block's activations in backward
    apply_fsdp(model, reshard_after_forward=True, cpu_offload=False)   # ZeRO-3 (False: ZeRO-2-like)
    apply_tp(model, mesh)                      # heads and feed-forward split over a device mesh (tp.py)
    apply_pp(model, optimizer, ...)            # this rank's stage of blocks, a GPipe schedule (pp.py)

`dozero train --parallel auto|ddp|fsdp|zero2|tp|fsdp+tp|pp` chooses one (`parallelize` below); under
torchrun `auto` is DDP, as before. A sharded model's checkpoints are written by every rank
(`save_sharded`, dcp.py). Run the processes with torchrun, e.g.

    torchrun --nproc_per_node=2 -m dozero train --parallel fsdp

`torch.distributed` is imported here and in dozero.runtime only.
"""

from __future__ import annotations

from dozero.parallel.dcp import save_sharded
from dozero.parallel.fsdp import (
    STRATEGIES,
    apply_activation_checkpointing,
    apply_fsdp,
    full_training_state,
    gather_to_plain,
    is_sharded,
    local_state_bytes,
    parallelize,
)
from dozero.parallel.pp import PipelineStepper
from dozero.parallel.tp import apply_tp, data_parallel

__all__ = [
    "PipelineStepper",
    "STRATEGIES",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "apply_tp",
    "data_parallel",
    "full_training_state",
    "gather_to_plain",
    "is_sharded",
    "local_state_bytes",
    "parallelize",
    "save_sharded",
]
