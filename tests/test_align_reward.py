"""Reward model (dozero.align.reward): Bradley-Terry on pairs, held-out accuracy, exact resume, and the
trained model as the reward function of `align rl` (the RLHF path)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dozero.align.reward import REWARD_DEFAULTS, RewardConfig, load_reward_model, train_reward
from dozero.align.rewards import load_reward
from dozero.errors import DozeroError
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import gpt2
from test_align_dpo import TINY, write_jsonl


@pytest.fixture()
def base_and_pairs(tmp_path):
    torch.manual_seed(0)
    save_model(GPTModel(TINY), tmp_path / "base", tokenizer=gpt2())
    topics = [
        "the sea",
        "a cat",
        "bread",
        "rain",
        "music",
        "a tree",
        "the moon",
        "tea",
        "snow",
        "a dog",
        "fire",
        "salt",
    ]
    records = [
        {"prompt": f"Tell me about {t}.", "chosen": f"Thank you, {t} is lovely.", "rejected": f"No. {t}? Go away."}
        for t in topics
    ]
    return tmp_path / "base", write_jsonl(tmp_path / "pairs.jsonl", records)


def settings(tmp_path, **changes):
    base = dict(out_dir=str(tmp_path / "run"), micro_batch_size=4, max_steps=8, eval_interval=4, warmup_steps=1,
                log_interval=1, tensorboard="off", device="cpu", lr=1e-2)  # fmt: skip
    return dataclasses.replace(REWARD_DEFAULTS, **{**base, **changes})


@pytest.mark.slow
def test_reward_model_learns_the_preference_and_resumes_exactly(tmp_path, base_and_pairs):
    base, data = base_and_pairs
    s = RewardConfig(model=str(base), data=data, lora_rank=0, val_fraction=0.25)
    whole = train_reward(s, settings(tmp_path / "a"), quiet=True)
    first = train_reward(s, settings(tmp_path / "b", stop_after=4), quiet=True)
    rest = train_reward(s, settings(tmp_path / "b"), resume=first.run_dir, quiet=True)
    assert {**first.losses, **rest.losses} == whole.losses  # bit-exact: body, head, optimizer, loader
    assert whole.losses[8] < whole.losses[1]
    records = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in records if "val_accuracy" in r][-1] == 1.0  # held-out pairs
    load_model(whole.run_dir)  # the checkpoint is also an ordinary language model
    score = load_reward(str(whole.run_dir))
    record = {"messages": [{"role": "user", "content": "Tell me about stars."}]}
    assert score("", "Thank you, stars is lovely.", record) > score("", "No. stars? Go away.", record)
    model, _, _ = load_reward_model(whole.run_dir)
    assert model.head.weight.shape == (1, TINY.emb_dim)


def test_a_language_model_is_not_a_reward_model(tmp_path, base_and_pairs):
    base, _ = base_and_pairs
    with pytest.raises(DozeroError, match="is not a reward model"):
        load_reward_model(base)
