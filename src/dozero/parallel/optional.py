"""torch.distributed's optional parts, imported when a strategy needs them: FSDP2, DTensors,
pipelining and DCP's safetensors storage are public from torch 2.6, and dozero runs on torch >= 2.4
without them (a DDP or single-process run never imports them).

    fsdp = torch_module("fsdp")                  # torch.distributed.fsdp, or a one-line DozeroError
    pipelining = torch_module("pipelining", "pp")
"""

from __future__ import annotations

import importlib

import torch

from dozero.errors import DozeroError


def torch_module(name: str, strategy: str = "fsdp"):
    """torch.distributed.<name>; `strategy` names the --parallel that needs it in the error."""
    try:
        return importlib.import_module(f"torch.distributed.{name}")
    except ImportError:
        raise DozeroError(
            f"--parallel {strategy} needs torch.distributed.{name}, which this torch ({torch.__version__}) "
            "lacks: install torch >= 2.6, or use --parallel ddp"
        ) from None
