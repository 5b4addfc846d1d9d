"""HumanEval's sandbox: each program in its own limited process; loops, forks, file writes, network,
memory bombs and early exits are contained and scored as failures; right solutions pass."""

from __future__ import annotations

import os
import time

import pytest

from dozero.evaluate.generative import check_programs, load_humaneval
from dozero.evaluate.sandbox import SandboxLimits, run_program

FAST = SandboxLimits(timeout=3.0, memory_mb=512)


def test_a_right_program_passes_and_a_wrong_one_fails():
    assert run_program("assert sum([1, 2]) == 3", FAST).passed
    assert run_program("assert sum([1, 2]) == 4", FAST).reason == "failed"
    assert run_program("raise SystemExit(0)", FAST).reason == "failed"  # the tests after it never ran
    assert run_program("import os\nos._exit(0)", FAST).reason == "failed"


def test_endless_loop_is_killed_in_time():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass", FAST)
    assert outcome.reason == "timeout" and time.monotonic() - start < 10


@pytest.mark.parametrize(
    "program",
    [
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['sleep', '100'])",
        "import multiprocessing",
        "import os\nos.system('sleep 100')",
    ],
)
def test_new_processes_are_refused(program):
    assert run_program(program, FAST).reason == "failed"


def test_files_cannot_be_written_and_nothing_is_left(tmp_path):
    target = tmp_path / "written.txt"
    for program in [
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
        f"import os\nos.remove({str(tmp_path / 'keep')!r})",
    ]:
        (tmp_path / "keep").write_text("mine")
        assert run_program(program, FAST).reason == "failed"
        assert not target.exists() and (tmp_path / "keep").read_text() == "mine"


def test_network_and_memory_bomb_fail():
    assert run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))", FAST).reason == "failed"
    assert not run_program("x = bytearray(4 * 2**30)", FAST).passed  # over the 512 MB limit


def test_never_runs_in_our_process():
    assert run_program(f"import os\nassert os.getpid() != {os.getpid()}", FAST).passed


def test_humaneval_canonical_solutions_pass_and_empty_ones_fail():
    problems = load_humaneval()[:6]
    assert len(load_humaneval()) == 164
    assert check_programs(problems, [p.reference["canonical_solution"] for p in problems]) == [1.0] * 6
    assert check_programs(problems, ["    pass\n"] * 6) == [0.0] * 6
