"""Files dozero writes and reads: atomic writes, output folders it may write into, input folders walked safely.

Every file dozero writes appears whole or not at all: the bytes go to a temporary file in the same
folder that is then renamed over the target (`os.replace` is atomic on POSIX and Windows within one
filesystem), so a crash, Ctrl-C or full disk mid-write leaves the previous file (or none).

    with atomic_path("runs/x/loss.png") as tmp:
        fig.savefig(tmp)
    atomic_write("manifest.json", text)
    check_output_folder(out, "data folder", is_ours, force=args.force)   # refuse to clobber foreign folders
    files = find_files("corpus/")                                         # symlink loops are errors, not hangs
    input_path("tinyshakespeare")            # the text shipped with dozero, unless ./tinyshakespeare exists

Temporary names carry their owner (".loss.png.HOST-PID.x8k2j1qa.tmp"), so the debris of a process killed
with `kill -9` is recognized and removed the next time dozero writes into that folder, while the temps
of a process still running (here or on another machine sharing the disk) are left alone.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dozero.errors import DozeroError, naming_os_errors


def _read_umask() -> int:
    """The process umask. Read once: os.umask can only be read by setting it, which races other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # no /proc (macOS, Windows): at import, before any thread of ours writes
    os.umask(umask)
    return umask


FILE_MODE = 0o666 & ~_read_umask()  # what `open(path, "w")` would give (0o644 under the usual umask)
FOLDER_MODE = 0o777 & ~_read_umask()  # what `mkdir` would give (0o755)
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
# ".<target name>.<host>-<pid>.<8 random characters>.tmp" (files and folders alike).
_TEMP = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")
# ".<target name>.<host>-<pid>.old": a folder being replaced (see replace_folder).
_OLD = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.old$")
_swept: set[str] = set()  # folders already cleaned of stale temps by this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove temporary files and folders left in `folder` by dead dozero processes of this machine."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        old = _OLD.match(entry.name)
        if old and os.path.isdir(os.path.join(folder, old["target"])):
            m = old  # a replaced folder whose successor is in place: debris (else it is the only copy: kept)
        if not m or m["host"] != _HOST or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass  # someone else removed it first, or we may not: not our business to fail over debris
    return removed


