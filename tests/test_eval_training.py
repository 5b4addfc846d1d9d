"""`dozero train --eval-tasks`: benchmarks scored at every evaluation, equal to `dozero eval` on the checkpoint."""

from __future__ import annotations

import json

import pytest

from dozero.cli import main
from dozero.errors import DozeroError
from dozero.train.config import TrainConfig
from dozero.train.loop import train

# Only characters of tiny Shakespeare: the run's character vocabulary has to read them.
QUESTIONS = [
    {"question": "the king of", "choices": ["france", "zzzz qqq", "the the the"], "answer": 0},
    {"question": "my lord, I", "choices": ["am", "xq", "kkk jjj"], "answer": 0},
    {"question": "what say", "choices": ["you", "vvv", "zq zq"], "answer": 0},
    {"question": "good", "choices": ["morrow", "qqxx", "jz"], "answer": 1},
    {"question": "ROMEO:", "choices": ["O, she", "zzz", "qjx q"], "answer": 2},
]


def tiny_train_args(tmp_path, *extra):
    return [
        "train",
        *("--out-dir", str(tmp_path / "run"), "--max-steps", "6", "--eval-interval", "3", "--eval-iters", "1"),
        *("--micro-batch-size", "4", "--n-layers", "2", "--emb-dim", "32", "--n-heads", "2"),
        *("--context-length", "32", "--sample-tokens", "0", "--tensorboard", "off", "--threads", "1"),
        *("--warmup-steps", "1", "--lr", "1e-2", "--min-lr", "1e-3", "--log-interval", "3"),
        *extra,
    ]


@pytest.mark.slow
def test_train_eval_tasks_equal_dozero_eval_on_the_checkpoint(tmp_path, capsys):
    task = tmp_path / "mine.jsonl"
    task.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    assert main(tiny_train_args(tmp_path, "--eval-tasks", str(task), "--eval-limit", "4")) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in scored] == [3, 6]  # at every evaluation
    last = scored[-1]
    assert set(last) == {"step", "eval/mine/acc", "eval/mine/acc_norm"}
    assert all(0 <= v <= 1 for r in scored for k, v in r.items() if k != "step")
    assert "eval/mine/acc_norm" in (run / "report.md").read_text()

    assert (
        main(["eval", "--model", str(run), "--tasks", str(task), "--limit", "4", "--out", str(tmp_path / "e.json")])
        == 0
    )
    report = json.loads((tmp_path / "e.json").read_text())
    (result,) = report["results"]
    assert result["n"] == 4
    for metric in ("acc", "acc_norm"):
        assert last[f"eval/mine/{metric}"] == pytest.approx(result["metrics"][metric]["score"], abs=1e-12)
    # The scores are the checkpoint's, not chance: the per-question log-likelihoods decide them.
    assert any(s["logprobs"][0] != s["logprobs"][1] for s in result["samples"])


def test_eval_tasks_without_the_evaluation_stage_is_one_clear_error(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, eval_tasks="hellaswag")
    with pytest.raises(DozeroError, match="benchmark_hooks"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_task_the_tokenizer_cannot_read_fails_before_the_first_step(tmp_path, capsys):
    task = tmp_path / "greek.jsonl"
    task.write_text(json.dumps({"question": "αβγ", "choices": ["δ", "ε"], "answer": 0}) + "\n")
    assert main(tiny_train_args(tmp_path, "--eval-tasks", str(task))) == 2
    assert "not in this character vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
