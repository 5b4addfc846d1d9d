"""Device and process facts in one place: which device, which rank, which precision.

Nothing else in dozero reads `RANK`/`WORLD_SIZE` from the environment or imports
`torch.distributed`; it asks this module.
"""

from __future__ import annotations

import torch

from dozero.errors import DozeroError


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cuda", "cuda:1", "mps", "cpu") or, if None/"auto", the best one available."""
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DozeroError(f"device '{requested}' asked for, but CUDA is not available here; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DozeroError(f"device '{requested}' asked for, but MPS is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