def _sweep_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        remove_stale_temps(folder)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def make_temp_folder(beside: Path) -> Path:
    """A new empty folder in `beside`'s parent (same filesystem, so it can be renamed onto `beside`).
    Named like every dozero temp, so if this process dies (kill -9) the next one sweeps it."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(beside.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(beside), suffix=".tmp", dir=beside.parent))
    os.chmod(tmp, FOLDER_MODE)  # mkdtemp makes it private (0700); the result is shared like any folder
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` in one step.
    On any failure (disk full, read-only folder, Ctrl-C) the temporary goes and the old file stays;
    `dozero.cli` turns the OSError into one line (`errors.os_error_message`), naming `path` where the
    system named none (a full disk fails a write()) or named the temporary."""
    path = Path(path)
    tmp = None
    try:
        with naming_os_errors(path, temporary=path.parent / _temp_prefix(path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            _sweep_once(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
            os.close(fd)
            yield Path(tmp)
            os.chmod(tmp, FILE_MODE)  # mkstemp makes files private (0600)
            os.replace(tmp, path)
    except BaseException as e:
        why = _short_write_error(tmp, path) if isinstance(e, OSError) and e.errno is None and tmp else None
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if why is not None:
            raise why from None
        raise


def _short_write_error(tmp: str, path: Path) -> OSError | None:
    """numpy's `tofile` (gguf's writer uses it) reports a failed write as OSError("N requested and M written")
    without the system's errno. Ask the system again, reserving room after the temporary: a full disk
    answers ENOSPC, returned here naming `path`. None when that works (the first error stands)."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return None
    try:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            os.posix_fallocate(fd, os.fstat(fd).st_size, 1 << 20)
        finally:
            os.close(fd)
    except OSError as e:
        return OSError(e.errno, e.strerror, os.fspath(path))
    return None


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj, **dumps_options) -> None:
    """`obj` as indented JSON, atomically; `dumps_options` go to `json.dumps` (e.g. default=...)."""
    atomic_write(path, json.dumps(obj, **{"indent": 2, **dumps_options}) + "\n")


def replace_folder(new: Path, target: Path, keep: Callable[[str], bool]) -> None:
    """Put the complete folder `new` (from `make_temp_folder(target)`) at `target`. An existing `target` is
    renamed aside, `new` renamed in, the old entries for which `keep(name)` holds (files that are not
    dozero's) moved into it, and the rest removed. Readers see the old folder or the new one, never a mix."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.{_HOST}-{os.getpid()}.old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    for entry in os.scandir(old):
        if keep(entry.name) and not os.path.lexists(target / entry.name):
            os.rename(entry.path, target / entry.name)
    shutil.rmtree(old)


# ---------------------------------------------------------------- output folders
def check_output_folder(path: str | os.PathLike, what: str, is_ours: Callable[[Path], bool], force: bool) -> None:
    """Refuse an output `path` that is a file, or a non-empty folder that `is_ours` does not recognize as a
    `what` written earlier (a model folder, someone's documents), unless `force`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DozeroError(f"output {path} is a file, not a folder; choose another output folder")
    if force or not path.is_dir() or not any(path.iterdir()) or is_ours(path):
        return
    raise DozeroError(
        f"{path} is not empty and is not a {what}; writing there could replace files that are not dozero's: "
        "choose another output folder, or pass --force to write into it anyway"
    )


@contextmanager
def removed_if_failed(folder: str | os.PathLike) -> Iterator[None]:
    """For a command writing the output `folder`: if the block fails (a full disk, Ctrl-C), remove the
    folders it created for it (`folder`, and the parents that did not exist), so that a failed command
    leaves nothing that was not there before. A folder that existed before the block is never removed."""
    created = None  # the highest folder of the output's path that does not exist yet
    for p in (Path(folder).absolute(), *Path(folder).absolute().parents):
        if os.path.lexists(p):
            break
        created = p
    try:
        yield
    except BaseException:
        if created is not None and created.is_dir() and not created.is_symlink():
            shutil.rmtree(created, ignore_errors=True)
        raise


# ---------------------------------------------------------------- input files
# Texts shipped inside the package, addressable by name wherever dozero reads text, so that every
# example in the README and the guide runs on a fresh clone with nothing downloaded.
BUNDLED_TEXTS = {"tinyshakespeare": "tinyshakespeare.txt"}  # karpathy/char-rnn's input.txt, public domain


def input_path(item: str | os.PathLike) -> str:
    """`item`, or the path of the bundled text it names when no file or folder of that name exists
    here (a user's own ./tinyshakespeare always wins)."""
    item = os.fspath(item)
    if item in BUNDLED_TEXTS and not os.path.exists(item):
        from importlib import resources

        return str(resources.files("dozero") / "assets" / BUNDLED_TEXTS[item])
    return item


def find_files(folder: str | os.PathLike) -> list[Path]:
    """Every file below `folder`, sorted, skipping hidden files and folders below it (".git", temporaries).
    Links to folders are followed once each; a link back to a folder on its own path (a loop, which
    would make the walk endless) is a DozeroError naming it."""
    folder = Path(folder)
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = os.path.realpath(dirpath)
        visited.add(here)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
                raise DozeroError(
                    f"{os.path.join(dirpath, name)} is a link back to {real}, a folder above it: a loop that "
                    "would make the file search endless; remove the link or give the folders you mean"
                )
            if real not in visited:  # two links to one folder: read it once
                visited.add(real)
                keep.append(name)
        dirnames[:] = keep
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and os.path.isfile(Path(dirpath) / f)]
    return sorted(found)


def _match(parts: list[str], patterns: list[str]) -> bool:
    """Path parts against glob parts; "**" matches any number of folders (none included)."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_match(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _match(parts[1:], patterns[1:])


def glob_files(pattern: str) -> list[Path]:
    """Files matching the glob `pattern`, sorted; "**" spans folders. Python's glob follows links to folders
    forever on a loop; "**" here walks with `find_files`, which stops at loops."""
    if "**" not in pattern:
        return sorted(Path(p) for p in glob.glob(pattern) if os.path.isfile(p))
    parts = Path(pattern).parts
    first_magic = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    if not root.is_dir():
        return []
    return [p for p in find_files(root) if _match(list(p.relative_to(root).parts), list(parts[first_magic:]))]


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSONL file, read as it goes. A line
    that is not JSON, or a file that is not UTF-8, is a one-line DozeroError naming "path:line"; the
    caller checks the value's shape and names it the same way (f"{path}:{n}")."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DozeroError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                yield n, obj
        except UnicodeDecodeError as e:
            raise DozeroError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
