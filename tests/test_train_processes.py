"""Training across processes: 2-process DDP (gloo, CPU) equals one process at the same global batch,
and SIGTERM in the middle of a run leaves a loadable checkpoint that resumes; a second signal ends the
process at once, even inside one long C call."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

TINY = ["--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "16", "--threads", "1"]
TINY += ["--eval-iters", "2", "--sample-tokens", "0", "--warmup-steps", "2", "--lr", "3e-3", "--log-interval", "1"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _losses(run: Path, name: str = "loss") -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in lines if name in r}


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    steps = ["--max-steps", "6", "--eval-interval", "3"]
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-m", "dozero", "train", "--out-dir", str(single), "--micro-batch-size", "8", *steps, *TINY],
        check=True,
        env=_env(),
        capture_output=True,
        timeout=300,
    )
    ddp = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    done = subprocess.run(
        [*torchrun, "-m", "dozero", "train", "--out-dir", str(ddp), "--micro-batch-size", "4", *steps, *TINY],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The loader gives rank r the r-th block of each step's global draw, so 2 ranks x 4 sequences see
    # the same windows as 1 process x 8; DDP averages the gradients; the curves agree to rounding.
    one, two = _losses(single), _losses(ddp)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for s in one:
        assert two[s] == pytest.approx(one[s], abs=1e-5), f"step {s}"
    assert one[6] < one[1] - 0.1  # and they trained
    # Evaluation is split the same way: each rank scores its half of every validation batch.
    one_val, two_val = _losses(single, "val_loss"), _losses(ddp, "val_loss")
    assert sorted(one_val) == sorted(two_val) == [3, 6]
    for s in one_val:
        assert two_val[s] == pytest.approx(one_val[s], abs=1e-5), f"validation at step {s}"
    # Only rank 0 wrote: one run folder, one metrics line per step.
    assert not (tmp_path / "ddp-2").exists()
    assert len([line for line in (ddp / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 6


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_resumes(tmp_path):
    from dozero.model.checkpoint import load_model

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dozero", "train", "--out-dir", str(run), "--micro-batch-size", "4", *TINY]
    proc = subprocess.Popen(
        [*cmd, "--max-steps", "100000", "--eval-interval", "100000"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # mid-run: no checkpoint exists yet (eval_interval is huge)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]  # 128 + 15, as a shell reports a run ended by SIGTERM
    assert "SIGTERM); resume: dozero train --resume" in out
    state = json.loads((run / "latest" / "trainer_state.json").read_text())
    assert state["step"] >= 5
    model = load_model(run)
    assert model.cfg.n_layers == 2
    # Resume for two more steps from where the signal stopped it.
    target = state["step"] + 2
    subprocess.run(
        [sys.executable, "-m", "dozero", "train", "--resume", str(run), "--max-steps", str(target)],
        check=True,
        env=_env(),
        capture_output=True,
        timeout=300,
    )
    assert json.loads((run / "latest" / "trainer_state.json").read_text())["step"] == target
    assert sorted(_losses(run)) == list(range(1, target + 1))


def _start(args: list[str], python_code: str | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", python_code, *args] if python_code else [sys.executable, "-m", "dozero", *args]
    return subprocess.Popen(head, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:  # the run prints "training N parameters ..." before its first step
        if text in line:
            return
    raise AssertionError(f"'{text}' never printed: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_sigint_stops_at_the_next_step_even_between_log_steps(tmp_path):
    # Signals used to be looked at on log steps only: with --log-interval 100000 a Ctrl-C waited for
    # the end of the run. Now the next step boundary saves, and the exit status is 130 (128 + SIGINT).
    run = tmp_path / "run"
    args = ["train", "--out-dir", str(run), "--micro-batch-size", "4", *TINY, "--log-interval", "100000"]
    proc = _start([*args, "--max-steps", "100000", "--eval-interval", "100000"])
    _wait_for_line(proc, "training ")
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT: stopping after this step" in err
    step = json.loads((run / "latest" / "trainer_state.json").read_text())["step"]
    assert f"stopped at step {step} (SIGINT)" in out and step >= 1


HUNG_STEP = """import sys, time
import dozero.train.step
def hang(self, index):
    print("step started", flush=True)
    while True:
        time.sleep(1)
