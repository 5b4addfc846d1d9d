"""CLI wiring of the course's two helper verbs: `dozero attention` and `dozero doctor`."""

from __future__ import annotations

import argparse

EXAMPLE_SENTENCE = "A cachorra correu atrás da bola, mas ela era muito rápida."

ATTENTION_HELP = f"""\
Draw a model's attention weights for one sentence (every layer and head, and their average) and
print which earlier tokens a chosen token looks at most: the course's first exercise ("ela"
refers to "cachorra").

examples:
  dozero attention --model runs/shakespeare-char "To be, or not to be" --out attention.png
  dozero attention --model gpt2 "{EXAMPLE_SENTENCE}" --token ela
  dozero attention --model smollm2-135m-instruct "{EXAMPLE_SENTENCE}" --token ela   (a pretrained model)

--model takes a training run folder, a dozero or Hugging Face model folder (GPT-2 or Llama), a GGUF
file or smollm2-135m-instruct, or a preset name; a preset has random weights, so its picture shows
nothing learned yet. Besides each token, the report adds up each word's tokens (byte-level BPE cuts
words into pieces) and sets the first token aside: trained models park unused attention there."""

DOCTOR_HELP = """\
Check this computer before training: Python and PyTorch versions, CPU/GPU and memory, bf16,
FlashAttention and torch.compile (each tried on a tiny input), and whether a model preset fits
for inference and training here, with the micro-batch to use.

examples:
  dozero doctor
  dozero doctor --preset shakespeare-char --skip-compile"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attention",
        help="heatmap of a model's attention on a sentence (course stage 1)",
        description=ATTENTION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sentence", nargs="?", default=EXAMPLE_SENTENCE, help="the text to look at (default: %(default)s)")
    p.add_argument(
        "--model", required=True, help="run folder, model folder, GGUF file, or preset name (random weights)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--token", help="the word whose attention to explain (default: the last token)")
    which.add_argument("--index", type=int, help="the position of that token instead (0 = first; -1 = last)")
    p.add_argument("--out", default="attention.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--top", type=int, default=5, help="how many earlier tokens to list (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset (default: 0)")
    p.set_defaults(func=run_attention)

    d = subparsers.add_parser(
        "doctor",
        help="what this computer can do: devices, bf16, flash attention, compile, what fits",
        description=DOCTOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--preset", default="gpt2", help="model preset to check the fit of (default: %(default)s)")
    d.add_argument("--batch-size", type=int, help="check this micro-batch instead of suggesting one")
    d.add_argument("--context-length", type=int, help="tokens per sequence (default: the preset's context)")
    d.add_argument("--skip-compile", action="store_true", help="do not try torch.compile (it takes ~20 s on a CPU)")
    d.set_defaults(func=run_doctor)


def run_attention(args) -> int:
    from dozero.course.attention import explain, load_for_attention

    model, tokenizer, description = load_for_attention(args.model, args.device, args.seed)
    print(description)
    explain(
        model,
        tokenizer,
        args.sentence,
        args.out,
        token=args.token,
        index=args.index,
        title=f"attention of {args.model}",
        top_k=args.top,
    )
    return 0


def run_doctor(args) -> int:
    from dozero.course.doctor import run_doctor as doctor
    from dozero.errors import DozeroError

    for name in ("batch_size", "context_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DozeroError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    doctor(args.preset, args.batch_size, args.context_length, args.skip_compile)
    return 0
