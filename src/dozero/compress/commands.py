"""`dozero compress METHOD`: make a finished model cheaper to run, each method a sub-verb (STYLE.md rule 4:
a stage with several methods takes the method as a sub-verb, as `dozero data prepare`).

    dozero compress quantize --model smollm2-135m-instruct --to int8 --out out/smol-int8
    dozero compress quantize --model runs/shakespeare-char --to int4 --group-size 32 --out out/char-int4
    dozero generate --model out/smol-int8 "The capital of France is"     (every loader reads the folder)
    dozero compress prune --model smollm2-135m-instruct --method neurons --sparsity 0.25 --out out/smol-n25
    dozero compress distill --teacher smollm2-135m-instruct --student llama-char --data tinyshakespeare --out out/s
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dozero.cli_args import add_dataclass_args, apply_args
from dozero.compress.distill import DistillConfig
from dozero.compress.prune import PruneConfig
from dozero.compress.quantize import QuantizeConfig
from dozero.errors import DozeroError

QUANTIZE_EPILOG = """\
examples:
  dozero compress quantize --model smollm2-135m-instruct --to int8 --out out/smol-int8
  dozero compress quantize --model runs/shakespeare-char --to int4 --group-size 32 --out out/char-int4
  dozero compress quantize --model gpt2-folder --to int8 --no-head --out out/gpt2-int8   (keep the head fp32)
  dozero compress quantize --model smollm2-135m-instruct --to int8 --kernel fbgemm --smooth 0.7 --out out/smol-fast
  dozero compress quantize --model smollm2-135m-instruct --to int4 --method gptq --out out/smol-gptq

