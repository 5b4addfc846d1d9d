"""`dozero train`: pretrain a GPT from scratch; with no arguments, a character-level Shakespeare model.

    dozero train                                           # tiny Shakespeare on this computer (a few minutes)
    dozero train --max-steps 500 --n-layers 2              # any setting of the preset, changed by a flag
    dozero train --preset shakespeare-bpe --data path/to/shakespeare/   # text files or a prepared folder
    dozero train --resume runs/shakespeare-char            # continue an interrupted run exactly
    torchrun --nproc_per_node=8 -m dozero train --preset gpt2-124m --data data/fineweb   # 8 GPUs, DDP

Flags come from `TrainConfig` (train/config.py) and the model's `ModelConfig` (config.py).
"""

from __future__ import annotations

import argparse

from dozero.cli_args import add_dataclass_args, apply_args
from dozero.config import ModelConfig, get_model_config
from dozero.train.config import TRAIN_PRESETS, TrainConfig

DESCRIPTION = """\
Train a GPT-2-style model to predict the next token. Without arguments it trains nanoGPT's small
character-level model (4 layers, 128 wide, context 64) on the tiny-Shakespeare text shipped with
dozero, 2,000 steps, then prints a sample.

Start from a --preset and change any setting with its flag. Each run gets a folder (--out-dir) with
latest/ and best/ models (loadable by `dozero generate --model RUN`), checkpoints/, metrics.jsonl,
loss.png and report.md. Ctrl-C or SIGTERM stops after the current step with a checkpoint (exit
status 130 or 143; a second one stops at once); --resume RUN continues exactly."""

EXAMPLES = (
    """\
presets: """
    + ", ".join(TRAIN_PRESETS)
    + """

examples:
  dozero train                                       shakespeare-char, ~2-3 minutes on a laptop CPU
  dozero train --max-steps 200 --eval-interval 50    a quick look
  dozero train --data tinyshakespeare --tokenizer gpt2  the shipped text with GPT-2's BPE
  dozero train --preset shakespeare-bpe --data shakespeare/    the complete works (download: see README)
  dozero train --resume runs/shakespeare-char --max-steps 4000    go on training a finished run
  dozero train --resume runs/shakespeare-char/checkpoints/step_001500   go on from an older checkpoint
  dozero generate --model runs/shakespeare-char "ROMEO:"          use the result"""
)

MODEL_SHAPE_FLAGS = ("context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "tie_weights")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="pretrain a model (no arguments: tiny Shakespeare on this computer)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--resume",
        metavar="PATH",
        default=None,
        help="continue a run exactly: a run folder (from its latest/ checkpoint) or one of its checkpoints, "
        "e.g. RUN/checkpoints/step_000500 to go on from an older step (later checkpoints are renamed "
        "abandoned_step_*). Checkpoints are verified (sha256); if latest/ is damaged, its intact copy in "
        "checkpoints/ is used when there is one, else the error lists the older checkpoints",
    )
    add_dataclass_args(p, TrainConfig, group_title="training (defaults: the shakespeare-char preset)")
    add_dataclass_args(
        p,
        ModelConfig,
        defaults=get_model_config("shakespeare-char"),
        skip=tuple(f for f in ModelConfig.__dataclass_fields__ if f not in MODEL_SHAPE_FLAGS),
        group_title="model shape (defaults: the preset's --model shape)",
    )
    p.set_defaults(func=run_train)


def build_config(args) -> tuple[TrainConfig, dict]:
    """The preset named by --preset with every given flag applied, and the model-shape overrides."""
    from dozero.train.checkpoint import read_run_config
    from dozero.train.config import get_train_preset

    if args.resume:
        base, _ = read_run_config(args.resume)
    else:
        base = get_train_preset(args.preset or "shakespeare-char")
    cfg = apply_args(base, args)
    overrides = {f: getattr(args, f) for f in MODEL_SHAPE_FLAGS if getattr(args, f, None) is not None}
    return cfg, overrides


def run_train(args) -> int:
    from dozero import runtime
    from dozero.errors import DozeroError
    from dozero.train.loop import EXIT_CODES, train

    cfg, overrides = build_config(args)
    if args.resume and overrides:
        raise DozeroError(f"--resume keeps the run's model shape; drop {', '.join(overrides)}")
    # --eval-tasks: dozero.cli hands over dozero.evaluate's hooks (train may not import a later stage).
    result = train(cfg, overrides, resume=args.resume, hooks=getattr(args, "train_hooks", None))
    if result.stopped != "done":
        return EXIT_CODES.get(result.stopped, 0)  # the loop printed how to resume
    if not runtime.is_main():
        return 0
    from dozero.model.checkpoint import load_model, resolve_model_dir
    from dozero.tokenizer import load_tokenizer
    from dozero.train.loop import sample_text

    folder = resolve_model_dir(result.run_dir)
    model = load_model(folder)
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(
        f"\ndone: {result.step} steps, validation loss {val} (best {result.best_val_loss:.4f}), "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.seconds:.0f} s. Run folder: {result.run_dir}"
    )
    tokenizer = load_tokenizer(folder)
    tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {folder}")
    length = 400 if tokenizer.kind == "char" else 120  # about the same amount of text
    print(f"--- a sample from {folder} ---")
    print(cfg.sample_prompt + sample_text(model, tokenizer, cfg, model.tok_emb.weight.device, length))
    print(f'---\nmore: dozero generate --model {result.run_dir} "ROMEO:"')
    return 0
