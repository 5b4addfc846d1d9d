"""Training run folders and checkpoints: a model folder plus everything needed to continue exactly.

A run folder holds

    train_config.json          the run's TrainConfig and ModelConfig (what --resume continues)
    checkpoints/step_000500/   the last `keep_last` checkpoints
    latest/                    a copy of the newest checkpoint (what --resume RUN continues from)
    best/                      a copy of the checkpoint with the lowest validation loss so far

Each checkpoint is a model folder (`config.json`, `model.safetensors`, tokenizer files; loadable with
`dozero.model.checkpoint.load_model`) and the trainer state beside it:

    optimizer.safetensors      AdamW's moments and step counts
    trainer_state.json         step, RNG states (python, numpy, torch, cuda), data-loader position,
                               best validation loss, grad-scaler state
    checksums.json             the sha256 of every other file, written last, checked on resume

A run whose model is sharded over processes (--parallel fsdp|zero2|tp|fsdp+tp|pp) writes a sharded checkpoint
instead: every rank writes its own pieces of the weights and moments into shards/ in parallel
(PyTorch's distributed checkpoint, DCP; dozero.parallel.dcp), there is no model.safetensors or
optimizer.safetensors, and config.json names the shard files. It loads as a model folder and
resumes on any number of processes (dozero.model.sharded puts the pieces back together);
`dozero model convert CKPT OUT --to dozero` makes an ordinary model folder of it.

Nothing is unpickled: tensors go through safetensors, everything else is JSON. A checkpoint is
written into a temporary folder and renamed into place, so a crash mid-write leaves either the old
checkpoint or the new one, never half of one. latest/ and best/ are copies, not hard links, so a
damaged file in one does not damage the other, and resume can fall back to checkpoints/.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from dozero import runtime
from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.files import FILE_MODE, check_output_folder, make_temp_folder, replace_folder, write_json
from dozero.model.checkpoint import (
    CHECKSUMS_FILE,
    model_config_from_dict,
    read_json,
    read_safetensors,
    verify_checksums,
    write_checksums,
    write_safetensors,
)
from dozero.model.sharded import SHARDS_DIR, read_sharded
from dozero.train.config import TrainConfig
from dozero.train.optimizer_files import moments_by_position, optimizer_from_files, optimizer_to_files
from dozero.train.sharded_checkpoint import add_checksums, is_sharded_checkpoint, save_sharded_config, write_sharded

RUN_CONFIG_FILE = "train_config.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


# ----------------------------------------------------------------------------- the run folder


def choose_run_dir(out_dir: str, force: bool = False) -> Path:
    """`out_dir`, or `out_dir-2`, `-3`... if a run already lives there (never overwrite a run). A folder that
    holds other files (someone's documents, a model folder) is refused unless `force` (--force)."""
    base = Path(out_dir)
    candidate, n = base, 1
    while (candidate / RUN_CONFIG_FILE).exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    check_output_folder(candidate, "dozero run folder", lambda folder: (folder / RUN_CONFIG_FILE).exists(), force)
    return candidate


def session_run_dir(cfg: TrainConfig, resume: str | Path | None, main: bool) -> Path:
    """The folder this session writes: the resumed run's, or for a new run the one `choose_run_dir` picks on
    the main process (which alone writes run files; the others take --out-dir as given)."""
    if resume:
        return run_dir_of(resume)
    return choose_run_dir(cfg.out_dir, cfg.force) if main else Path(cfg.out_dir)


def run_dir_of(resume: str | Path) -> Path:
    """The run folder of `--resume PATH`: PATH itself, or for a checkpoint inside a run
    (RUN/latest, RUN/best, RUN/checkpoints/step_N) the run folder around it."""
    path = Path(resume)
    if (path / TRAINER_STATE).is_file() or (path / CHECKSUMS_FILE).is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path


def read_run_config(resume: str | Path) -> tuple[TrainConfig, ModelConfig]:
    """The validated settings saved in the run folder of `resume`; every error names the file."""
    run_dir = run_dir_of(resume)
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise DozeroError(f"--resume {resume}: no {RUN_CONFIG_FILE} in {run_dir}; is it a dozero run folder?")
    saved = read_json(path)
    for section in ("train", "model"):
        if not isinstance(saved.get(section), dict):
            raise DozeroError(f"{path}: no '{section}' object; the file is damaged (it is written by dozero train)")
    try:
        cfg = TrainConfig.from_dict(saved["train"])
    except DozeroError as e:
        raise DozeroError(f"{path}: {e}") from None
    return cfg, model_config_from_dict(saved["model"], str(path))


def write_run_config(run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """The settings a later --resume continues with. stop_after is left out: it stops the session
    that gave it, and kept it would stop a resume from an older checkpoint at the same step again."""
    train = {**cfg.to_dict(), "stop_after": 0}
    write_json(run_dir / RUN_CONFIG_FILE, {"train": train, "model": model_cfg.to_dict()}, indent=1)


# ----------------------------------------------------------------------------- writing


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in {TRAINER_STATE}")


def _write_folder(final: Path, fill) -> None:
    """Create `final` atomically: `fill(tmp)` writes into a temporary folder beside it, which is
    then renamed into place; on any error the temporary folder goes and `final` is untouched."""
    tmp = make_temp_folder(final)  # a temp left by kill -9 is swept by the next save in this folder
    try:
        fill(tmp)
        for path in tmp.rglob("*"):  # safetensors writes files private (0600): another user could not resume
            if path.is_file():
                os.chmod(path, FILE_MODE)
        replace_folder(tmp, final, keep=lambda name: False)  # nothing of the old one stays
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    extra_files=None,
    sharded: bool = False,
) -> Path:
    """Write checkpoints/step_XXXXXX, copy it to latest/ (and best/ if `is_best`), prune old ones.
    `extra_files(folder)`, if given, writes more files into the checkpoint (fine-tuning: the LoRA adapter)
    before the checksums, so they are verified with the rest.

    sharded: `model` is sharded over processes; every rank calls this and writes its own pieces
    (`write_sharded`); the trainer state (rank 0's) and everything else is written by rank 0 alone."""
    from dozero.model.checkpoint import save_model

    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    if runtime.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"

    def fill(tmp: Path, shard_files=None) -> None:
        if shard_files is None:
            save_model(model, tmp, tokenizer=tokenizer, metadata=metadata)
            tensors, groups = optimizer_to_files(optimizer)
            write_safetensors(tmp / OPTIMIZER_STATE, tensors)  # a full disk: an OSError, not safetensors' own
        else:
            save_sharded_config(tmp, model.cfg, tokenizer, metadata, shard_files)
            groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups]
        state = {**trainer_state, "step": step, "optimizer_param_groups": groups}
        write_json(tmp / TRAINER_STATE, state, indent=1, default=_json_default)
        if extra_files is not None:
            extra_files(tmp)
        write_checksums(tmp, step=step)  # last: a folder with checksums.json is complete
        if shard_files is not None:  # the shards are checked on load like every other file
            add_checksums(tmp, [f"{SHARDS_DIR}/{name}" for name in shard_files])

    if sharded:
        write_sharded(final, model, optimizer, fill)
        if not runtime.is_main():
            return final
    else:
        _write_folder(final, fill)
    for name in ["latest"] + (["best"] if is_best else []):
        # Copies, not hard links: a hard link is the same bytes, so one damaged file would damage both.
        _write_folder(run_dir / name, lambda tmp: _copy_files(final, tmp))
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _copy_files(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir(), key=lambda f: f.name == CHECKSUMS_FILE):  # checksums.json last
        if f.is_dir():  # a sharded checkpoint's shards/
            shutil.copytree(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)


