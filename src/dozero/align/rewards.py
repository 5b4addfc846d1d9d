"""Rewards for RL: a Python function of (prompt, answer, record) -> float, chosen by name on the command line.

    --reward number          the last number in the answer equals the record's "answer" (1.0, else 0.0)
    --reward exact           the answer, stripped, equals "answer"
    --reward contains        "answer" appears in the answer
    --reward ends_with:WORD  the answer's last word is WORD (the toy of tests/test_align_rl.py)
    --reward my_rewards.py:score     your own function score(prompt, answer, record) -> float
    --reward runs/reward             a reward model trained by `dozero align reward` (the RLHF path)

A verifiable reward (the answer checks out) cannot be flattered; a learned one can (reward hacking),
which is why RL keeps a KL penalty to the reference model. Prompt files are JSONL, one record per line:
{"prompt": "..."} or {"messages": [...]}, plus whatever fields the reward reads.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from dozero.errors import DozeroError
from dozero.finetune.chat import check_messages

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def _expected(record: dict):
    if "answer" not in record:
        raise DozeroError('this reward compares with the record\'s "answer" field, which the prompt file lacks')
    return record["answer"]


def number(prompt: str, answer: str, record: dict) -> float:
    got, want = last_number(answer), last_number(str(_expected(record)))
    return float(got is not None and want is not None and abs(got - want) < 1e-9)


def exact(prompt: str, answer: str, record: dict) -> float:
    return float(answer.strip() == str(_expected(record)).strip())


def contains(prompt: str, answer: str, record: dict) -> float:
    return float(str(_expected(record)) in answer)


def ends_with(word: str):
    def reward(prompt: str, answer: str, record: dict) -> float:
        words = answer.split()
        return float(bool(words) and words[-1].strip(".!?,;:") == word)

    return reward


BUILTIN = {"number": number, "exact": exact, "contains": contains}


def load_reward(spec: str, device=None):
    """The reward function `spec` names (see the module docstring)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("ends_with:") and spec[len("ends_with:") :]:
        return ends_with(spec[len("ends_with:") :])
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path, name = spec.rsplit(":", 1)
        if not Path(path).is_file():
            raise DozeroError(f"--reward {spec}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location("dozero_user_reward", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the user's own code, as a plugin they asked for
        fn = getattr(module, name, None)
        if not callable(fn):
            raise DozeroError(f"--reward {spec}: {path} has no function {name}")
        return fn
    if Path(spec).is_dir():
        from dozero.align.reward import reward_function

        return reward_function(spec, device)
    raise DozeroError(
        f"--reward {spec!r}: not one of {', '.join(BUILTIN)}, ends_with:WORD, FILE.py:FUNCTION or a reward model folder"
    )


def read_prompts(path: str | Path) -> list[dict]:
    """Every record of a prompt JSONL file, checked line by line; each gets "messages"."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DozeroError(f"--data {path}: no such file (give a .jsonl of prompt records)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DozeroError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DozeroError(f"{where}: expected a JSON object")
        if "messages" in obj:
            messages = check_messages(obj["messages"], where)
        elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            messages = [{"role": "user", "content": obj["prompt"]}]
        else:
            raise DozeroError(f'{where}: needs a non-empty "prompt" string or "messages"')
        records.append({**obj, "messages": messages})
    if not records:
        raise DozeroError(f"--data {path}: the file holds no prompts")
    return records
