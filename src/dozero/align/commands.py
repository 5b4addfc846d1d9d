"""`dozero align dpo|reward|rl`: preference tuning, reward models and reinforcement learning from rewards.

    dozero align dpo --model smollm2-135m-instruct --data pairs.jsonl --beta 0.1
    dozero align reward --model smollm2-135m-instruct --data pairs.jsonl
    dozero align rl  --model smollm2-135m-instruct --data prompts.jsonl --reward number
    dozero align dpo --resume runs/dpo

Flags come from DPOConfig / RLConfig (align/dpo.py, align/rl.py) and the trainer's TrainConfig.
"""

from __future__ import annotations

import argparse

from dozero.cli_args import add_dataclass_args, apply_args

# TrainConfig fields an alignment run sets itself, as fine-tuning does: like it, it runs one process
# or plain DDP under torchrun, so the sharding flags are not offered (they were accepted and ignored).
_NOT_HERE = ("preset", "model", "data", "tokenizer", "val_fraction", "sample_prompt", "sample_tokens",
             "global_batch_tokens", "eval_iters", "compile",
             "parallel", "tp_size", "cpu_offload", "activation_checkpointing")  # fmt: skip


def register(subparsers) -> None:
    from dozero.align.dpo import DPO_DEFAULTS, DPOConfig
    from dozero.align.reward import REWARD_DEFAULTS, RewardConfig
    from dozero.align.rl import RL_DEFAULTS, RLConfig

    p = subparsers.add_parser("align", help="align a model: DPO on preference pairs, RL from rewards")
    p.set_defaults(verb_parser=p)
    sub = p.add_subparsers(metavar="METHOD")
    for name, cls, defaults, text in [
        ("dpo", DPOConfig, DPO_DEFAULTS, "direct preference optimization on prompt/chosen/rejected pairs"),
        ("reward", RewardConfig, REWARD_DEFAULTS, "a reward model: scalar head on the last token, Bradley-Terry loss"),
        ("rl", RLConfig, RL_DEFAULTS, "GRPO-style RL: sampled groups, a reward function, KL to the reference"),
    ]:
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--resume", metavar="PATH", default=None, help="continue a run exactly")
        add_dataclass_args(q, cls, skip=("too_long",), group_title=name)
        add_dataclass_args(q, type(defaults), defaults=defaults, skip=_NOT_HERE, group_title="training")
        q.set_defaults(func=run_align, method=name)


def run_align(args) -> int:
    from dozero.align.dpo import DPO_DEFAULTS, DPOConfig, dpo
    from dozero.align.reward import REWARD_DEFAULTS, RewardConfig, train_reward
    from dozero.align.rl import RL_DEFAULTS, RLConfig, rl
    from dozero.align.step import read_align_config
    from dozero.train.checkpoint import read_run_config, run_dir_of
    from dozero.train.loop import EXIT_CODES

    cls, defaults, fn = {
        "dpo": (DPOConfig, DPO_DEFAULTS, dpo),
        "reward": (RewardConfig, REWARD_DEFAULTS, train_reward),
        "rl": (RLConfig, RL_DEFAULTS, rl),
    }[args.method]
    if args.resume:
        settings, cfg = read_align_config(run_dir_of(args.resume), cls), read_run_config(args.resume)[0]
    else:
        settings, cfg = cls(), defaults
    train_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _NOT_HERE})
    settings, cfg = apply_args(settings, args), apply_args(cfg, train_args)
    if not args.resume:
        _say_where_a_new_run_goes(cfg.out_dir, cfg.force)
    result = fn(settings, cfg, resume=args.resume)
    if result.stopped != "done":
        return EXIT_CODES.get(result.stopped, 0)
    use = (
        f"dozero align rl --reward {result.run_dir}"
        if args.method == "reward"
        else f"dozero chat --model {result.run_dir}"
    )
    print(f"\ndone: {result.step} steps. Use it: {use}")
    return 0


def _say_where_a_new_run_goes(out_dir: str, force: bool) -> None:
    """A run is never overwritten: when --out-dir holds one, the new run goes to OUT-2 (-3, ...), as with
    `dozero train` and `dozero finetune` (train/checkpoint.py's choose_run_dir). Said before the first
    step, with the way to continue the old run instead, so the new folder is no surprise at the end.
    A folder holding other files is refused here (without --force), before the models are loaded."""
    from pathlib import Path

    from dozero.runtime import is_main
    from dozero.train.checkpoint import choose_run_dir

    if not is_main():
        return
    run_dir = choose_run_dir(out_dir, force)
    if run_dir != Path(out_dir):
        print(
            f"{out_dir} holds a run already and a run is never overwritten: this run writes to {run_dir} "
            f"(to continue that one instead: --resume {out_dir})",
            flush=True,
        )
