"""Why RL keeps a KL penalty: the same toy RL run with and without it, measured.

    python scripts/align_kl_demo.py --out docs/images/align_kl.png      # ~2 min on a CPU

The toy of tests/test_align_rl.py: a tiny character model, prompts of three random letters, reward 1
when the answer ends with "!". The reward says nothing about the rest of the answer, so the policy is
free to change it; without the KL term nothing holds it back and it collapses onto one answer the
reward likes (the few characters that lead most surely to "!"), far from the model it started as.
With --kl-coef the answers end with "!" just as often but stay varied and close to the reference.
Prints per run: final mean reward, KL to the reference, and distinct answers among 64 samples of
held-out prompts; draws reward and KL per step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dozero.align.rl import RL_DEFAULTS, RLConfig, rl
from dozero.align.rollout import prompt_ids, rollout
from dozero.config import ModelConfig
from dozero.finetune.sft import load_base
from dozero.generate.config import GenerationConfig
from dozero.model.checkpoint import save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import CharTokenizer

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def ends_with_bang(prompt, answer, record):
    return float(answer.endswith("!"))


def make_toy(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    chars = CharTokenizer.from_text("abcdefghij:! \nusertan")
    cfg = ModelConfig(vocab_size=chars.vocab_size, context_length=40, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    save_model(GPTModel(cfg), folder / "base", tokenizer=chars, metadata={"chat_template": TEMPLATE})
    letters = "abcdefghij"
    records = [{"prompt": letters[i % 10] + letters[(3 * i) % 10] + letters[(7 * i + 1) % 10]} for i in range(40)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "base", folder / "prompts.jsonl"


def distinct_answers(run_dir: Path, prompts: list[str], n: int = 64) -> int:
    model, tok, template = load_base(str(run_dir))
    ids = [prompt_ids(tok, template, p) for p in prompts]
    out = rollout(
        model, ids, n // len(ids), GenerationConfig(temperature=1.0, top_k=None, max_new_tokens=4, seed=1), None
    )
    return len({tok.decode(o) for o in out})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/images/align_kl.png")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kl-coef", type=float, default=0.5)
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="align_kl_"))
    base, data = make_toy(folder)
    curves = {}
    for kl in (0.0, args.kl_coef):
        s = RLConfig(model=str(base), data=str(data), lora_rank=0, group_size=8, prompts_per_step=4, max_new_tokens=4,
                     val_fraction=0.1, kl_coef=kl)  # fmt: skip
        cfg = RL_DEFAULTS.__class__(**{**RL_DEFAULTS.__dict__, "out_dir": str(folder / f"kl{kl}"),
                                       "max_steps": args.steps, "eval_interval": args.steps, "lr": 3e-2,
                                       "min_lr": 3e-2, "tensorboard": "off", "device": "cpu"})  # fmt: skip
        result = rl(s, cfg, quiet=True, reward_fn=ends_with_bang)
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "mean_reward" in r]
        curves[kl] = steps
        distinct = distinct_answers(result.run_dir, ["abc", "hij", "dfe", "gca"])
        last = steps[-5:]
        print(f"kl_coef {kl}: mean reward (last 5 steps) {sum(r['mean_reward'] for r in last) / 5:.2f}, "
              f"KL {sum(r['kl'] for r in last) / 5:.3f}, distinct answers {distinct} of 64")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for kl, steps in curves.items():
        label = f"kl_coef {kl}" if kl else "no KL"
        a.plot([r["step"] for r in steps], [r["mean_reward"] for r in steps], label=label)
        b.plot([r["step"] for r in steps], [r["kl"] for r in steps], label=label)
    a.set(xlabel="step", ylabel="mean reward", title="reward: answer ends with '!'")
    b.set(xlabel="step", ylabel="KL to the reference", title="distance from the starting model")
    a.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
