"""Pipeline parallelism (--parallel pp): the stages compute what the whole model computes, and a
number of processes that does not divide the layers is one line. The same losses as one process at
2 stages, resumed from and into sharded checkpoints: tests/test_parallel_tp.py (Llama blocks, tied head)."""

from __future__ import annotations

import pytest
import torch

from dozero.config import get_model_config
from dozero.errors import DozeroError
from dozero.model.gpt import GPTModel


@pytest.mark.parametrize("preset", ["shakespeare-char", "llama-char"])
def test_stages_in_a_row_compute_the_whole_model(preset):
    from dozero.parallel.pp import Stage, stage_blocks

    torch.manual_seed(0)
    model = GPTModel(get_model_config(preset)).eval()
    x = torch.randint(0, 65, (2, 24))
    stages = [Stage(model, stage_blocks(4, 2, r), r == 0, r == 1) for r in range(2)]
    torch.testing.assert_close(stages[1](stages[0](x)), model(x), rtol=0, atol=0)
    assert [name for name, _ in stages[1].named_parameters()][0].startswith("trf_blocks.2.")  # the model's names


def test_layers_that_do_not_split_are_one_line_errors():
    from dozero.parallel.pp import stage_blocks

    assert stage_blocks(12, 4, 3) == range(9, 12)
    with pytest.raises(DozeroError, match="3 does not divide the model's 4 layers") as e:
        stage_blocks(4, 3, 0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "world, settings, device, message",
    [
        (1, {}, "cpu", "--parallel pp splits the blocks over 2 or more processes"),  # first stage = last stage
        (2, {"dtype": "float16"}, "cuda", "does not scale float16 losses: use --dtype bfloat16"),
    ],
)
def test_one_process_and_float16_are_one_line_errors(monkeypatch, world, settings, device, message):
    from dozero import runtime
    from dozero.parallel.pp import apply_pp
    from dozero.train.config import TrainConfig

    monkeypatch.setattr(runtime, "world_size", lambda: world)
    model = GPTModel(get_model_config("shakespeare-char"))
    cfg = TrainConfig(parallel="pp", **settings)
    with pytest.raises(DozeroError, match=message) as e:
        apply_pp(model, torch.optim.AdamW(model.parameters()), torch.optim.AdamW, cfg, torch.device(device))
    assert "\n" not in str(e.value) and len(model.trf_blocks) == 4  # refused before the model was cut


def test_each_micro_batch_loss_is_its_share_of_the_loops_accumulated_step():
    """The share comes from the stepper's own accumulation (here 3 without --global-batch-tokens), not
    recomputed apart from the loop's."""
    from types import SimpleNamespace

    from dozero.parallel.pp import MicroBatchLoss, PipelineStepper
    from dozero.train.config import TrainConfig

    model = SimpleNamespace(pipeline_loss=MicroBatchLoss())
    cfg = TrainConfig(micro_batch_size=2, global_batch_tokens=0)
    PipelineStepper(model, model, None, None, cfg, 3, torch.device("cpu"), torch.float32)
    logits, y = torch.randn(1, 5, 7), torch.randint(0, 7, (1, 5))
    expected = torch.nn.functional.cross_entropy(logits[0], y[0]) / 6
    torch.testing.assert_close(model.pipeline_loss(logits, y), expected)
