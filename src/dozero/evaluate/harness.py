"""Run tasks over a model and collect a report card (a JSON-ready dict).

    from dozero.evaluate.harness import EvalConfig, evaluate_model
    report = evaluate_model(model, tokenizer, EvalConfig(tasks="hellaswag,arc_easy", limit=100))

Each multiple-choice task: examples -> prompts (tasks.py) -> (context, continuation) token pairs
(scoring.encode_pair) -> log-likelihoods (scoring.score_requests) -> acc / acc_norm (metrics.py).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

from dozero.errors import DozeroError
from dozero.evaluate import metrics
from dozero.evaluate.scoring import encode_pair, score_requests
from dozero.evaluate.tasks import ChoiceTask, build_prompts, get_task, load_examples, pick_shots


@dataclass
class EvalConfig:
    tasks: str = ""
    """Comma-separated task names (hellaswag, arc_easy, arc_challenge, piqa, winogrande, boolq, openbookqa,
    sciq, mmlu, mmlu_<subject>, gsm8k, humaneval) or .jsonl files of your own; name:N gives a task its own --limit."""
    limit: int | None = None
    """Score only the first N examples of each task (MMLU: of each subject); None = all. A task given as
    name:N (mmlu:2) takes its own N."""
    shots: int = 0
    """Solved examples put before each question (few-shot)."""
    seed: int = 1234
    """Seed of the few-shot draw (lm-eval's default, 1234)."""
    batch_tokens: int = 2048
    """Padded tokens per forward pass: larger is faster until memory runs short."""
    chat: bool = False
    """Wrap each question in the model's chat template (ChatML when the tokenizer has none)."""
    samples: bool = True
    """Keep every example's prompt, scores and prediction in the JSON report."""

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise DozeroError(f"--limit must be >= 1, got {self.limit}")
        if self.shots < 0:
            raise DozeroError(f"--shots must be >= 0, got {self.shots}")
        if self.batch_tokens < 1:
            raise DozeroError(f"--batch-tokens must be >= 1, got {self.batch_tokens}")


def resolve_task(name: str):
    if name.endswith(".jsonl"):
        from dozero.evaluate.usertasks import load_user_task

        return load_user_task(name)
    return get_task(name)


def task_plan(spec: str, limit: int | None) -> list[tuple[object, int | None]]:
    """(task, how many questions) for each name of `spec`. A name may carry its own limit, `mmlu:2`
    (2 per subject) beside `--limit 100` for the rest: one command for tasks of very different sizes."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise DozeroError("--tasks is empty: give task names separated by commas, e.g. hellaswag,arc_easy")
    plan = []
    for name in names:
        own = limit
        head, _, tail = name.rpartition(":")
        if head and tail.strip().lstrip("-").isdigit():
            name, own = head.strip(), int(tail)
            if own < 1:
                raise DozeroError(f"--tasks {name}:{own}: a task's limit must be >= 1")
        plan.append((resolve_task(name), own))
    return plan


def task_list(spec: str) -> list:
    return [task for task, _ in task_plan(spec, None)]


@dataclass
class Prepared:
    """A multiple-choice task's questions as token pairs: built once, scored as often as wanted."""

    task: ChoiceTask
    examples: list
    """[(Example, its few-shot pool)]"""
    requests: list[tuple[list[int], list[int]]]
    """(context ids, continuation ids), every choice of every question in order."""
    spans: list[tuple[int, int]]
    """Per question: (index of its first request, number of choices)."""
    prompts: list[list[tuple[str, str]]]
    """Per question: the (context, continuation) texts."""


def prepare_choices(tokenizer, task, examples, config: EvalConfig, first_n: bool) -> Prepared:
    """Prompts (with few-shot examples and --chat) and their token ids for `examples` [(Example, pool)]."""
    from dozero.evaluate.chat import wrap_chat

    rng = random.Random(config.seed)
    requests, spans, prompts = [], [], []
    for ex, pool in examples:
        pairs = build_prompts(ex, pick_shots(pool, config.shots, rng, first_n))
        if config.chat:
            pairs = wrap_chat(tokenizer, pairs)
        spans.append((len(requests), len(pairs)))
        prompts.append(pairs)
        requests += [encode_pair(tokenizer, c, x) for c, x in pairs]
    return Prepared(task, examples, requests, spans, prompts)


def score_choices(model, prepared: Prepared, config: EvalConfig, progress: bool = True) -> dict:
    """Score prepared questions and summarize them (a report-card entry)."""
    task, examples, spans = prepared.task, prepared.examples, prepared.spans
    start = time.perf_counter()
    share = [1 / n for _, n in spans for _ in range(n)]
    title = task.name if progress else None
    scores = score_requests(model, prepared.requests, config.batch_tokens, progress=title, share=share)
    seconds = time.perf_counter() - start
    per_metric: dict[str, list[float]] = {m: [] for m in task.metrics}
    samples = []
    for (ex, _), (first, n), pairs in zip(examples, spans, prepared.prompts, strict=True):
        lls = scores.logprobs[first : first + n]
        got = metrics.choice_metrics(lls, ex.gold, ex.choices)
        for m in task.metrics:
            per_metric[m].append(got[m])
        if config.samples:
            samples.append({"context": pairs[0][0], "choices": ex.choices, "gold": ex.gold, "logprobs": lls, **got})
    chance = metrics.mean([1 / len(ex.choices) for ex, _ in examples])  # guessing: 1 / choices, on average
    return summarize(task, per_metric, chance, scores.truncated, seconds, samples)


def evaluate_choices(model, tokenizer, task, examples, config: EvalConfig, first_n: bool) -> dict:
    """Score multiple-choice `examples` [(Example, few-shot pool)] and summarize them."""
    return score_choices(model, prepare_choices(tokenizer, task, examples, config, first_n), config)


def summarize(task, per_metric: dict[str, list[float]], chance: float, truncated: int, seconds: float, samples) -> dict:
    """A report-card entry: mean and stderr of each metric over the items, and what chance would score."""
    n = len(next(iter(per_metric.values())))
    return {
        "task": task.name,
        "reproduces": task.reproduces,
        "n": n,
        "metrics": {
            m: {"score": metrics.mean(v), "stderr": metrics.mean_stderr(v), "higher_is_better": True}
            for m, v in per_metric.items()
        },
        "random": {m: chance for m in per_metric},
        "truncated": truncated,
        "seconds": seconds,
        "items_per_second": n / seconds if seconds > 0 else None,
        "note": getattr(task, "note", ""),
        "samples": samples,
    }


def prepare_task(tokenizer, task: ChoiceTask, config: EvalConfig) -> Prepared:
    """The first `config.limit` questions of a multiple-choice task, as token pairs."""
    examples = load_examples(task, config.limit)
    return prepare_choices(tokenizer, task, examples, config, first_n=task.fewshot_split is not None)


def evaluate_task(model, tokenizer, task, config: EvalConfig) -> dict:
    if isinstance(task, ChoiceTask):
        return score_choices(model, prepare_task(tokenizer, task, config), config)
    return task.evaluate(model, tokenizer, config)


def evaluate_model(model, tokenizer, config: EvalConfig, text: str | None = None, max_text_tokens=None) -> dict:
    """The report card: one entry per task (and one for `text`'s perplexity)."""
    import datetime

    from dozero import __version__

    plan = task_plan(config.tasks, config.limit) if config.tasks else []
    results = []
    if text is not None:
        from dozero.evaluate.perplexity import evaluate_text

        results.append(evaluate_text(model, tokenizer, text, max_text_tokens))
    for task, limit in plan:
        results.append(evaluate_task(model, tokenizer, task, dataclasses.replace(config, limit=limit)))
    return {
        "format": "dozero-eval",
        "format_version": 1,
        "dozero_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: getattr(config, k) for k in ("tasks", "limit", "shots", "seed", "chat")},
        "results": results,
    }
