"""Data stage: raw text -> cleaned documents -> token shards -> training batches.

    dozero data prepare corpus/ --out data/mycorpus --tokenizer gpt2
    dozero data inspect data/mycorpus

Modules, in pipeline order: `ingest` (read files), `clean` (normalize, filter, dedup, scrub; the
personal-data patterns are in `pii`), `shards` (binary token shards, manifest, `load_split`), `prepare`
(the streaming orchestration), `loader` (random and sequential windows for training and evaluation),
`commands` (the CLI).
Names are imported lazily so `dozero --help` does not pay for torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "RandomWindowLoader": "dozero.data.loader",
    "SequentialWindowLoader": "dozero.data.loader",
    "load_split": "dozero.data.shards",
    "read_manifest": "dozero.data.shards",
    "ShardedTokens": "dozero.data.shards",
    "PrepareConfig": "dozero.data.prepare",
    "prepare": "dozero.data.prepare",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dozero.data' has no attribute {name!r}")
