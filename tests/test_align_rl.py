"""GRPO-style RL (dozero.align.rl): advantages equal DeepSeekMath's formula on hand-made groups, the loss's
KL term, pass@k, a toy that RL must solve (end every answer with "!"), and a failing reward skipped and counted."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch

from dozero.align.rewards import ends_with, load_reward, number, read_prompts
from dozero.align.rl import RL_DEFAULTS, RLConfig, group_advantages, grpo_loss, pass_at, rl
from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.model.checkpoint import save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import CharTokenizer

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def test_advantages_equal_deepseekmath_formula():
    groups = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.2, 0.9, 0.1], [3.0, 3.0, 3.0, 3.0]]
    ours = group_advantages(torch.tensor(groups).flatten(), 4, eps=0.0 + 1e-12).view(3, 4)
    for g, row in zip(groups[:2], ours[:2], strict=True):  # A_i = (r_i - mean(r)) / std(r)   (DeepSeekMath 4.1.2)
        mean, std = statistics.mean(g), statistics.stdev(g)
        assert torch.allclose(row, torch.tensor([(r - mean) / std for r in g]), atol=1e-6)
    assert torch.equal(ours[2], torch.zeros(4))  # equal rewards: no signal
    assert abs(float(group_advantages(torch.tensor([1.0, 0.0]), 2)[0]) - 0.5 / (math.sqrt(0.5) + 1e-4)) < 1e-6


def test_grpo_loss_is_the_policy_gradient_plus_a_positive_kl():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    A = torch.tensor([1.0, -1.0])
    loss, kl = grpo_loss(logps, logps.detach(), logps.detach(), A, mask, 0.2, 0.1)
    assert abs(float(loss.detach())) < 1e-7 and float(kl) == 0.0  # ratio 1, policy = reference: -mean(A) = 0
    loss.backward()  # d/dlogp of -A * ratio, per answer averaged over its tokens, then over answers
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, -0.25], [0.5, 0.0]]))
    ref = logps.detach() - 0.3
    _, kl = grpo_loss(logps, logps.detach(), ref, A, mask, 0.2, 0.1)
    assert abs(float(kl) - (math.exp(-0.3) + 0.3 - 1)) < 1e-6


def test_pass_at_k():
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    assert pass_at(rewards, 4, 1.0) == pytest.approx((5 / 12, 2 / 3))


def test_builtin_rewards_and_prompt_files(tmp_path):
    assert number("", "so it is 1,024.", {"answer": "1024"}) == 1.0 and number("", "12", {"answer": 13}) == 0.0
    assert ends_with("ok")("", "that is ok!", {}) == 1.0 and ends_with("ok")("", "okay", {}) == 0.0
    assert load_reward("ends_with:yes")("", "yes", {}) == 1.0
    with pytest.raises(DozeroError, match="not one of"):
        load_reward("nonsense")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": 4}\n\n{"prompt": ""}\n')
    with pytest.raises(DozeroError, match="p.jsonl:3: needs a non-empty"):
        read_prompts(path)


@pytest.fixture()
def toy(tmp_path):
    """A tiny character model with a plain template, and prompts of random letters."""
    torch.manual_seed(0)
    chars = CharTokenizer.from_text("abcdefghij:! \nusertan")
    cfg = ModelConfig(vocab_size=chars.vocab_size, context_length=40, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    save_model(GPTModel(cfg), tmp_path / "base", tokenizer=chars, metadata={"chat_template": PLAIN_TEMPLATE})
    letters = "abcdefghij"
    records = [{"prompt": letters[i % 10] + letters[(3 * i) % 10] + letters[(7 * i + 1) % 10]} for i in range(24)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "base", str(tmp_path / "prompts.jsonl")


def rl_settings(tmp_path, **changes):
    base = dict(out_dir=str(tmp_path / "run"), max_steps=15, eval_interval=15, log_interval=5, tensorboard="off",
                device="cpu", lr=3e-2, min_lr=3e-2, threads=2)  # fmt: skip
    return dataclasses.replace(RL_DEFAULTS, **{**base, **changes})


def ends_with_bang(prompt, answer, record):
    return float(answer.endswith("!"))


@pytest.mark.slow
def test_rl_learns_to_end_every_answer_with_a_word(tmp_path, toy):
    base, data = toy
    s = RLConfig(model=str(base), data=data, lora_rank=0, group_size=8, prompts_per_step=4, max_new_tokens=4,
                 val_fraction=0.2, kl_coef=0.0)  # fmt: skip
    result = rl(s, rl_settings(tmp_path), quiet=True, reward_fn=ends_with_bang)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["mean_reward"] for r in records if "mean_reward" in r]
    assert len(rewards) == 15
    assert sum(rewards[:3]) / 3 < 0.3  # about 1 in 17 characters at the start
    assert sum(rewards[-5:]) / 5 > 0.8
    (held_out,) = [r for r in records if "val_accuracy" in r]
    assert held_out["val_accuracy"] == 1.0  # greedy answers to unseen prompts all end with "!"
    assert all("pass_at_k" in r and "kl" in r for r in records if "mean_reward" in r)


def test_a_failing_reward_skips_the_step_and_is_counted(tmp_path, toy):
    base, data = toy
    calls = {"n": 0}

    def flaky(prompt, answer, record):
        calls["n"] += 1
        if calls["n"] == 9:  # step 3's first answer (2 prompts x 2 answers per step)
            raise ValueError("the checker crashed")
        return math.nan if calls["n"] == 17 else 1.0  # step 5's last answer

    s = RLConfig(model=str(base), data=data, lora_rank=0, group_size=2, prompts_per_step=2, max_new_tokens=2)
    result = rl(s, rl_settings(tmp_path, max_steps=6, eval_interval=6, log_interval=1), quiet=True, reward_fn=flaky)
    assert result.step == 6 and result.stopped == "done"
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    errors = [r for r in records if "reward_errors" in r]
    assert [(r["step"], r["reward_errors"]) for r in errors] == [(3, 1), (5, 2)]
    assert "ValueError: the checker crashed" in errors[0]["reward_error"] and "nan" in errors[1]["reward_error"]
    assert [r["step"] for r in records if r.get("skipped")] == [3, 5]
    (held_out,) = [r for r in records if "val_loss" in r]  # minus the mean reward: no perplexity of it
    assert held_out["step"] == 6 and "val_perplexity" not in held_out


def test_self_made_pairs_keep_the_best_and_worst_answer(toy):
    from dozero.align.data import make_pairs
    from dozero.finetune.sft import load_base

    base, _ = toy
    model, tokenizer, template = load_base(str(base))
    prompts = ["abc", "def", "ghi", "jab", "cfi", "hed"]
    records = make_pairs(model, tokenizer, template, prompts, ends_with_bang, k=16, seed=0, max_new_tokens=2)
    assert records, "with 16 answers of 2 characters from 19, some prompt gets an answer ending in '!'"
    for r in records:
        assert r["prompt"] in prompts and r["chosen"].endswith("!") and not r["rejected"].endswith("!")
    same = make_pairs(model, tokenizer, template, prompts, lambda p, a, r: 1.0, k=4, max_new_tokens=2)
    assert same == []  # every answer scores the same: no preference


@pytest.mark.slow
def test_interrupted_rl_run_resumes_exactly(tmp_path, toy):
    base, data = toy
    s = RLConfig(model=str(base), data=data, lora_rank=4, lora_dropout=0.1, group_size=4, prompts_per_step=2,
                 max_new_tokens=3, kl_coef=0.1)  # fmt: skip
    small = dict(max_steps=4, eval_interval=4, log_interval=1)
    whole = rl(s, rl_settings(tmp_path / "a", **small), quiet=True, reward_fn=ends_with_bang)
    first = rl(s, rl_settings(tmp_path / "b", **small, stop_after=2), quiet=True, reward_fn=ends_with_bang)
    rest = rl(s, rl_settings(tmp_path / "b", **small), resume=first.run_dir, quiet=True, reward_fn=ends_with_bang)
    assert first.step == 2 and rest.step == 4
    assert {**first.losses, **rest.losses} == whole.losses  # same rollouts (seeded per step), same updates


def test_chunks_of_answers_take_the_same_steps_as_one_batch(tmp_path, toy):
    """--micro-batch-size splits the policy's forward and backward over the answers (uneven chunks of 3,
    3 and 2 here); the chunks' gradients add up to the whole batch's, so every step is the same."""
    base, data = toy
    s = RLConfig(model=str(base), data=data, lora_rank=0, group_size=4, prompts_per_step=2, max_new_tokens=3,
                 kl_coef=0.5)  # fmt: skip
    small = dict(max_steps=3, eval_interval=3, log_interval=1)

    def distinct(prompt, answer, record):  # differs between most answers: every step has advantages
        return float(len(set(answer)))

    runs = [rl(s, rl_settings(tmp_path / str(n), **small, micro_batch_size=n), quiet=True, reward_fn=distinct)
            for n in (8, 3)]  # fmt: skip
    whole, parts = ([json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()
                     if "kl" in line] for r in runs)  # fmt: skip
    assert [r["step"] for r in whole] == [r["step"] for r in parts] == [1, 2, 3]
    assert whole[0]["kl"] == 0.0 and whole[-1]["kl"] > 1e-4  # the policy has moved from the reference
    for a, b in zip(whole, parts, strict=True):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
        assert b["mean_reward"] == a["mean_reward"]  # the same rollouts
    for step, loss in runs[0].losses.items():
        assert runs[1].losses[step] == pytest.approx(loss, abs=1e-6)


def test_held_out_rollouts_after_a_fused_adamw_step_use_the_new_head(toy):
    """The held-out evaluation samples in eval mode, where the engine reuses its transposed copy of the
    output head while the weight's _version is unchanged; fused AdamW steps in place without bumping it.
    rollout() forgets the copy, so a full fine-tuning run never evaluates a stale head."""
    import copy

    from dozero.align.rollout import end_id, prompt_ids, rollout
    from dozero.finetune.sft import load_base
    from dozero.generate.config import GenerationConfig

    base, _ = toy
    model, tokenizer, template = load_base(str(base))
    prompts, end = [prompt_ids(tokenizer, template, p) for p in ("abc", "jih")], end_id(tokenizer, template)
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=6)
    model.eval()
    before = rollout(model, prompts, 1, greedy, end)  # leaves a cached head copy behind
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model(torch.tensor(prompts[:1]))[0, -1, tokenizer.encode("!")[0]].backward()  # push "!" up, hard
    version = model.out_head.weight._version
    optimizer.step()
    assert model.out_head.weight._version == version  # the step went unnoticed by _version
    after = rollout(model, prompts, 1, greedy, end)
    assert after == rollout(copy.deepcopy(model), prompts, 1, greedy, end) and after != before


def test_demo_data_holds_out_its_questions_and_checks_the_first_line(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "make_align_demo", Path(__file__).parents[1] / "scripts/make_align_demo.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--out", str(tmp_path), "--train", "40", "--heldout", "5"]) == 0
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    train, nxt, larger = read("rl.jsonl"), read("heldout_next.jsonl"), read("heldout_larger.jsonl")
    assert len(train) == 40 and len(nxt) == len(larger) == 5
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in nxt + larger}
    for r in train + nxt + larger:  # the answer is right
        numbers = [int(n) for n in r["prompt"].replace("?", " ").replace(",", " ").split() if n.isdigit()]
        assert r["answer"] == (numbers[0] + 1 if r["prompt"].startswith("What number") else max(numbers))
    record = {"answer": 42}
    assert demo.first_line_number("", "The number after 41 is 42.\n\nAlso 7", record) == 1.0
    assert demo.first_line_number("", "It is 41\n42", record) == 0.0  # what dozero eval reads: the first line


def test_prompts_longer_than_the_context_are_dropped_and_counted(tmp_path, toy):
    base, data = toy
    long = tmp_path / "long.jsonl"
    long.write_text(open(data).read() + json.dumps({"prompt": "abc" * 20}) + "\n")  # 60 letters > context 40
    s = RLConfig(model=str(base), data=str(long), lora_rank=0, group_size=2, prompts_per_step=2, max_new_tokens=2)
    result = rl(s, rl_settings(tmp_path, max_steps=1, eval_interval=1), quiet=True, reward_fn=ends_with_bang)
    assert "25 prompts (1 dropped as longer than the context)" in (result.run_dir / "report.md").read_text()
    only_long = tmp_path / "only_long.jsonl"
    only_long.write_text(json.dumps({"prompt": "abc" * 20}) + "\n")
    with pytest.raises(DozeroError, match="every prompt is longer than the context"):
        rl(dataclasses.replace(s, data=str(only_long)), rl_settings(tmp_path / "b"), reward_fn=ends_with_bang)
    assert not (tmp_path / "b").exists()