dozero.train.step.Stepper.__call__ = hang
from dozero.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_sigterm_ends_a_step_that_never_ends(tmp_path):
    run = tmp_path / "run"
    proc = _start(["train", "--out-dir", str(run), *TINY], python_code=HUNG_STEP)
    _wait_for_line(proc, "step started")
    proc.send_signal(signal.SIGTERM)  # the first asks for a checkpoint after the step, which never ends
    time.sleep(1)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # the second ends the process at once, with 128 + 15
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "SIGTERM: stopping after this step with a checkpoint (again: stop at once)" in err
    assert "SIGTERM again: stopping at once" in err
    assert not (run / "latest").exists()


# One C call that keeps the main thread from the interpreter for ~25 s (123 single-threaded products
# of 2500 x 2500 matrices in one torch op; 14 s at 2000 x 2000 on the 2-core CI machine): a Python
# signal handler can run only after it returns, so two signals sent during it reach it as one.
LONG_C_CALL = """import torch
from dozero import runtime
torch.set_num_threads(1)
a = torch.randn(2500, 2500)
with runtime.stop_signals() as stop:
    print("ready", flush=True)
    torch.linalg.matrix_power(a, 2**62 - 1)
    print("the call returned; stop.signum =", stop.signum, flush=True)
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_ends_one_long_c_call_at_once(sig, status):
    # Issue 11: both signals used to merge into one handler call that waits for the C call to return,
    # so the second was lost and the run went on for minutes. A thread on the wakeup fd sees both.
    proc = _start([], python_code=LONG_C_CALL)
    try:
        _wait_for_line(proc, "ready")
        time.sleep(0.5)  # inside the C call by now
        proc.send_signal(sig)
        time.sleep(0.5)
        assert proc.poll() is None  # the first only asks for a stop after the step
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=5)  # at once: the call itself runs for ~20 s more
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == status, err[-2000:]
    name = sig.name
    assert f"{name}: stopping after this step with a checkpoint (again: stop at once)\n" in err
    assert f"{name} again: stopping at once\n" in err
    assert "the call returned" not in out


def test_stop_signals_gives_back_the_wakeup_fd_and_handlers_it_found(capfd):
    from dozero import runtime

    # A wakeup fd set before (asyncio sets one): exactly one per process, so it must come back.
    outer_r, outer_w = socket.socketpair()
    outer_w.setblocking(False)
    outer_r.settimeout(5)
    handler = signal.getsignal(signal.SIGTERM)
    before = signal.set_wakeup_fd(outer_w.fileno())
    try:
        with runtime.stop_signals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)  # the first: a flag and a message, nothing more
            assert outer_r.recv(8) == bytes([signal.SIGTERM])  # passed on to the fd set before
        assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is handler
        assert not [t for t in threading.enumerate() if t.name == "dozero-stop-signals"]
    finally:
        assert signal.set_wakeup_fd(before) == outer_w.fileno()
        outer_r.close()
        outer_w.close()
    assert "SIGTERM: stopping after this step with a checkpoint (again: stop at once)" in capfd.readouterr().err


def _child_with_rank(parent: int, rank: int) -> int:
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no child of {parent} has RANK={rank}")


@pytest.mark.slow
def test_under_ddp_a_signal_to_one_rank_stops_all_after_the_same_step(tmp_path):
    run = tmp_path / "ddp"
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519"]
    args = ["-m", "dozero", "train", "--out-dir", str(run), "--micro-batch-size", "4", *TINY]
    proc = subprocess.Popen(
        [sys.executable, *torchrun, *args, "--max-steps", "100000", "--eval-interval", "100000"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_line(proc, "training ")
    time.sleep(2)
    os.kill(_child_with_rank(proc.pid, 1), signal.SIGTERM)  # rank 1 only; rank 0 saves
    out, err = proc.communicate(timeout=120)
    step = json.loads((run / "latest" / "trainer_state.json").read_text())["step"]
    assert f"stopped at step {step} (SIGTERM)" in out, err[-3000:]
    assert proc.returncode != 0  # torchrun reports the workers' 143 as a failure