# ----------------------------------------------------------------------------- choosing one to resume


def list_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/step_* folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / TRAINER_STATE).is_file())


def verify_checkpoint(folder: Path) -> None:
    """DozeroError if `folder` is not a whole, undamaged checkpoint (checksums of every file)."""
    sharded = is_sharded_checkpoint(folder)  # as the loader decides: config.json's key, not what is on disk
    for name in (TRAINER_STATE,) if sharded else (TRAINER_STATE, OPTIMIZER_STATE):
        if not (folder / name).is_file():
            raise DozeroError(f"{folder} is not a whole checkpoint: {name} is missing")
    if sharded and not (folder / SHARDS_DIR).is_dir():
        raise DozeroError(f"{folder} is not a whole checkpoint: its shard folder {SHARDS_DIR}/ is missing")
    verify_checksums(folder)


def find_resume_point(resume: str | Path) -> tuple[Path, str | None]:
    """The checkpoint folder to continue from, and a note to show (or None).

    `resume` names a checkpoint (used as asked) or a run folder (its latest/). When latest/ is
    damaged and checkpoints/ holds an intact copy of the same step, that copy is used: it is the
    same state, so nothing is lost. An older checkpoint is never taken without being asked for
    (that would silently drop steps); the error lists them instead."""
    path, run_dir = Path(resume), run_dir_of(resume)
    if not run_dir.is_dir():
        raise DozeroError(f"--resume {resume}: no such run folder")
    if path != run_dir:
        _verify_or_explain(path, run_dir)
        return path, None
    latest = run_dir / "latest"
    if not latest.exists():  # between the two renames of a save, or removed: the newest numbered one
        newest = list_checkpoints(run_dir)[-1:]
        if not newest:
            raise DozeroError(
                f"--resume {run_dir}: no checkpoint found (looked for latest/ and checkpoints/step_*); "
                "start a new run without --resume"
            )
        _verify_or_explain(newest[0], run_dir)
        return newest[0], None
    try:
        verify_checkpoint(latest)
        return latest, None
    except DozeroError as damage:
        twin = _same_step_copy(latest, run_dir)
        if twin is None:
            _verify_or_explain(latest, run_dir, damage)
        return twin, f"warning: {damage}; resuming from its intact copy {twin}"


def _same_step_copy(latest: Path, run_dir: Path) -> Path | None:
    """checkpoints/step_N for the step that latest/checksums.json names, if it verifies."""
    try:
        step = int(json.loads((latest / CHECKSUMS_FILE).read_text())["step"])
        twin = run_dir / "checkpoints" / f"step_{step:06d}"
        verify_checkpoint(twin)
        return twin
    except (OSError, ValueError, KeyError, TypeError, DozeroError):
        return None


