"""Fine-tuning under DDP (torchrun, 2 processes, gloo on CPU): 2 ranks x a batch of b take the same steps
as 1 process x 2b, padded and packed (the issue asks fine-tuning to reuse the trainer's DDP)."""

from __future__ import annotations

import json

import pytest
import torch

from test_align_ddp import COMMON, _launch, _same_steps


@pytest.fixture(scope="module")
def base_and_chats(tmp_path_factory):
    from dozero.config import ModelConfig
    from dozero.model.checkpoint import save_model
    from dozero.model.gpt import GPTModel
    from dozero.tokenizer import gpt2

    folder = tmp_path_factory.mktemp("finetune_ddp")
    torch.manual_seed(0)
    tiny = ModelConfig(vocab_size=50257, context_length=48, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)
    save_model(GPTModel(tiny), folder / "base", tokenizer=gpt2())
    chats = [{"messages": [{"role": "user", "content": f"add {i} and {i}" + " please" * (i % 4)},
                           {"role": "assistant", "content": f"{2 * i}"}]} for i in range(24)]  # fmt: skip
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["pad", "pack"])
def test_two_ranks_take_the_steps_of_one_process_with_twice_the_batch(tmp_path, base_and_chats, batching):
    args = ["-m", "dozero", "finetune", "--model", str(base_and_chats / "base"), "--data",
            str(base_and_chats / "chats.jsonl"), "--batching", batching, *COMMON]  # fmt: skip
    _launch([*args, "--micro-batch-size", "4", "--out-dir", str(tmp_path / "one")], None)
    _launch(
        [*args, "--micro-batch-size", "2", "--out-dir", str(tmp_path / "two")], 29564 if batching == "pad" else 29565
    )
    _same_steps(tmp_path / "one", tmp_path / "two", ())
    assert (tmp_path / "two" / "latest").is_dir()  # rank 0 wrote
