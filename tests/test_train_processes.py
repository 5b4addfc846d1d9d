"""Training across processes: 2-process DDP (gloo, CPU) equals one process at the same global batch,
and SIGTERM in the middle of a run leaves a loadable checkpoint that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
    proc.send_signal(signal.SIGTERM)  # the second acts as SIGTERM does by default: the process ends
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert "SIGTERM: stopping after this step with a checkpoint (again: stop at once)" in err
    assert not (run / "latest").exists()


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
