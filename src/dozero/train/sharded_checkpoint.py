"""The sharded side of training checkpoints (dozero.train.checkpoint): a model spread over processes
(--parallel fsdp|zero2|tp|fsdp+tp|pp) is saved by every rank at once, each writing its own pieces of
the weights and AdamW moments (dozero.parallel.dcp); rank 0 adds the rest. A resume reads the pieces
back into whole tensors (dozero.model.sharded) on any number of processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dozero import runtime
from dozero.config import ModelConfig
from dozero.files import replace_folder, write_json
from dozero.model.checkpoint import CHECKSUMS_FILE, MODEL_CONFIG_FILE, dozero_config, read_json
from dozero.model.sharded import SHARDED_KEY, SHARDS_DIR


def write_sharded(final: Path, model, optimizer, fill) -> None:
    """Every rank writes its pieces into one temporary folder beside `final` (a name all ranks know,
    on the file system they share); rank 0 then adds the rest with `fill(tmp, shard_files)` and renames
    it into place, so the checkpoint appears whole or not at all, as an ordinary one."""
    from dozero import parallel

    tmp = final.with_name(f".{final.name}.sharded")
    if runtime.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash of an earlier save
        tmp.mkdir()
    runtime.barrier()
    try:
        shard_files = parallel.save_sharded(tmp / SHARDS_DIR, model, optimizer)
        if runtime.is_main():
            fill(tmp, shard_files)
            replace_folder(tmp, final, keep=lambda name: False)
    except BaseException:
        if runtime.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_sharded_config(folder: Path, cfg: ModelConfig, tokenizer, metadata: dict, shard_files: list[str]) -> None:
    """config.json of a model folder whose weights are in shards/ (dozero.model.sharded reads them)."""
    write_json(folder / MODEL_CONFIG_FILE, {**dozero_config(cfg, metadata), SHARDED_KEY: {"files": shard_files}})
    if tokenizer is not None:
        tokenizer.save(folder)


def add_checksums(folder: Path, names: list[str]) -> None:
    from dozero.data.shards import file_sha256

    record = read_json(folder / CHECKSUMS_FILE)
    record["sha256"].update({name: file_sha256(folder / name) for name in names})
    write_json(folder / CHECKSUMS_FILE, record)


def is_sharded_checkpoint(folder: Path) -> bool:
    return SHARDED_KEY in read_json(folder / MODEL_CONFIG_FILE)
