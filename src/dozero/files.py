"""Atomic file writes: every file dozero writes appears whole or not at all.

A crash, Ctrl-C or full disk mid-write leaves the previous file (or none), never half of one,
because the bytes go to a temporary file in the same folder that is then renamed over the
target (`os.replace` is atomic on POSIX and Windows within one filesystem).

    with atomic_path("runs/x/loss.png") as tmp:
        fig.savefig(tmp)
    atomic_write("manifest.json", text)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _default_mode() -> int:
    """0o644 under the usual umask: what `open(path, "w")` would have given the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp makes files private (0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj, **dumps_options) -> None:
    """`obj` as indented JSON, atomically; `dumps_options` go to `json.dumps` (e.g. default=...)."""
    atomic_write(path, json.dumps(obj, **{"indent": 2, **dumps_options}) + "\n")