def _verify_or_explain(folder: Path, run_dir: Path, damage: DozeroError | None = None) -> None:
    """Verify `folder`; if damaged, one line: what is damaged and which checkpoints to try instead."""
    try:
        if damage is None:
            verify_checkpoint(folder)
            return
    except DozeroError as e:
        damage = e
    # Named by step, newest first: older ones as "older", and latest/'s own step (its twin, damaged too) not at all.
    step = _step_of(folder)
    others = [(p, _step_of(p)) for p in list_checkpoints(run_dir)[::-1] if p.resolve() != folder.resolve()]
    older = [p for p, n in others if step is None or n is None or n < step]
    later = [p for p, n in others if step is not None and n is not None and n > step]
    if older:
        advice = f"older checkpoints: {', '.join(p.name for p in older)}; resume from one with --resume {older[0]}"
    elif later:
        names = ", ".join(p.name for p in later)
        advice = f"no older checkpoint; later ones: {names}; resume from one with --resume {later[-1]}"
    else:
        advice = "no other checkpoint is left; start a new run"
    raise DozeroError(f"{damage}; {advice}")


def _step_of(folder: Path) -> int | None:
    """A checkpoint's step: from its name (checkpoints/step_N), else (latest/, best/) its checksums.json."""
    if folder.name.startswith("step_") and folder.name[5:].isdigit():
        return int(folder.name[5:])
    try:
        return int(json.loads((folder / CHECKSUMS_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Resuming from step N abandons what came after it: checkpoints/step_M (M > N) are renamed to
    checkpoints/abandoned_step_M (kept, not deleted) so they are neither resumed from nor pruned
    in place of the new ones."""
    moved = []
    for folder in list_checkpoints(run_dir):
        if int(folder.name.removeprefix("step_")) > step:
            target = folder.with_name(f"abandoned_{folder.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
            moved.append(target)
    return moved


# ----------------------------------------------------------------------------- reading


def restore(resume, run_dir: Path, model: torch.nn.Module, optimizer, loader, scaler) -> dict:
    """Load the checkpoint that `resume` names into a fresh model, optimizer, loader, grad scaler and
    the RNGs; return its trainer state. Notes (a fallback, set-aside checkpoints) go to stderr."""
    from dozero.model.checkpoint import load_model

    folder, note = find_resume_point(resume)
    saved = load_model(folder)
    if saved.cfg != model.cfg:
        changed = [k for k, v in saved.cfg.to_dict().items() if getattr(model.cfg, k) != v]
        raise DozeroError(
            f"{folder} holds another model shape than {run_dir / RUN_CONFIG_FILE} ({', '.join(changed)} differ); "
            "the run folder mixes two runs"
        )
    model.load_state_dict(saved.state_dict())
    state = load_trainer_state(folder, optimizer, model)
    check_finite(folder, model, optimizer)
    loader.load_state_dict(state["loader"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    runtime.set_rng_state(state["rng"])
    if runtime.is_main():  # on stderr even when quiet: they say which checkpoint this run continues
        moved = set_aside_later_checkpoints(run_dir, state["step"])
        if note:
            print(note, file=sys.stderr)
        if moved:
            names = ", ".join(p.name for p in moved)
            print(f"resuming from step {state['step']}: later checkpoints renamed {names}", file=sys.stderr)
    runtime.barrier()
    return state


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> dict:
    """Restore the optimizer in place from `folder`; return the rest of the trainer state. `model`
    (the optimizer's) is needed for a sharded checkpoint, whose moments are stored by parameter name."""
    folder = Path(folder)
    state = read_json(folder / TRAINER_STATE)
    groups = state.pop("optimizer_param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise DozeroError(f"{folder / TRAINER_STATE}: no valid 'optimizer_param_groups'; the file is damaged")
    if is_sharded_checkpoint(folder):
        if model is None:  # its moments are stored by parameter name: the model gives the names
            raise DozeroError(f"{folder} is a sharded checkpoint of a --parallel run; resume it with dozero train")
        where = folder / SHARDS_DIR
        tensors, groups = moments_by_position(read_sharded(folder, "optimizer/"), groups, model, optimizer, where)
    else:
        where = folder / OPTIMIZER_STATE
        tensors = read_safetensors(where)
    optimizer_from_files(optimizer, tensors, groups, where)
    for key in ("step", "loader", "rng"):
        if key not in state:
            raise DozeroError(f"{folder / TRAINER_STATE}: no '{key}'; the file is damaged")
    return state


def check_finite(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint holding NaN/inf (a damage the checksums cannot see: written that way) is an error
    now, not a NaN loss later."""
    tensors = {f"weight {n}": p for n, p in model.named_parameters()}
    for i, s in enumerate(optimizer.state.values()):
        tensors.update({f"optimizer {i}.{n}": t for n, t in s.items() if torch.is_tensor(t)})
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise DozeroError(f"{folder}: {name} holds NaN or inf values; resume from an older checkpoint")
