"""Make the alignment demo's data: two small number tasks with a checkable answer, and self-made pairs.

    python scripts/make_align_demo.py --out demo/align
      rl.jsonl            {"prompt", "answer"}: training prompts for `dozero align rl --reward number`
      heldout_next.jsonl  {"prompt", "answer", "check": "number"}: a `dozero eval --chat --tasks` file
      heldout_larger.jsonl  the same for the other task; no held-out question appears in rl.jsonl
    python scripts/make_align_demo.py --out demo/align --pairs-from smollm2-135m-instruct
      pairs.jsonl         {"prompt", "chosen", "rejected"}: k answers sampled from the model for each
                          training prompt; "chosen" is a clean right answer (`clean_answer` scores it
                          1: the number alone, or a short sentence ending "is <number>."), "rejected"
                          the worst of the others (wrong if one is, else rambling); the same number
                          of pairs for each task (for `align dpo`)

The two tasks (procedural, as reasoning-gym's, with the answer known):
    next    "What number comes after 199? Answer with the number only."    -> 200
    larger  "Which is larger, 17 or 63? Answer with the number only."      -> 63
The check is the one `dozero eval` applies to a task whose answer is a number: the last number of the
first line of the answer. SmolLM2-135M-Instruct knows how to count and compare, but often rambles
("To find the number that comes after 41, we need to...") or names the wrong number: a thing RL from
a verifiable reward can fix in a few dozen steps on a CPU. (Its two-number additions are beyond it:
"3 + 9 = 22"; an earlier version of this demo used them and RL had nothing to pull up.)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

TASKS = {
    "next": "What number comes after {a}? Answer with the number only.",
    "larger": "Which is larger, {a} or {b}? Answer with the number only.",
}


def question(task: str, rng: random.Random) -> dict:
    """One procedural question with its answer."""
    if task == "next":
        a = rng.randint(1, 498)  # up to three digits, so carries (199 -> 200) come up
        return {"prompt": TASKS[task].format(a=a), "answer": a + 1}
    a, b = rng.sample(range(1, 100), 2)
    return {"prompt": TASKS[task].format(a=a, b=b), "answer": max(a, b)}


def first_line_number(prompt: str, answer: str, record: dict) -> float:
    """The reward: 1.0 when the last number of the answer's first line is the record's answer (what
    `dozero eval`'s "number" check reads, as it stops at the first newline)."""
    from dozero.align.rewards import number

    return number(prompt, answer.strip().split("\n")[0], record)


def clean_answer(prompt: str, answer: str, record: dict) -> float:
    """The stricter score the pairs are chosen by: 1.0 for a clean right answer, one line that is the
    number alone or a short sentence that begins with a word and ends "is <number>." ("434", "The
    number after 433 is 434."); 0.5 for an answer the held-out check counts right that is not clean
    ("38 is 91." and "14 is not a multiple of 39." end in the larger number by luck; "To find the
    number after 433, ... 434" rambles); 0.0 otherwise. A pair's chosen answer must score 1.0, so
    DPO is never taught a lucky or rambling shape."""
    text, want = answer.strip(), record["answer"]
    clean = re.fullmatch(rf"(?:[A-Za-z][^\n]{{0,60}}\bis:?\s+)?{want}\.?", text)  # begins with a word
    if clean and not re.search(r"\bnot\b|n't", text):
        return 1.0
    return 0.5 * first_line_number(prompt, answer, record)


def make_questions(n: int, rng: random.Random, seen: set) -> list[dict]:
    """`n` distinct questions, alternating tasks, none in `seen` (which they are added to)."""
    out = []
    for _ in range(100 * n):  # bounded: a task has only so many distinct questions
        if len(out) == n:
            break
        q = question(list(TASKS)[len(out) % len(TASKS)], rng)
        if q["prompt"] not in seen:
            seen.add(q["prompt"])
            out.append(q)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct questions could be drawn; ask for fewer")
    return out


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def task_of(prompt: str) -> str:
    return "next" if prompt.startswith("What number") else "larger"


def self_made_pairs(model_spec: str, prompts: list[dict], k: int, seed: int, **sampling) -> list[dict]:
    """k sampled answers per prompt from the model; chosen a clean right answer (`clean_answer` 1.0),
    rejected the worst of the rest (align.data.make_pairs); then as many pairs of each task."""
    import torch

    from dozero.align.data import make_pairs
    from dozero.finetune.sft import load_base

    torch.manual_seed(seed)
    model, tokenizer, template = load_base(model_spec)
    by_prompt = {q["prompt"]: q for q in prompts}
    reward = lambda prompt, answer, record: clean_answer(prompt, answer, by_prompt[prompt])  # noqa: E731
    pairs = []
    for start in range(0, len(prompts), 16):  # 16 prompts x k answers per batch: small steps, visible progress
        chunk = [q["prompt"] for q in prompts[start : start + 16]]
        pairs += make_pairs(model, tokenizer, template, chunk, reward, k=k, seed=seed + start, min_chosen=1.0,
                            **sampling)  # fmt: skip
        print(f"  {start + len(chunk)}/{len(prompts)} prompts sampled, {len(pairs)} pairs", file=sys.stderr)
    by_task = {task: [r for r in pairs if task_of(r["prompt"]) == task] for task in TASKS}
    n = min(len(records) for records in by_task.values())  # balanced: DPO must not learn one task's shape
    print(
        f"  pairs per task: {', '.join(f'{t} {len(r)}' for t, r in by_task.items())}; {n} of each kept", file=sys.stderr
    )
    return [r for group in zip(*(records[:n] for records in by_task.values()), strict=True) for r in group]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo/align", help="output folder (default: demo/align)")
    p.add_argument("--train", type=int, default=200, help="training questions (default: 200)")
    p.add_argument("--heldout", type=int, default=25, help="held-out questions per task (default: 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs-from", metavar="MODEL", help="also sample pairs.jsonl from this model")
    p.add_argument("--pairs-prompts", type=int, default=96, help="training prompts sampled for pairs (default: 96)")
    p.add_argument("--k", type=int, default=6, help="answers sampled per prompt for pairs (default: 6)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest sampled answer (default: 16)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for pairs (default: 0.7)")
    args = p.parse_args(argv)
    rng, seen = random.Random(args.seed), set()
    heldout = {task: [] for task in TASKS}
    for q in make_questions(args.heldout * len(TASKS), rng, seen):  # drawn first: the training set avoids them
        heldout[task_of(q["prompt"])].append({**q, "check": "number"})
    train = make_questions(args.train, rng, seen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "rl.jsonl", train)
    for task, records in heldout.items():
        write(out / f"heldout_{task}.jsonl", records)
    print(f"wrote {out}/rl.jsonl ({len(train)}) and heldout_{{{','.join(TASKS)}}}.jsonl ({args.heldout} each)")
    if args.pairs_from:
        sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        pairs = self_made_pairs(args.pairs_from, train[: args.pairs_prompts], args.k, args.seed, **sampling)
        write(out / "pairs.jsonl", pairs)
        print(f"wrote {out}/pairs.jsonl: {len(pairs)} pairs from {args.pairs_prompts} prompts x {args.k} answers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
