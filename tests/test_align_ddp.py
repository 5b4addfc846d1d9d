"""Alignment under DDP (torchrun, 2 processes, gloo on CPU): 2 ranks x a batch of b take the same steps as
1 process x 2b, for `align dpo`, `align reward` and `align rl`; only rank 0 writes.

RL samples its rollouts, and 2 ranks cannot draw the same random answers as one process drawing twice
as many; so the RL check runs this file as a script (under torchrun or alone) with the rollout replaced
by a fixed function of the prompt: what is left to compare is the sharding, the gradient averaging and
the logged metrics, which is what DDP changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
# DDP's all-reduce sums the two ranks' gradients in another order than one process's backward does.
# Measured: the per-step losses of 4 steps agree within 6e-8 (float32).
TOLERANCE = 1e-6
COMMON = ["--device", "cpu", "--threads", "1", "--max-steps", "4", "--eval-interval", "4", "--log-interval", "1",
          "--warmup-steps", "1", "--tensorboard", "off", "--lora-rank", "4", "--lora-dropout", "0",
          "--lr", "1e-2"]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _launch(args: list[str], port: int | None) -> None:
    head = [*TORCHRUN, f"--master_port={port}"] if port else [sys.executable]
    done = subprocess.run([*head, *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}


def _same_steps(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < TOLERANCE, (step, a[step], b[step])
    assert a[4] != a[1]  # the steps did change the model
    for key in keys:  # per-step metrics: rank 0 logs the mean over both ranks' batches
        x, y = ([r[key] for r in _metrics(run) if key in r] for run in (one, two))
        assert len(x) == len(y) == 4 and all(abs(u - v) < 1e-4 for u, v in zip(x, y, strict=True)), (key, x, y)


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    from dozero.config import ModelConfig
    from dozero.model.checkpoint import save_model
    from dozero.model.gpt import GPTModel
    from dozero.tokenizer import gpt2

    folder = tmp_path_factory.mktemp("align_ddp")
    torch.manual_seed(0)
    tiny = ModelConfig(vocab_size=50257, context_length=48, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)
    save_model(GPTModel(tiny), folder / "base", tokenizer=gpt2())
    pairs = [{"prompt": f"add {i} and {i}", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1} maybe"} for i in range(20)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    prompts = [{"prompt": f"say {i}", "answer": i} for i in range(20)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_two_ranks_take_the_steps_of_one_process_with_twice_the_batch(tmp_path, base_and_data, method):
    data = ["-m", "dozero", "align", method, "--model", str(base_and_data / "base"), "--data",
            str(base_and_data / "pairs.jsonl"), *COMMON]  # fmt: skip
    _launch([*data, "--micro-batch-size", "4", "--out-dir", str(tmp_path / "one")], None)
    _launch([*data, "--micro-batch-size", "2", "--out-dir", str(tmp_path / "two")], 29561 if method == "dpo" else 29562)
    keys = ("reward_margin", "reward_accuracy") if method == "dpo" else ("margin", "accuracy")
    _same_steps(tmp_path / "one", tmp_path / "two", keys)
    assert (tmp_path / "two" / "latest").is_dir() and not (tmp_path / "two-2").exists()  # rank 0 wrote, once


@pytest.mark.slow
def test_rl_two_ranks_take_the_steps_of_one_process_with_twice_the_prompts(tmp_path, base_and_data):
    me = str(Path(__file__).resolve())
    _launch([me, str(base_and_data), str(tmp_path / "one"), "4"], None)
    _launch([me, str(base_and_data), str(tmp_path / "two"), "2"], 29563)
    _same_steps(tmp_path / "one", tmp_path / "two", ("mean_reward", "pass_at_1", "kl", "answer_tokens"))


def _fixed_rollout(model, prompts, k, config, end):
    """k answers per prompt that depend on the prompt alone (not on the batch or the RNG)."""
    return [[(sum(p) * 7 + 13 * j + 5 * t) % 90 + 10 for t in range(1 + (sum(p) + j) % 3)] for p in prompts
            for j in range(k)]  # fmt: skip


def _reward(prompt, answer, record):
    return float(len(answer) % 3 == 0) + 0.1 * len(answer)


def _rl_main(folder: str, out: str, prompts_per_step: int) -> None:
    import dataclasses

    from dozero.align import rl as rl_module

    rl_module.rollout = _fixed_rollout
    settings = rl_module.RLConfig(model=f"{folder}/base", data=f"{folder}/prompts.jsonl", lora_rank=4, lora_dropout=0.0,
                                  group_size=3, prompts_per_step=prompts_per_step, kl_coef=0.1)  # fmt: skip
    cfg = dataclasses.replace(rl_module.RL_DEFAULTS, out_dir=out, device="cpu", threads=1, max_steps=4, eval_interval=4,
                              log_interval=1, tensorboard="off", lr=1e-2)  # fmt: skip
    rl_module.rl(settings, cfg, quiet=True, reward_fn=_reward)


if __name__ == "__main__":
    _rl_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
