"""`dozero generate`: continue a prompt with a trained model, printing the text as it is produced.

    dozero generate --model runs/shakespeare-char "ROMEO:"
    dozero generate --model runs/shakespeare-char "ROMEO:" --num-samples 3 --temperature 1.0 --seed 7
    dozero generate --model path/to/hf-gpt2-folder "The meaning of life is" --top-p 0.9 --stop "\\n\\n"
    dozero generate --model path/to/weights-only --tokenizer gpt2 "Hello"
    dozero generate --model smollm2-135m-instruct --chat "What is the capital of France?"

The sampling flags come from `GenerationConfig` and `SamplingConfig` (generate/config.py).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from dozero.cli_args import add_dataclass_args, apply_args, unescape
from dozero.generate.config import GenerationConfig

DESCRIPTION = """\
Continue PROMPT with a trained model: a training run folder (its best/ or latest/ model), a dozero
model folder, or a Hugging Face GPT-2 folder (config.json + model.safetensors). The tokenizer is the
folder's own; --tokenizer names one for a folder without (weights only), and must fit the model.

Each new token is drawn from the model's probabilities for the next position: --temperature
reshapes them (0 = always the most likely token), --top-k / --top-p / --min-p cut off the unlikely
tail. The same --seed gives the same text. Generation stops at end-of-text, at a --stop string, or
after --max-new-tokens. Past the model's context length the window slides (with a warning).

--chat makes PROMPT a user's turn in the model's own chat template (a GGUF file's or a Hugging Face
folder's; ChatML otherwise), as a chat model was tuned to see it, and stops at the end of the turn:
only the answer is printed. --system adds a system turn before it."""

EXAMPLES = """\
examples:
  dozero generate --model runs/shakespeare-char "ROMEO:"
  dozero generate --model runs/shakespeare-char "" --num-samples 3 --seed 1      (empty prompt: start from scratch)
  dozero generate --model runs/shakespeare-char "JULIET:" --temperature 0 --max-new-tokens 50   (greedy)
  dozero generate --model gpt2-folder "Hello, I'm a language model," --top-p 0.9 --stop "\\n"
  dozero generate --model hf-weights-only/ --tokenizer gpt2 "Hello"     (a folder without tokenizer files)
  dozero generate --model smollm2-135m-instruct --chat "What is the capital of France?" --temperature 0
  dozero generate --model smollm2-135m-instruct --keep-quantized --chat "Tell me a story" (the file's 4-bit weights)"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a trained model",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", default="", help="text to continue (default: empty, start from scratch)")
    p.add_argument(
        "--model", required=True, metavar="RUN_OR_FOLDER", help="training run folder or model folder to load"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="the tokenizer, when the model folder has none (e.g. Hugging Face weights only) or to override "
        "it: 'gpt2', a folder or a tokenizer file (default: the model folder's)",
    )
    p.add_argument("--num-samples", type=int, default=1, metavar="INT", help="samples of the prompt (default: 1)")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop a sample when this text appears (repeatable; \\n, \\t, \\r and \\\\ are understood)",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the first sample as it is produced, flushed piece by piece even into a pipe or file "
        "(default: on; --no-stream prints each sample when it is complete)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="PROMPT is a user's message: wrap it in the model's chat template, stop at the end of the turn, "
        "print only the answer",
    )
    p.add_argument(
        "--system", default=None, metavar="TEXT", help="with --chat: a system message before the user's (default: none)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    add_keep_quantized_flag(p)
    add_dataclass_args(p, GenerationConfig, skip=("stop",), group_title="sampling")
    p.set_defaults(func=run_generate)


def add_keep_quantized_flag(p) -> None:
    """--keep-quantized, for the commands that run a model (generate, chat, serve, eval)."""
    p.add_argument(
        "--keep-quantized",
        action="store_true",
        help="a GGUF model: run its Q8_0/Q4_0/Q4_1 matrices as they are, with int8/int4 kernels (as llama.cpp "
        "does: a third of the memory, twice as fast on a CPU; inputs rounded to bfloat16) instead of "
        "dequantized to fp32 (the default, equal to Hugging Face's)",
    )


def run_generate(args) -> int:
    import torch

    from dozero.errors import DozeroError
    from dozero.generate.layout import use_decoding_layout
    from dozero.generate.stream import stream_batch
    from dozero.model.checkpoint import load_model, resolve_model_dir
    from dozero.runtime import pick_device
    from dozero.tokenizer import load_tokenizer

    if args.num_samples < 1:
        raise DozeroError(f"--num-samples must be >= 1, got {args.num_samples}")
    stops = tuple(unescape(s) for s in (args.stop or []))  # a shell passes "\\n" as backslash + n
    if args.system is not None and not args.chat:
        raise DozeroError("--system is a chat turn: add --chat (PROMPT is then the user's message)")
    config = apply_args(GenerationConfig(stop=stops), args)
    device = pick_device(args.device)
    folder = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(args.tokenizer or folder)  # first: a missing tokenizer fails before the weights load
    model = load_model(folder, device=device, keep_quantized=args.keep_quantized)
    tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {folder}")
    prompt, shown = args.prompt, args.prompt
    if args.chat:
        prompt, stop = chat_prompt(tokenizer, folder, args.prompt, args.system)
        config.stop, shown = config.stop + (stop,) * bool(stop), ""  # the answer alone, not the template's text
    if device.type == "cuda":  # bf16 halves memory traffic, the bottleneck of decoding one token at a time
        model = model.to(torch.bfloat16) if torch.cuda.is_bf16_supported() else model.half()
    use_decoding_layout(model)  # CPU: weights stored transposed, faster one token at a time (layout.py)

    live = args.stream  # also into a pipe or a file: a reader (`| tee`, a script) sees the text as it comes
    out = sys.stdout
    texts = [""] * args.num_samples
    if live:
        out.write(shown)
        out.flush()
    with warnings.catch_warnings():
        # Warnings (a long prompt cut, the window sliding) as one line of their own, not Python's format.
        warnings.showwarning = lambda message, *_, **__: print(f"\n[warning: {message}]", file=sys.stderr, flush=True)
        for b, piece in stream_batch(model, tokenizer, [prompt] * args.num_samples, config):
            texts[b] += piece
            if live and b == 0:  # the first sample streams; the others are printed when all are done
                out.write(piece)
                out.flush()
    for b, text in enumerate(texts):
        if b > 0:
            out.write(f"\n{'-' * 40} sample {b + 1}\n")
        if not (live and b == 0):
            out.write(shown + text)
    out.write("\n")
    out.flush()
    return 0


def chat_prompt(tokenizer, folder, message: str, system: str | None) -> tuple[str, str]:
    """(the prompt text that asks for the assistant's answer, the text that ends its turn)."""
    from dozero.tokenizer.chat_template import chat_template, end_of_turn, render_text

    template = chat_template(tokenizer, folder)
    turns = [{"role": "system", "content": system}] * (system is not None) + [{"role": "user", "content": message}]
    return render_text(tokenizer, turns, template, add_generation_prompt=True), end_of_turn(template, tokenizer)
