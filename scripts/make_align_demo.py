"""Make the alignment demo's data: two-number additions with a checkable answer.

    python scripts/make_align_demo.py --out demo/align/
      rl.jsonl       {"prompt", "answer"}: prompts for `dozero align rl --reward number`
      pairs.jsonl    {"prompt", "chosen", "rejected"}: chosen = the sum alone, rejected = a wrong sum written
                     as SmolLM2-135M-Instruct tends to write it ("6 + 20 = 25"); for `dozero align dpo`
      heldout.jsonl  {"prompt", "answer", "check": "number"}: a `dozero eval --chat --tasks` file; these
                     questions never appear in the other two files

SmolLM2-135M-Instruct gets about a quarter of these right greedily (measured: 4 of 16), often
restating the sum with a wrong result. The numbers are drawn with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QUESTION = "What is {a} + {b}? Answer with the number only."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo/align", help="output folder (default: demo/align)")
    p.add_argument("--train", type=int, default=200, help="training questions (default: 200)")
    p.add_argument("--heldout", type=int, default=50, help="held-out questions (default: 50)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    pairs = [(a, b) for a in range(2, 40) for b in range(2, 40)]
    rng.shuffle(pairs)
    train, heldout = pairs[: args.train], pairs[args.train : args.train + args.heldout]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, records: list[dict]) -> None:
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    write("rl.jsonl", [{"prompt": QUESTION.format(a=a, b=b), "answer": a + b} for a, b in train])
    wrong = [a + b + rng.choice([-3, -2, -1, 1, 2, 10]) for a, b in train]
    write("pairs.jsonl", [{"prompt": QUESTION.format(a=a, b=b), "chosen": str(a + b), "rejected": f"{a} + {b} = {w}"}
                          for (a, b), w in zip(train, wrong, strict=True)])  # fmt: skip
    write(
        "heldout.jsonl", [{"prompt": QUESTION.format(a=a, b=b), "answer": a + b, "check": "number"} for a, b in heldout]
    )
    print(f"wrote {out}/rl.jsonl, pairs.jsonl ({len(train)} each) and heldout.jsonl ({len(heldout)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
