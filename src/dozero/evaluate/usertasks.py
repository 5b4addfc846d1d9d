"""Your own tasks: a .jsonl file, one question per line, given to --tasks like a built-in name.

Multiple choice (scored by log-likelihood, acc and acc_norm, like the built-in tasks):

    {"question": "Qual é a capital do Brasil?", "choices": ["Brasília", "Rio de Janeiro", "São Paulo"], "answer": 0}

  question  the text before the answer (write "Pergunta: ...\\nResposta:" if you want that format)
  choices   the answers to compare; each is scored as " " + choice after the question
  answer    index of the right choice (0 = first), or the right choice's text

Generate and check (the model writes up to max_new_tokens greedily, stopping at a stop string):

    {"prompt": "Pergunta: Quanto é 7 x 6?\\nResposta:", "answer": "42"}

  prompt    the text the model continues
  answer    the expected answer
  check     "number" (default when answer is a number: the last number written must equal it),
            "exact" (the completion, trimmed, equals answer) or "contains" (answer appears in it)
  stop      optional list of stop strings (default ["\\n"])

A file holds one kind; the first line decides which. Errors name the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from dozero.errors import DozeroError
from dozero.evaluate import metrics
from dozero.evaluate.generative import GenerativeTask, GenItem
from dozero.evaluate.tasks import ChoiceTask, Example

CHOICE_FIELDS = ("question", "choices", "answer")
GENERATE_FIELDS = ("prompt", "answer")
CHECKS = ("number", "exact", "contains")


def read_lines(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DozeroError(f"task file {path} not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DozeroError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DozeroError(f"{path} line {number}: expected a JSON object {{...}}, found {type(obj).__name__}")
        out.append((number, obj))
    if not out:
        raise DozeroError(f"{path} holds no questions (one JSON object per line)")
    return out


def _require(path, number, obj, fields, kind):
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DozeroError(
            f"{path} line {number}: missing field '{missing[0]}' (a {kind} line needs {', '.join(fields)})"
        )


def choice_example(path, number, obj) -> Example:
    _require(path, number, obj, CHOICE_FIELDS, "multiple-choice")
    question, choices, answer = obj["question"], obj["choices"], obj["answer"]
    if not isinstance(question, str):
        raise DozeroError(f"{path} line {number}: 'question' should be text")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DozeroError(f"{path} line {number}: 'choices' should be a list of at least two non-empty texts")
    if isinstance(answer, str) and not isinstance(answer, bool):
        if answer not in choices:
            raise DozeroError(f"{path} line {number}: 'answer' {answer!r} is not one of the choices")
        answer = choices.index(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DozeroError(
            f"{path} line {number}: 'answer' should be a choice's index 0..{len(choices) - 1} or its text"
        )
    return Example(question, choices, answer)


def generate_item(path, number, obj) -> tuple[GenItem, tuple[str, ...]]:
    _require(path, number, obj, GENERATE_FIELDS, "generate-and-check")
    if not isinstance(obj["prompt"], str) or not obj["prompt"]:
        raise DozeroError(f"{path} line {number}: 'prompt' should be non-empty text")
    answer = str(obj["answer"])
    check = obj.get("check", "number" if metrics.final_number(answer) == answer.strip() else "exact")
    if check not in CHECKS:
        raise DozeroError(f"{path} line {number}: 'check' should be one of {', '.join(CHECKS)}, got {check!r}")
    stop = obj.get("stop", ["\n"])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise DozeroError(f"{path} line {number}: 'stop' should be a list of non-empty texts")
    return GenItem(obj["prompt"], (answer, check)), tuple(stop)


def check_answer(completion: str, answer: str, check: str) -> float:
    if check == "number":
        return metrics.exact_match(metrics.final_number(completion), metrics.final_number(answer))
    if check == "contains":
        return float(answer.strip() in completion)
    return float(completion.strip() == answer.strip())


def load_user_task(spec: str):
    """A ChoiceTask or GenerativeTask from a .jsonl file (module docstring)."""
    path = Path(spec)
    lines = read_lines(path)
    name = path.stem
    if "choices" in lines[0][1]:
        examples = [choice_example(path, n, obj) for n, obj in lines]
        return ChoiceTask(name, None, (), lambda ex: ex, fixed_examples=tuple(examples))
    parsed = [generate_item(path, n, obj) for n, obj in lines]
    stops = {s for _, s in parsed}
    if len(stops) > 1:
        raise DozeroError(f"{path}: every line should have the same 'stop' (it is set once per task)")
    items = [it for it, _ in parsed]

    def check(items, completions):
        return [check_answer(c, *it.reference) for it, c in zip(items, completions, strict=True)]

    return GenerativeTask(name, None, lambda: items, check, "exact_match", stop=stops.pop(), max_new_tokens=64)
