"""Process and device facts: a launch environment that cannot work is a one-line error before
anything waits on it; torch's process-wide settings come back after training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from dozero import runtime
from dozero.errors import DozeroError

LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK=0, WORLD_SIZE=2 is set but not MASTER_ADDR, MASTER_PORT"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK must be in 0..WORLD_SIZE-1"),
        ({"WORLD_SIZE": "2"}, "is set but not RANK, MASTER_ADDR, MASTER_PORT: launch with torchrun"),
    ],
)
def test_bad_launch_environment_is_one_line(clean_env, env, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(DozeroError) as e:
        runtime.init_distributed(torch.device("cpu"))
    assert message in str(e.value)


def test_a_single_process_ignores_rank_zero_of_one(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    assert runtime.init_distributed(torch.device("cpu")) is False
    assert (runtime.rank(), runtime.world_size(), runtime.any_rank_max(15)) == (0, 1, 15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stray_world_size_outside_torchrun_fails_at_once_instead_of_hanging(tmp_path):
    # RANK/WORLD_SIZE/MASTER_* left in a shell: init_process_group would wait (30 minutes) for a
    # second process that never comes. Now: exit 2 at once with a line naming the variables.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "dozero", "train", "--out-dir", str(tmp_path / "r"), "--max-steps", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: RANK=0, WORLD_SIZE=2, MASTER_ADDR=127.0.0.1" in done.stderr
    assert "not started by torchrun" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("device, message", [("tpu", "is not known"), ("meta", "is not supported")])
def test_unknown_device_is_one_line(device, message):
    with pytest.raises(DozeroError, match=f"--device '{device}' {message}; choose auto, cpu, cuda, cuda:N or mps"):
        runtime.pick_device(device)


def test_torch_settings_are_restored():
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with runtime.torch_settings(torch.device("cuda"), threads=1):  # the switches exist without a GPU
        assert torch.get_num_threads() == 1
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_num_threads() == threads
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32


def test_train_leaves_torch_threads_and_random_state_as_it_found_them(tmp_path):
    from dozero.train.loop import train
    from test_train import TINY_SHAPE, tiny_config

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    try:
        train(tiny_config(tmp_path, max_steps=1, eval_interval=1, threads=1), TINY_SHAPE, quiet=True)
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.rand(3), expected)  # train seeded the generator inside, not the caller's
    finally:
        torch.set_num_threads(before)


def test_free_memory_is_known_on_cpu():
    free = runtime.free_memory(torch.device("cpu"))
    assert free is not None and 10 * 2**20 < free < 2**50
