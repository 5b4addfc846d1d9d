"""The errors that the CLI turns into a one-line message and a non-zero exit.

Raise `DozeroError` for anything the *user* can fix (a missing file, a bad flag, a corrupt
checkpoint); its message says what went wrong, where, and what to do. Bugs stay ordinary
exceptions with tracebacks.

The operating system's own complaints about the user's disk (read-only, full, no permission, a
file where a folder should be) are just as fixable, and arrive as `OSError` from deep inside
whatever was writing; `os_error_message` turns the expected ones into the same kind of line, so
no code has to wrap every `open` and `mkdir`. A failed `write()` (a full disk) names no file; the code
that knows which file or folder is being written says so with `naming_os_errors(path)`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DozeroError(Exception):
    """A user-facing error: `dozero` prints `error: <message>` and exits with status 2."""


# errno -> what to do. The line reads "<path>: <the system's words>; <what to do>".
_OS_ADVICE = {
    errno.EROFS: "write to a folder on a writable disk",
    errno.ENOSPC: "free some space, or write to another disk",
    errno.EDQUOT: "free some space, or write to another disk",
    errno.EACCES: "choose a path you may write to, or change its permissions",
    errno.EPERM: "choose a path you may write to, or change its permissions",
    errno.EISDIR: "a folder is in the way: give the path of a file",
    errno.ENOTDIR: "part of this path is a file where a folder is needed; choose another path",
    errno.EEXIST: "choose another path, or move the existing one away first",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "check where the symbolic links point",
    errno.EMFILE: "raise the limit (ulimit -n) or use fewer workers",
}


def os_error_message(e: OSError) -> str | None:
    """One line for an expected `OSError` (a disk or path problem the user can fix), None for others.

    A rename (`os.replace(tmp, target)`, how dozero writes every file) names two paths; the second
    is the one the user asked for, so it is the one shown."""
    advice = _OS_ADVICE.get(e.errno)
    if advice is None:
        return None
    path = e.filename2 if e.filename2 is not None else e.filename
    reason = e.strerror or errno.errorcode.get(e.errno, "error")
    if e.errno == errno.EEXIST and path is not None and Path(path).is_file():
        reason += " (a file, where a folder is needed)"
    return f"{'(no path given)' if path is None else path}: {reason}; {advice}"


@contextmanager
def naming_os_errors(path: str | os.PathLike, temporary: str | os.PathLike | None = None) -> Iterator[None]:
    """Make an `OSError` raised in the block name `path` when it names no path (a full disk fails a
    `write()`, which has no file name) or names a path starting with `temporary` (the temporary file or
    folder an output is built in, or their common prefix: gone by the time the user reads the message),
    so that the user's one line says which output could not be written. An error that names another
    path (an input, say) keeps it."""
    try:
        yield
    except OSError as e:
        shown = e.filename2 if e.filename2 is not None else e.filename
        if shown is None or (temporary is not None and _starts_with(shown, temporary)):
            e.filename = os.fspath(path)
            if e.filename2 is not None:  # (set to None, it would show in the error's text as "-> None")
                e.filename2 = None
        raise


def _starts_with(path, prefix) -> bool:
    try:
        return os.path.abspath(os.fsdecode(path)).startswith(os.path.abspath(os.fsdecode(prefix)))
    except TypeError:  # a file descriptor
        return False
