"""`dozero finetune` (supervised fine-tuning, full or LoRA) and `dozero chat` (talk with a model).

    dozero chat --model smollm2-135m-instruct
    dozero finetune --model smollm2-135m-instruct --data chat.jsonl --lora-rank 8 --out-dir runs/sft
    dozero chat --model runs/sft

Flags come from `FinetuneConfig` and `LoRAConfig` (finetune/sft.py, finetune/lora.py) and the
trainer's `TrainConfig` (train/config.py), with fine-tuning's defaults.
"""

from __future__ import annotations

import argparse

from dozero.cli_args import add_dataclass_args, apply_args
from dozero.generate.commands import add_keep_quantized_flag
from dozero.generate.config import GenerationConfig

CHAT_DESCRIPTION = """\
Talk with a chat model in the terminal: a training run folder, a model folder, a GGUF file or the
short name smollm2-135m-instruct. Each turn is put in the model's chat template (its own, from the
GGUF/Hugging Face metadata, else ChatML) with the conversation so far; when the conversation outgrows
the context, the oldest turns are dropped (with a notice). The answer is printed as it is written.

At the prompt: /reset starts over, /save FILE writes the conversation as a JSON line (the format
`dozero finetune --data` reads), /quit leaves. Ctrl-C stops the answer being written; Ctrl-D leaves."""


def register(subparsers) -> None:
    _register_finetune(subparsers)
    _register_merge_lora(subparsers)
    p = subparsers.add_parser(
        "chat",
        help="talk with a chat model in the terminal",
        description=CHAT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="run folder, model folder, GGUF file or short name")
    p.add_argument("--adapter", default=None, metavar="FOLDER", help="a LoRA adapter (dozero's or PEFT's) to merge in")
    p.add_argument("--system", default="", metavar="TEXT", help="system prompt (default: none, or the template's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    add_keep_quantized_flag(p)
    add_dataclass_args(
        p,
        GenerationConfig,
        defaults=GenerationConfig(temperature=0.0, max_new_tokens=256),
        skip=("stop", "compile"),
        group_title="sampling (default: greedy, up to 256 tokens per answer)",
    )
    p.set_defaults(func=run_chat)


def run_chat(args) -> int:
    from dozero.finetune.talk import ChatSession, load_chat_model, repl
    from dozero.runtime import pick_device

    config = apply_args(GenerationConfig(temperature=0.0, max_new_tokens=256), args)
    device = pick_device(args.device)
    model, tokenizer, template = load_chat_model(args.model, args.adapter, device, args.keep_quantized)
    return repl(ChatSession(model, tokenizer, template, args.system, config))


FINETUNE_DESCRIPTION = """\
Supervised fine-tuning: teach a pretrained model to answer by training on conversations, scoring only
the assistant's tokens. --data is a JSONL file of chat records ({"messages": [{"role": ..., "content":
...}, ...]}) or Alpaca records ({"instruction", "input", "output"}); every line is checked. A share of
the conversations (--val-fraction) is held out for the validation loss.

--lora-rank R (default 8) trains low-rank adapters beside the frozen weights (a fraction of the memory);
--lora-rank 0 trains every weight. The run folder is a training run: metrics.jsonl, loss.png,
report.md, checkpoints (each a merged, plain model plus, with LoRA, adapter_config.json +
adapter_model.safetensors that Hugging Face PEFT loads); --resume RUN continues exactly."""

FINETUNE_EXAMPLES = """\
examples:
  dozero finetune --model smollm2-135m-instruct --data chat.jsonl --out-dir runs/sft
  dozero finetune --model runs/shakespeare-bpe --data alpaca.jsonl --lora-rank 0 --lr 2e-5   (full)
  dozero finetune --resume runs/sft --max-steps 400
  dozero chat --model runs/sft"""

# TrainConfig fields that fine-tuning sets itself (the data and model come from FinetuneConfig).
_NOT_FOR_FINETUNE = (
    "preset",
    "model",
    "data",
    "tokenizer",
    "val_fraction",
    "sample_prompt",
    "sample_tokens",
    "global_batch_tokens",
    "eval_iters",
    "compile",
    "parallel",
    "tp_size",
    "cpu_offload",
    "activation_checkpointing",
)  # fmt: skip (fine-tuning runs one process or plain DDP)


def _register_finetune(subparsers) -> None:
    from dozero.finetune.sft import FINETUNE_DEFAULTS, FinetuneConfig

    p = subparsers.add_parser(
        "finetune",
        help="supervised fine-tuning on conversations (LoRA or full)",
        description=FINETUNE_DESCRIPTION,
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--resume", metavar="PATH", default=None, help="continue a fine-tuning run exactly")
    add_dataclass_args(p, FinetuneConfig, group_title="fine-tuning")
    add_dataclass_args(
        p, type(FINETUNE_DEFAULTS), defaults=FINETUNE_DEFAULTS, skip=_NOT_FOR_FINETUNE, group_title="training"
    )
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from dozero.finetune.sft import FINETUNE_DEFAULTS, FinetuneConfig, finetune, read_finetune_config
    from dozero.train.checkpoint import read_run_config, run_dir_of
    from dozero.train.loop import EXIT_CODES

    if args.resume:
        ft, cfg = read_finetune_config(run_dir_of(args.resume)), read_run_config(args.resume)[0]
    else:
        ft, cfg = FinetuneConfig(), FINETUNE_DEFAULTS
    train_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _NOT_FOR_FINETUNE})
    ft, cfg = apply_args(ft, args), apply_args(cfg, train_args)
    result = finetune(ft, cfg, resume=args.resume)
    if result.stopped != "done":
        return EXIT_CODES.get(result.stopped, 0)
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(f"\ndone: {result.step} steps, best validation loss {best}. Talk to it: dozero chat --model {result.run_dir}")
    return 0


MERGE_DESCRIPTION = """\
Merge a LoRA adapter (dozero's, from a `dozero finetune` checkpoint, or Hugging Face PEFT's
adapter_config.json + adapter_model.safetensors) into its base model and write a plain model folder:
W <- W + (alpha / r) B A in every adapted layer. The result loads and runs like any dozero model."""


def _register_merge_lora(subparsers) -> None:
    """`dozero model merge-lora`, an action of the model verb registered from here: it needs LoRA, and
    finetune comes after model in the import order (model must not import finetune)."""
    model_verb = subparsers.choices["model"]
    (actions,) = [a for a in model_verb._actions if isinstance(a, argparse._SubParsersAction)]
    p = actions.add_parser(
        "merge-lora",
        help="merge a LoRA adapter into its base model (a plain model folder)",
        description=MERGE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="the base model: folder, run folder, GGUF file or short name")
    p.add_argument("adapter", metavar="ADAPTER", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("out", metavar="OUT", help="folder to write (created; must not hold another model)")
    p.add_argument("--force", action="store_true", help="write into a folder that holds other files")
    p.set_defaults(func=run_merge_lora)


def run_merge_lora(args) -> int:
    from pathlib import Path

    from dozero.finetune.lora import load_adapter, merge_lora
    from dozero.finetune.sft import load_base
    from dozero.model.checkpoint import check_model_output, save_model

    out = Path(args.out).expanduser()
    check_model_output(out, args.force)
    model, tokenizer, template = load_base(args.base)
    merge_lora(load_adapter(model, args.adapter))  # checks every tensor first: a wrong base is one line
    save_model(model, out, tokenizer=tokenizer, metadata={"chat_template": template, "merged_adapter": args.adapter})
    print(f"wrote {out}: {args.base} with {args.adapter} merged in")
    return 0
