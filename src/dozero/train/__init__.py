"""Pretraining: the loop, AdamW and its schedules, checkpoints with exact resume, run observation.

    from dozero.train import train, get_train_preset
    result = train(get_train_preset("shakespeare-char"))

Modules: `config` (TrainConfig + presets), `corpus` (what is read), `optim` (AdamW groups,
schedules), `loop` (the loop), `checkpoint` (trainer state, atomic, resume), `observe` (progress,
metrics.jsonl, loss.png, report.md), `commands` (`dozero train`). Names load lazily so `dozero --help`
does not pay for torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TrainConfig": "dozero.train.config",
    "TRAIN_PRESETS": "dozero.train.config",
    "get_train_preset": "dozero.train.config",
    "TrainResult": "dozero.train.loop",
    "train": "dozero.train.loop",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dozero.train' has no attribute {name!r}")
