"""Make the fine-tuning demo's data: dates rewritten from ISO (2024-03-15) to the Brazilian 15/03/2024.

    python scripts/make_finetune_demo.py --out demo/      # train.jsonl (chat), heldout.jsonl (dozero eval task)

SmolLM2-135M-Instruct gets almost none of these right (it chats, reorders wrongly or drops a zero); a
few minutes of LoRA on a CPU teach it. The check is exact: the answer, trimmed, must equal the date.
Dates are drawn with a fixed seed, and the held-out dates never appear in the training file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

QUESTION = "Rewrite the date {iso} in the Brazilian format (DD/MM/YYYY). Answer with the date only."


def dates(n: int, rng: random.Random) -> list[datetime.date]:
    start, span = datetime.date(1950, 1, 1), (datetime.date(2049, 12, 31) - datetime.date(1950, 1, 1)).days
    picked: set[datetime.date] = set()
    while len(picked) < n:
        picked.add(start + datetime.timedelta(days=rng.randrange(span)))
    return sorted(picked, key=lambda _: rng.random())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo", help="folder for train.jsonl and heldout.jsonl (default: demo)")
    p.add_argument("--train", type=int, default=400, help="training conversations (default: 400)")
    p.add_argument("--heldout", type=int, default=50, help="held-out questions (default: 50)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    every = dates(args.train + args.heldout, random.Random(args.seed))
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for d in every[: args.train]:
            messages = [{"role": "user", "content": QUESTION.format(iso=d.isoformat())},
                        {"role": "assistant", "content": d.strftime("%d/%m/%Y")}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:  # a generate-and-check task for dozero eval
        for d in every[args.train :]:
            record = {"prompt": QUESTION.format(iso=d.isoformat()), "answer": d.strftime("%d/%m/%Y"), "check": "exact"}
            f.write(json.dumps(record) + "\n")
    print(f"wrote {out / 'train.jsonl'} ({args.train}) and {out / 'heldout.jsonl'} ({args.heldout})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
