"""Training checkpoints: a model folder plus everything needed to continue exactly.

A run folder holds

    checkpoints/step_000500/   the last `keep_last` checkpoints
    latest/                    the newest checkpoint (what --resume continues from)
    best/                      the checkpoint with the lowest validation loss so far

Each is a model folder (`config.json`, `model.safetensors`, tokenizer files; loadable with
`dozero.model.checkpoint.load_model`) and the trainer state beside it:

    optimizer.safetensors      AdamW's moments and step counts
    trainer_state.json         step, RNG states (python, numpy, torch, cuda), data-loader position,
                               best validation loss, grad-scaler state

Nothing is unpickled: tensors go through safetensors, everything else is JSON. A checkpoint is
written into a temporary folder and renamed into place, so a crash mid-write leaves either the old
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dozero.errors import DozeroError
from dozero.files import write_json

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer's state_dict into flat tensors ("<param index>.<name>") and JSON groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]):
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in {TRAINER_STATE}")


def _replace_folder(tmp: Path, final: Path) -> None:
    """Put folder `tmp` at `final`, replacing what was there. The old folder is renamed aside first
    (two renames; between them `final` is briefly absent and `find_resume_point` falls back to
    checkpoints/)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard links where the file system allows (no extra disk for latest/ and best/), else copies."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    metadata: dict,
    is_best: bool,
    keep_last: int,
) -> Path:
    """Write checkpoints/step_XXXXXX, point latest/ (and best/ if `is_best`) at it, prune old ones."""
    from dozero.model.checkpoint import save_model

    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step:06d}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); a checkpoint is shared like any folder
    try:
        save_model(model, tmp, tokenizer=tokenizer, metadata=metadata)
        tensors, groups = optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_STATE))
        state = {**trainer_state, "step": step, "optimizer_param_groups": groups}
        write_json(tmp / TRAINER_STATE, state, indent=1, default=_json_default)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in ["latest"] + (["best"] if is_best else []):
        link_tmp = run_dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(link_tmp, ignore_errors=True)
        _link_or_copy_tree(final, link_tmp)
        _replace_folder(link_tmp, run_dir / name)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/step_* folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / TRAINER_STATE).is_file())


def find_resume_point(run_dir: Path) -> Path:
    """The checkpoint folder to resume from: latest/, else the newest of checkpoints/."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DozeroError(f"--resume {run_dir}: no such run folder")
    candidates = [run_dir / "latest"] if (run_dir / "latest" / TRAINER_STATE).is_file() else []
    candidates += list_checkpoints(run_dir)[::-1]
    if not candidates:
        raise DozeroError(
            f"--resume {run_dir}: no checkpoint found (looked for latest/{TRAINER_STATE} and checkpoints/step_*); "
            "start a new run without --resume"
        )
    return candidates[0]


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer in place from `folder`; return the rest of the trainer state."""
    folder = Path(folder)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
        tensors = load_file(str(folder / OPTIMIZER_STATE))
    except (OSError, ValueError) as e:
        raise DozeroError(f"cannot read the trainer state in {folder}: {e}; resume from another checkpoint") from e
    optimizer_from_files(optimizer, tensors, state.pop("optimizer_param_groups"))
    return state
