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
