"""Shared test fixtures: where the project's read-only data lives, and an offline tiktoken cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# tiktoken finds its files by the sha1 of their download URL (see shared/data/gpt2/README.txt).
_TIKTOKEN_CACHE_NAMES = {
    "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4": "gpt2.tiktoken",
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "vocab.bpe",
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "encoder.json",
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`. Skips only on a user's machine without it; in CI its absence fails."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing in CI")
        pytest.skip(f"{SHARED_DATA} not found (tests that compare with shared data need it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiktoken_gpt2(shared_data, tmp_path_factory):
    """`tiktoken.get_encoding("gpt2")`, served offline from shared/data through TIKTOKEN_CACHE_DIR."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for cache_name, file_name in _TIKTOKEN_CACHE_NAMES.items():
        shutil.copy(shared_data / "gpt2" / file_name, cache / cache_name)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        yield tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
