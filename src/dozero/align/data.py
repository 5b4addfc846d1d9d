"""Preference data: JSONL pairs -> (chosen, rejected) token ids with answer-only masks -> padded batches.

One JSON object per line (blank lines skipped), TRL's "prompt / chosen / rejected" format:

    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "chosen": "...", "rejected": "..."}

Each answer is rendered as the last assistant turn of the conversation with the model's chat template
(dozero.finetune.chat), and only that answer's tokens (and its end-of-turn token) are scored. Every
line is checked and an error names the file and line: an empty answer, or chosen equal to rejected
(the pair teaches nothing and its DPO gradient is exactly zero), is a data bug, not something to
skip silently. A pair longer than the context is dropped and counted (cutting it could cut away
the very tokens where chosen and rejected differ).

`make_pairs` builds such records from the model itself: k sampled answers per prompt, scored by a
reward function, best and worst kept (self-made preferences, as in RLAIF / online DPO).

Legend: P pairs in a batch, L the longest sequence in the batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dozero.errors import DozeroError
from dozero.finetune.chat import check_messages, render
from dozero.finetune.data import SFTLoader, collate


@dataclass
class PairStats:
    pairs: int = 0
    dropped: int = 0
    """Longer than the context: dropped."""
    tokens: int = 0

    def describe(self) -> str:
        return f"{self.pairs} pairs, {self.tokens:,} tokens; {self.dropped} dropped as longer than the context"


def parse_pair(obj, where: str) -> tuple[list[dict], str, str]:
    """One JSONL record -> (prompt messages, chosen answer, rejected answer)."""
    if not isinstance(obj, dict):
        raise DozeroError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        messages = check_messages(obj["messages"], where)
    elif isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise DozeroError(f'{where}: needs "prompt" (a string) or "messages" (a list); keys found: {sorted(obj)[:6]}')
    answers = []
    for key in ("chosen", "rejected"):
        value = obj.get(key)
        if not isinstance(value, str):
            raise DozeroError(f'{where}: "{key}" should be a string (the answer), found {type(value).__name__}')
        if not value.strip():
            raise DozeroError(f'{where}: "{key}" is empty; every pair needs two non-empty answers')
        answers.append(value)
    if answers[0] == answers[1]:
        raise DozeroError(
            f'{where}: "chosen" and "rejected" are the same text: the pair teaches nothing; fix or drop it'
        )
    return messages, answers[0], answers[1]


def read_pairs(path: str | Path) -> list[tuple[list[dict], str, str]]:
    """Every pair in a JSONL file, each line validated."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DozeroError(f"--data {path}: no such file (give a .jsonl of prompt/chosen/rejected records)")
    pairs = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DozeroError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                pairs.append(parse_pair(obj, f"{path}:{n}"))
        except UnicodeDecodeError as e:
            raise DozeroError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if not pairs:
        raise DozeroError(f"--data {path}: the file holds no pairs")
    return pairs


def render_answer(tokenizer, messages: list[dict], answer: str, template: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of the conversation ending with `answer`; the mask is 1 on that answer only (earlier
    assistant turns in `messages` are context here, not scored)."""
    prompt_ids, _ = render(tokenizer, messages, template, add_generation_prompt=True)
    ids, mask = render(tokenizer, messages + [{"role": "assistant", "content": answer}], template)
    return ids, [m if i >= len(prompt_ids) else 0 for i, m in enumerate(mask)]


def tokenize_pairs(pairs, tokenizer, template: str, max_tokens: int):
    """(examples, stats): each pair as ((chosen ids, mask), (rejected ids, mask)), both at most
    `max_tokens` ids (the context + 1); longer pairs are dropped and counted."""
    stats, examples = PairStats(), []
    for messages, chosen, rejected in pairs:
        both = (
            render_answer(tokenizer, messages, chosen, template),
            render_answer(tokenizer, messages, rejected, template),
        )
        if max(len(ids) for ids, _ in both) > max_tokens:
            stats.dropped += 1
            continue
        stats.pairs += 1
        stats.tokens += sum(len(ids) for ids, _ in both)
        examples.append(both)
    if not examples:
        raise DozeroError(f"no pair is left ({stats.describe()}); use shorter pairs or a model with a longer context")
    return examples, stats


def collate_pairs(batch: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (2P, L-1): the P chosen sequences, then the P rejected ones, targets masked to the answers."""
    return collate([c for c, _ in batch] + [r for _, r in batch], pad_id)


class PairLoader(SFTLoader):
    """SFTLoader's order and exact-resume position over pairs; a batch is (x, y, index of each pair)
    so the loss can look up the pair's precomputed reference log-probs."""

    def next_batch(self):
        order = self._order()
        start = (self.index * self.world_size + self.rank) * self.batch_size
        if start >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order, start = self._order(), self.rank * self.batch_size
        picked = (order * 2)[start : start + self.batch_size]  # wraps at the end
        self.index += 1
        x, y = collate_pairs([self.examples[i] for i in picked], self.pad_id)
        return x, y, torch.tensor(picked)


def pick_pair(
    prompt: str, answers: list[str], reward_fn, min_chosen: float | None = None, max_rejected: float | None = None
) -> dict | None:
    """The preference record for one prompt's answers, or None: the best-scoring answer is chosen and
    the worst rejected. A score only ranks answers; `min_chosen` and `max_rejected` say what is good
    and bad enough to teach. Without them the best of k wrong answers becomes "chosen" whenever it
    scores a little higher, and DPO learns whatever made it score (in the alignment demo: a rambling
    sentence that happened to end in the right number). An answer whose reward raises, is not finite
    or is blank is left out."""
    scored = []
    for answer in answers:
        try:
            score = float(reward_fn(prompt, answer, {"prompt": prompt}))
        except Exception:  # a reward that fails on one answer only loses that answer
            continue
        if math.isfinite(score) and answer.strip():
            scored.append((score, answer))
    if len(scored) < 2:
        return None
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    if best[0] <= worst[0] or best[1] == worst[1]:
        return None  # no preference to learn
    if (min_chosen is not None and best[0] < min_chosen) or (max_rejected is not None and worst[0] > max_rejected):
        return None
    return {"prompt": prompt, "chosen": best[1], "rejected": worst[1]}


def make_pairs(
    model,
    tokenizer,
    template: str,
    prompts: list[str],
    reward_fn,
    k: int = 4,
    seed: int = 0,
    min_chosen: float | None = None,
    max_rejected: float | None = None,
    **sampling,
):
    """Self-made preference records: k sampled answers per prompt, scored by `reward_fn(prompt, answer,
    record)` (the signature of align/rewards.py; record is {"prompt": prompt}), kept by `pick_pair`
    (best and worst, each past its threshold when one is given). Prompts whose answers all score the
    same (or whose best and worst texts are equal) give no pair: there is no preference to learn."""
    from dozero.align.rollout import sample_answers

    groups = sample_answers(model, tokenizer, template, prompts, k, seed=seed, **sampling)
    records = [
        pick_pair(p, answers, reward_fn, min_chosen, max_rejected) for p, answers in zip(prompts, groups, strict=True)
    ]
    return [r for r in records if r is not None]