int8 keeps one scale per row (per output channel) unless --group-size is given; int4 keeps one scale
per --group-size inputs (default 32, llama.cpp's Q4_0 block). With --group-size 32 the numbers are
GGUF's Q8_0 / Q4_0, value for value. The folder loads wherever a model does (generate, eval, serve).
--method gptq chooses the same kind of integers by GPTQ (each layer's rounding errors corrected on
--calibration text's inputs): the same file format, lower error at int4."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress",
        help="quantize (int8/int4), prune or distill a finished model",
        description="Make a finished model smaller and faster. `dozero compress METHOD --help` for each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.split("\n\n")[1],
    )
    p.set_defaults(verb_parser=p)
    sub = p.add_subparsers(metavar="METHOD")
    q = sub.add_parser(
        "quantize",
        help="weights to int8 or int4 (with their scales), saved as safetensors",
        description="Store the weights of every linear layer (and the tied embedding/head) as 8- or 4-bit "
        "integers with float16 scales. Activations stay in floating point.",
        epilog=QUANTIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--model", required=True, metavar="MODEL", help="model folder, run folder, GGUF file or short name")
    q.add_argument("--to", required=True, choices=("int8", "int4"), help="integer width of the stored weights")
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write (a dozero model folder)")
    q.add_argument(
        "--calibration",
        default="tinyshakespeare",
        metavar="TEXT",
        help="text whose activations set --smooth's scaling and weigh --method gptq's errors (a file or a bundled "
        "text's name, read from its middle; default: tinyshakespeare)",
    )
    q.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens of --calibration (default: 2048 for --method gptq, as `compress report`; 512 for --smooth)",
    )
    q.add_argument("--force", action="store_true", help="overwrite a model in DIR, or write into a foreign folder")
    add_dataclass_args(q, QuantizeConfig, skip=("bits",))
    q.set_defaults(func=run_quantize)

    pr = sub.add_parser(
        "prune",
        help="zero the least important weights, or remove feed-forward neurons or attention heads",
        description="Prune a finished model: magnitude or wanda (zeros, same shapes), neurons or heads (narrower "
        "feed-forward layers, fewer attention heads: a smaller, faster model); optionally fine-tune it after.",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("--model", required=True, metavar="MODEL", help="model folder, run folder, GGUF file or short name")
    pr.add_argument("--out", required=True, metavar="DIR", help="folder to write (a dozero model folder)")
    pr.add_argument(
        "--calibration",
        default="tinyshakespeare",
        metavar="TEXT",
        help="text whose activations score the weights (wanda, heads; a file or a bundled text's name, read from its "
        "middle; default: tinyshakespeare)",
    )
    pr.add_argument(
        "--data",
        metavar="TEXT",
        help="text of the fine-tune after pruning (--finetune-steps; a file or a bundled "
        "text's name; its last 10%% is held out to measure the loss before and after)",
    )
    pr.add_argument("--max-tokens", type=int, default=200_000, metavar="N", help="tokens of --data (default: 200000)")
    pr.add_argument("--force", action="store_true", help="overwrite a model in DIR, or write into a foreign folder")
    add_dataclass_args(pr, PruneConfig)
    pr.set_defaults(func=run_prune)

    d = sub.add_parser(
        "distill",
        help="train a small student on a teacher's next-token distributions",
        description="Logit distillation: the student minimizes alpha * T^2 * KL(teacher || student) at "
        "temperature T plus (1 - alpha) * cross-entropy, through the trainer's step (AdamW, schedule, clipping).",
        epilog=DISTILL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--teacher", required=True, metavar="MODEL", help="model folder, GGUF file or short name")
    d.add_argument(
        "--student",
        required=True,
        metavar="PRESET_OR_FOLDER",
        help="a preset (a new model with the teacher's vocabulary, e.g. llama-char) or a model folder",
    )
    d.add_argument("--data", required=True, metavar="TEXT", help="text to train on (a file or a bundled text's name)")
    d.add_argument("--out", required=True, metavar="DIR", help="folder to write the student to")
    d.add_argument(
        "--compare",
        action="store_true",
        help="also train the same student (same initial weights, tokens and steps) without the teacher "
        "(alpha 0) and print both held-out losses",
    )
    d.add_argument("--max-tokens", type=int, default=200_000, metavar="N", help="tokens of --data (default: 200000)")
    d.add_argument("--force", action="store_true", help="overwrite a model in DIR, or write into a foreign folder")
    add_dataclass_args(d, DistillConfig)
    d.set_defaults(func=run_distill)

    r = sub.add_parser(
        "report",
        help="size, perplexity and decode speed of every method on one model: a table and a plot",
        description="Apply each compression setting to a fresh copy of MODEL, save it, and measure the folder in "
        "a fresh process: weights and size on disk (MB), peak memory, perplexity and bits per byte on --text, "
        "accuracy on --tasks, greedy decode tokens/s; write report.md, report.json and quality_vs_size.png to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  dozero compress report --model smollm2-135m-instruct --out out/report",
    )
    r.add_argument("--model", required=True, metavar="MODEL", help="model folder, run folder, GGUF file or short name")
    r.add_argument("--text", default="tinyshakespeare", metavar="TEXT", help="held-out text (default: tinyshakespeare)")
    r.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, report.json, quality_vs_size.png")
    r.add_argument(
        "--calibration", default="tinyshakespeare", metavar="TEXT", help="Wanda's text (read from its middle)"
    )
    r.add_argument(
        "--max-tokens", type=int, default=1024, metavar="N", help="tokens of --text measured (default: 1024)"
    )
    r.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens decoded for the speed (0: skip)")
    r.add_argument(
        "--tasks",
        default="arc_easy,piqa",
        metavar="NAMES",
        help="dozero eval tasks scored for each setting (comma-separated; '' for none; default: arc_easy,piqa)",
    )
    r.add_argument("--limit", type=int, default=100, metavar="N", help="questions per task (default: 100)")
    r.add_argument(
        "--settings", nargs="+", default=None, metavar="NAME", help="a subset of the settings (default: all)"
    )
    r.set_defaults(func=run_report)


PRUNE_EPILOG = """\
examples:
  dozero compress prune --model runs/shakespeare-char --method magnitude --sparsity 0.5 --out out/char-m50
  dozero compress prune --model smollm2-135m-instruct --method wanda --sparsity 0.5 --out out/smol-w50
  dozero compress prune --model smollm2-135m-instruct --method neurons --sparsity 0.25 --out out/smol-n25
  dozero compress prune --model smollm2-135m-instruct --method heads --sparsity 0.34 \\
      --finetune-steps 100 --data tinyshakespeare --out out/smol-h33

magnitude and wanda set weights to zero (the file and the speed stay the same); neurons and heads remove
whole feed-forward neurons or attention heads (with grouped-query attention, the same number of query
heads from every group), so the matrices, the file and the time per token shrink. --finetune-steps then
trains the pruned model on --data, learning from the unpruned one too, and prints the held-out loss
before and after (the last 10% of --data is held out)."""


DISTILL_EPILOG = """\
examples:
  dozero compress distill --teacher smollm2-135m-instruct --student llama-char --data tinyshakespeare \\
      --out out/student --steps 200 --compare
  dozero compress distill --teacher runs/big --student runs/small --data notes.txt --out out/s --alpha 0.9

The student must read the teacher's token ids: a preset student is built with the teacher's vocabulary
(and saved with its tokenizer); a folder student must already have it."""


def prepare_out(out: str, src: Path, force: bool) -> Path:
    """The output folder, refused before any work when it would clobber something."""
    from dozero.files import check_output_folder
    from dozero.model.checkpoint import MODEL_CONFIG_FILE

    dst = Path(out).expanduser()
    if dst.exists() and dst.resolve() == src.resolve():
        raise DozeroError(f"--out is the model's own folder ({src}); choose another folder")
    if (dst / MODEL_CONFIG_FILE).exists() and not force:
        raise DozeroError(f"{dst} already holds a model; pass --force to overwrite it")
    check_output_folder(dst, "model folder", lambda folder: (folder / MODEL_CONFIG_FILE).exists(), force)
    return dst


def load_checked(src: Path):
    """The model in `src` and its tokenizer, which must fit it: a tokenizer with more ids than the model's
    embedding (replaced in the folder, or not trained with it) is one line here, not an IndexError in the
    calibration or a compressed model saved with a tokenizer that makes it write garbage."""
    from dozero.model.checkpoint import load_model
    from dozero.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(src)  # first: a missing tokenizer fails before the weights load
    model = load_model(src)
    tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {src}")
    return model, tokenizer


def run_quantize(args) -> int:
    from dozero.compress.quantize import quantize, save_quantized, weight_bytes
    from dozero.model.checkpoint import resolve_model_dir

    config = apply_args(QuantizeConfig(bits=8 if args.to == "int8" else 4), args)
    src = resolve_model_dir(args.model)
    dst = prepare_out(args.out, src, args.force)
    model, tokenizer = load_checked(src)
    before = weight_bytes(model)
    calibration = None
    if config.smooth or config.method == "gptq":
        from dozero.compress.calibrate import calibration_tokens

        n = args.calibration_tokens or (2048 if config.method == "gptq" else 512)
        if n < 16:
            raise DozeroError(f"--calibration-tokens must be at least 16, got {n}")
        calibration = calibration_tokens(args.calibration, tokenizer, n)
    quantize(model, config, calibration)
    save_quantized(model, dst, tokenizer, metadata={"quantized_from": str(args.model)})
    after = weight_bytes(model)
    print(f"{args.to}: weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({before / after:.1f}x smaller)")
    print(f"wrote {dst}")
    return 0


def run_prune(args) -> int:
    import copy
    import math

    from dozero.compress.calibrate import calibration_tokens
    from dozero.compress.prune import finetune, prune, sparsity_of
    from dozero.compress.quantize import weight_bytes
    from dozero.model.checkpoint import resolve_model_dir, save_model

    config = apply_args(PruneConfig(), args)
    config.check()
    if config.finetune_steps and not args.data:
        raise DozeroError("prune: --finetune-steps needs --data TEXT (the text to fine-tune on)")
    src = resolve_model_dir(args.model)
    dst = prepare_out(args.out, src, args.force)
    model, tokenizer = load_checked(src)
    calibration = None
    if config.method in ("wanda", "heads"):
        calibration = calibration_tokens(args.calibration, tokenizer, config.calibration_tokens)
    before = weight_bytes(model)
    original = copy.deepcopy(model) if config.finetune_steps and config.method in ("magnitude", "wanda") else model
    pruned = prune(model, config, calibration)  # magnitude and wanda in place
    meta = {"pruned_from": str(args.model), "prune": vars(config)}
    if config.finetune_steps:
        from dozero.evaluate.perplexity import read_eval_tokens

        ids = read_eval_tokens(args.data, tokenizer, args.max_tokens)[0]
        meta["held_out_loss"] = losses = finetune(
            pruned, original, ids, config, _progress("fine-tune", config.finetune_steps)
        )
        print("held-out loss: " + ", ".join(f"{k} {v:.4f} (perplexity {math.exp(v):.2f})" for k, v in losses.items()))
    save_model(pruned, dst, tokenizer=tokenizer, metadata=meta)
    shape = {
        "heads": f"{model.cfg.n_heads} -> {pruned.cfg.n_heads} attention heads per block",
        "neurons": f"{model.cfg.hidden_dim} -> {pruned.cfg.hidden_dim} feed-forward neurons per block",
    }.get(config.method, f"{sparsity_of(pruned):.1%} of the blocks' weights are zero")
    size = f"weights {before / 1e6:.1f} MB -> {weight_bytes(pruned) / 1e6:.1f} MB"
    print(f"{config.method}: {shape}; {size}; wrote {dst}")
    return 0


def run_distill(args) -> int:
    import copy
    import math

    import torch

    from dozero.compress.distill import check_same_vocabulary, distill, held_out_loss, split_tokens
    from dozero.config import MODEL_PRESETS, get_model_config
    from dozero.evaluate.perplexity import read_eval_tokens
    from dozero.model.checkpoint import load_model, resolve_model_dir, save_model
    from dozero.model.gpt import GPTModel
    from dozero.tokenizer import load_tokenizer

    config = apply_args(DistillConfig(), args)
    config.check()
    teacher_dir = resolve_model_dir(args.teacher)
    dst = prepare_out(args.out, teacher_dir, args.force)
    teacher, tokenizer = load_checked(teacher_dir)
    if args.student in MODEL_PRESETS:
        torch.manual_seed(config.seed)
        student = GPTModel(get_model_config(args.student, vocab_size=teacher.cfg.vocab_size))
        check_same_vocabulary(teacher, student)
    else:
        student_dir = resolve_model_dir(args.student)
        student = load_model(student_dir)
        check_same_vocabulary(teacher, student, tokenizer, load_tokenizer(student_dir))
    ids = read_eval_tokens(args.data, tokenizer, args.max_tokens)[0]
    T = min(config.context_length, student.cfg.context_length)
    train_tokens, val_tokens = split_tokens(ids, config.val_fraction, T)
    print(f"{len(train_tokens):,} training tokens, {len(val_tokens):,} held out; student {student.num_parameters():,} "
          f"parameters, teacher {teacher.num_parameters():,}")  # fmt: skip
    runs = {"distilled": (student, config)}
    if args.compare:
        runs["from scratch"] = (copy.deepcopy(student), apply_args(DistillConfig(), args))
        runs["from scratch"][1].alpha = 0.0
    results = {}
    for name, (model, cfg) in runs.items():
        distill(model, teacher, train_tokens, cfg, progress=_progress(name, cfg.steps))
        loss = held_out_loss(model, val_tokens, T)
        results[name] = loss
        print(f"{name}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
    teacher_loss = held_out_loss(teacher, val_tokens, T)
    print(f"teacher: held-out loss {teacher_loss:.4f} (perplexity {math.exp(teacher_loss):.2f})")
    meta = {"distilled_from": str(args.teacher), "distill": vars(config), "held_out_loss": results["distilled"]}
    save_model(student, dst, tokenizer=tokenizer, metadata=meta)
    print(f"wrote {dst}")
    return 0


def _progress(name: str, steps: int):
    def report(step: int, loss: float) -> None:
        if step == 1 or step % 25 == 0 or step == steps:
            print(f"  {name} step {step}/{steps}: loss {loss:.4f}", flush=True)

    return report


def run_report(args) -> int:
    from dozero.compress.report import SETTINGS, main_report
    from dozero.model.checkpoint import resolve_model_dir

    unknown = [n for n in args.settings or [] if n not in SETTINGS]
    if unknown:
        raise DozeroError(f"unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    from dozero.files import check_output_folder

    src = resolve_model_dir(args.model)
    check_output_folder(args.out, "compression report", lambda folder: (folder / "report.md").exists(), False)
    main_report(*load_checked(src), args)
    return 0
