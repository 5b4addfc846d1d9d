"""A step that runs out of memory (a GPU's or a CPU's) is one line saying what to lower (train/loop.py
`_step`), not a traceback."""

from __future__ import annotations

import pytest
import torch

from dozero.cli import main

SHAPE = ["--n-layers", "1", "--emb-dim", "32", "--n-heads", "2", "--context-length", "16", "--micro-batch-size", "3"]
RUN = ["--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0", "--threads", "1"]


def cuda_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def cpu_out_of_memory():
    torch.empty(2**50, dtype=torch.uint8)  # a real failed allocation: a plain RuntimeError on a CPU


@pytest.mark.parametrize("allocate", [cuda_out_of_memory, cpu_out_of_memory])
def test_out_of_memory_in_a_step_is_one_line_naming_the_micro_batch(tmp_path, monkeypatch, capsys, allocate):
    import dozero.train.step

    def no_memory(self, index):
        allocate()

    monkeypatch.setattr(dozero.train.step.Stepper, "__call__", no_memory)
    assert main(["train", "--out-dir", str(tmp_path / "run"), *SHAPE, *RUN]) == 2
    err = capsys.readouterr().err
    line = "error: out of memory at step 1 with --micro-batch-size 3: use a smaller micro-batch"
    last = err.rstrip("\n").split("\n")[-1]  # the lines before it are the progress bar's
    assert last.startswith(line) and "--global-batch-tokens" in last and "Traceback" not in err, err
    assert not (tmp_path / "run" / "latest").exists()  # no checkpoint of a step that never happened
