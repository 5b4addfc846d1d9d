"""The `dozero` command: one verb per pipeline stage, each calling a function also usable from Python.

    dozero model info gpt2         parameter counts and memory needs of a preset
    dozero tokenizer train ...     byte-level BPE
    dozero data prepare ...        raw text -> cleaned documents -> token shards
    dozero train                   pretraining (no arguments: a character-level Shakespeare model)
    dozero generate --model RUN "prompt"

Each stage keeps its argparse wiring in `<stage>/commands.py` (a `register(subparsers)` function);
this file only collects them, prints user errors as one line (`DozeroError`, and the disk and path
problems of `dozero.errors.os_error_message`), and sets the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dozero import __version__
from dozero.errors import DozeroError, os_error_message

# Modules with a `register(subparsers)`, in pipeline order: `--help` lists their verbs in this order.
VERBS = [
    "dozero.model.commands",
    "dozero.tokenizer.commands",
    "dozero.data.commands",
    "dozero.train.commands",
    "dozero.finetune.commands",
    "dozero.align.commands",
    "dozero.generate.commands",
    "dozero.evaluate.commands",
    "dozero.compress.commands",
    "dozero.serve.commands",
    "dozero.course.commands",
]

EPILOG = """\
Start here:
  dozero train                      train a tiny Shakespeare model on this computer (~2 min on CPU)
  dozero model info gpt2            how much memory GPT-2 124M needs to train
Every verb has its own --help, e.g. `dozero train --help`.
Errors print one line; add --debug to see the full traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dozero",
        description="LLM do Zero: build, train and run a GPT-2-class language model from scratch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dozero {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for module_name in VERBS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def plug_in_later_stages(args) -> None:
    """Wire a later stage into an earlier stage's loop: only this module may import both. `dozero train
    --eval-tasks` scores benchmarks at every evaluation through dozero.evaluate."""
    if args.verb == "train":
        from dozero.evaluate.during_training import benchmark_hooks

        args.train_hooks = benchmark_hooks


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the verb.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        # A verb without a sub-verb (e.g. `dozero model`) prints that verb's help.
        (getattr(args, "verb_parser", None) or parser).print_help()
        return 0 if args.verb is None else 2
    try:
        plug_in_later_stages(args)
        result = args.func(args)
        return int(result or 0)
    except DozeroError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dozero generate ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush is silent
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as e:  # the disk or a path (read-only, full, no permission, a file in the way)
        message = os_error_message(e)
        if args.debug or message is None:  # an unexpected OSError stays a traceback: it may be a bug
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
