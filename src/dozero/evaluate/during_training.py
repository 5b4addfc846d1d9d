"""Benchmarks inside a training run: `dozero train --eval-tasks hellaswag,arc_easy --eval-limit 50`.

At every evaluation of the run (every --eval-interval steps, and at the end) the first --eval-limit
questions of each task are scored as `dozero eval` scores them, and the scores go into
metrics.jsonl and TensorBoard as eval/<task>/<metric> (e.g. eval/hellaswag/acc_norm) and into
report.md. The same questions every time, so the curve shows the model, not the sample.

The training loop knows nothing of benchmarks (train comes before evaluate in the pipeline): it
takes `hooks`, callables (model, tokenizer, step) -> {name: number}, and `dozero.cli` hands it
`benchmark_hooks`, which builds them from the run's settings.

    from dozero.evaluate.during_training import benchmark_hooks
    train(cfg, hooks=benchmark_hooks)          # cfg.eval_tasks = "hellaswag", cfg.eval_limit = 50
"""

from __future__ import annotations

from dozero.evaluate.harness import EvalConfig, Prepared, prepare_task, score_choices, task_plan
from dozero.evaluate.tasks import ChoiceTask


class BenchmarkHook:
    """Scores a fixed set of questions; multiple-choice questions are tokenized once, at the start."""

    def __init__(self, tasks: str, limit: int, tokenizer):
        # Tokenizing now fails before the first training step on a text the tokenizer cannot read
        # (a character vocabulary meets a character it never saw), not at the first evaluation.
        self.prepared = []
        for task, own in task_plan(tasks, limit):  # hellaswag:200 keeps its own limit
            config = EvalConfig(tasks=tasks, limit=own, samples=False)
            item = prepare_task(tokenizer, task, config) if isinstance(task, ChoiceTask) else task
            self.prepared.append((item, config))

    def __call__(self, model, tokenizer, step: int) -> dict[str, float]:
        out = {}
        for item, config in self.prepared:
            if isinstance(item, Prepared):
                result = score_choices(model, item, config, progress=False)
            else:  # generative: GSM8K, HumanEval, a generate-and-check .jsonl
                result = item.evaluate(model, tokenizer, config)
            for metric, value in result["metrics"].items():
                out[f"eval/{result['task']}/{metric}"] = value["score"]
        return out


def benchmark_hooks(cfg, tokenizer) -> list[BenchmarkHook]:
    """The hooks a TrainConfig asks for: one scoring cfg.eval_tasks, or none."""
    if not cfg.eval_tasks:
        return []
    return [BenchmarkHook(cfg.eval_tasks, cfg.eval_limit, tokenizer)]
