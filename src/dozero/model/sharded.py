"""Reading a sharded training checkpoint into whole tensors, with safetensors alone.

A run whose model is sharded over processes (`dozero train --parallel fsdp|zero2`) saves each
checkpoint with PyTorch's distributed checkpoint (DCP): every rank writes the pieces it holds, in parallel, to
its own file (dozero.parallel.dcp). The folder then holds

    config.json        the model's config, with "sharded": {"files": [...]} naming the shard files
    shards/*.safetensors   one file per rank; its header (DCP_SHARDING_INFO) gives, for each piece,
                       the offsets at which it sits in the whole tensor
                       names: model/<parameter>, optimizer/<parameter>/<state> (exp_avg, exp_avg_sq, step);
                       a fused tensor split by tensor parallelism as <name>#0, #1, ...: its row segments

`read_sharded` puts the pieces back together, whatever number of ranks wrote them, so such a folder
loads like any model folder (`load_model`, `dozero generate`, `dozero model convert`) and resumes on
any number of processes. No pickle is read: torch's own `.metadata` file is not used (torch's
HuggingFaceStorageReader reads the same headers; tests/test_parallel_dcp.py checks both agree).

    from dozero.model.sharded import read_sharded
    weights = read_sharded(Path("runs/x/latest"), "model/")      # {"tok_emb.weight": tensor, ...}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dozero.errors import DozeroError

SHARDED_KEY = "sharded"
"""config.json's entry that marks a sharded checkpoint: {"files": [shard file names]}."""
SHARDS_DIR = "shards"
SHARDING_INFO = "DCP_SHARDING_INFO"
"""The safetensors header entry where DCP writes each piece's offsets
(CUSTOM_METADATA_KEY in torch's distributed checkpoint _hf_utils)."""


def shard_files(folder: Path, config: dict) -> list[Path]:
    """The shard files config.json names, each checked to exist (a missing one is a clear error)."""
    names = (config.get(SHARDED_KEY) or {}).get("files")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DozeroError(f"{folder / 'config.json'}: '{SHARDED_KEY}' names no shard files; the file is damaged")
    bad = next((n for n in names if Path(n).name != n or not n.endswith(".safetensors")), None)
    if bad is not None:  # a name with a folder in it would read outside shards/
        raise DozeroError(f"{folder / 'config.json'}: '{bad}' is not a shard file name; the file is damaged")
    files = [folder / SHARDS_DIR / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DozeroError(
            f"{folder} is incomplete: shard file {SHARDS_DIR}/{missing[0]} is missing ({len(missing)} of "
            f"{len(files)} missing; each rank wrote one); use another checkpoint of the run"
        )
    return files


def read_sharded(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of every name starting with `prefix` (stripped from the names), put together
    from the pieces in all of the folder's shard files."""
    from safetensors import safe_open

    from dozero.model.checkpoint import MODEL_CONFIG_FILE, read_json, verify_checksums

    folder = Path(folder)
    files = shard_files(folder, read_json(folder / MODEL_CONFIG_FILE))
    verify_checksums(folder, only=tuple(f"{SHARDS_DIR}/{f.name}" for f in files), required=True)
    pieces: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get(SHARDING_INFO, "{}"))
                for key in f.keys():
                    if key.startswith(prefix):
                        offsets = info.get(key, {}).get("saved_offsets")
                        tensor = f.get_tensor(key)
                        if not isinstance(offsets, list) or len(offsets) != tensor.dim():
                            raise DozeroError(f"{path}: no offsets for '{key}' in its header; the file is damaged")
                        pieces.setdefault(key.removeprefix(prefix), []).append((offsets, tensor))
        except DozeroError:
            raise
        except Exception as e:  # safetensors raises its own error type for bad files
            raise DozeroError(f"{path} is truncated or corrupt ({e}); use another checkpoint of the run") from None
    whole = {name: _assemble(name, parts, folder) for name, parts in pieces.items()}
    return _join_segments(whole, folder)


def _join_segments(tensors: dict[str, torch.Tensor], where: Path | str = "the shards") -> dict[str, torch.Tensor]:
    """name#0, name#1, ... -> name, concatenated along the rows: a fused tensor (qkv, SwiGLU's fc)
    that tensor parallelism held in another row order is stored as its segments in the plain order."""
    joined: dict[str, dict[int, torch.Tensor]] = {}
    for key in [k for k in tensors if "#" in k]:
        name, _, index = key.rpartition("#")
        if not index.isdigit():
            raise DozeroError(f"{where}: '{key}' is not a segment name (<name>#<number>); the file is damaged")
        joined.setdefault(name, {})[int(index)] = tensors.pop(key)
    for name, parts in joined.items():
        if sorted(parts) != list(range(len(parts))) or name in tensors:
            raise DozeroError(
                f"{where}: the segments of '{name}' are not #0 to #{len(parts) - 1} alone; the file is damaged"
            )
        tensors[name] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
    return tensors


def _assemble(name: str, parts: list[tuple[list[int], torch.Tensor]], folder: Path) -> torch.Tensor:
    """One tensor from its pieces: the whole size is the furthest piece end in each dimension; every
    value must come from exactly one piece (DCP writes each once), which a mask of the covered values
    checks (pieces that overlap would leave other values unwritten, garbage from torch.empty)."""
    dims, dtype = parts[0][1].dim(), parts[0][1].dtype
    for offsets, t in parts:
        if t.dim() != dims or t.dtype != dtype or not all(type(o) is int and o >= 0 for o in offsets):
            raise DozeroError(f"{folder}: the pieces of '{name}' disagree or sit at {offsets}; the file is damaged")
    size = [max(offsets[d] + t.shape[d] for offsets, t in parts) for d in range(dims)]
    held = sum(t.numel() for _, t in parts)
    if held != math.prod(size):  # checked before allocating: a huge offset is not a huge tensor
        raise DozeroError(
            f"{folder}: the shards hold {held} of the {math.prod(size)} values of '{name}'; a shard is "
            "missing or from another run"
        )
    whole, covered = torch.empty(size, dtype=dtype), torch.zeros(size, dtype=torch.bool)
    for offsets, t in parts:
        where = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape, strict=True))
        if covered[where].any():
            raise DozeroError(f"{folder}: two pieces of '{name}' overlap at {offsets}; a shard is from another run")
        whole[where], covered[where] = t, True
    return whole
