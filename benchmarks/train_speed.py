"""Training speed on the shakespeare-char preset: dozero's step vs Hugging Face GPT2LMHeadModel's.

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/train_speed.py [--rounds 7] [--steps 20]
    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/train_speed.py --full   # + the 2000-step run

1. Step time, side by side in one process, interleaved (A B A B ...), medians over --rounds of --steps:
   the same `Stepper` (batch 12 x 64 tokens, AdamW with decay groups, clip 1.0) drives
     dozero     GPTModel of the shakespeare-char shape (4 layers, 4 heads, 128 wide, context 64)
     HF         transformers.GPT2LMHeadModel with the same shape and GELU (random init, built offline)
   at 1 and 2 CPU threads. Prints ms/step, tokens/s, the ratio HF/dozero, and dozero's tokens/s
   over nanoGPT's published-here reference for the same configuration (about 54 ms/iteration =
   14,200 tokens/s on this kind of 2-core machine; figure from issue 5, not measured here).
2. --full: `dozero train` with no arguments (the preset as shipped), timed end to end in this
   process: wall time, validation loss at step 2000 on the preset's 20 batches (target <= 1.886,
   nanoGPT's in ~2 minutes) and on the whole validation split, and the run folder with loss.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from dozero import runtime
from dozero.config import get_model_config
from dozero.data.loader import RandomWindowLoader
from dozero.model.gpt import GPTModel
from dozero.train.config import get_train_preset
from dozero.train.corpus import load_corpus
from dozero.train.optim import make_optimizer
from dozero.train.step import Stepper

NANOGPT_TOKENS_PER_SECOND = 12 * 64 / 0.054  # 54 ms per 768-token iteration (issue 5's reference)
NANOGPT_VAL_LOSS, NANOGPT_SECONDS = 1.886, 120.0


class HFLogits(torch.nn.Module):
    """GPT2LMHeadModel seen as ids -> logits, so the same Stepper drives it."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf(input_ids=x).logits


def build(kind: str, cfg, corpus, device):
    torch.manual_seed(cfg.seed)
    shape = dataclasses.replace(get_model_config(cfg.model), vocab_size=corpus.tokenizer.vocab_size)
    if kind == "dozero":
        raw = GPTModel(shape)
        model = raw
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        from dozero.model.hf import config_to_hf

        # The same shape, GELU and dropout (0) as ours, through the exporter's config mapping.
        hf_cfg = GPT2Config(**config_to_hf(shape), attn_implementation="sdpa")
        raw = GPT2LMHeadModel(hf_cfg)
        model = HFLogits(raw)
    raw.train()
    optimizer = make_optimizer(raw, cfg, device)
    loader = RandomWindowLoader(corpus.train, cfg.micro_batch_size, shape.context_length, cfg.seed)
    return Stepper(model, raw, optimizer, loader, cfg, 1, device, torch.float32)


def run_steps(stepper: Stepper, index: dict, kind: str, n: int) -> float:
    """Seconds per step over `n` steps (the step counter goes on across rounds, as in training)."""
    start = time.perf_counter()
    for _ in range(n):
        loss, _ = stepper(index[kind])
        index[kind] += 1
    float(loss)  # make sure the work is done (a no-op sync on CPU)
    return (time.perf_counter() - start) / n


def step_times(args) -> None:
    cfg = get_train_preset("shakespeare-char")
    corpus = load_corpus(cfg)
    device = torch.device("cpu")
    tokens = cfg.micro_batch_size * get_model_config(cfg.model).context_length
    print(f"{runtime.describe_hardware(device)}; torch {torch.__version__}")
    print(f"step = {cfg.micro_batch_size} x 64 tokens, forward + backward + clip + AdamW\n")
    print(f"{'threads':>7}  {'dozero ms':>9}  {'HF ms':>7}  {'HF/dozero':>9}  {'dozero tok/s':>12}  {'vs nanoGPT':>10}")
    best = 0.0
    for threads in (1, 2):
        torch.set_num_threads(threads)
        steppers = {kind: build(kind, cfg, corpus, device) for kind in ("dozero", "hf")}
        index = {kind: 0 for kind in steppers}
        times: dict[str, list[float]] = {kind: [] for kind in steppers}
        for kind in steppers:  # warm-up
            run_steps(steppers[kind], index, kind, 5)
        for _ in range(args.rounds):
            for kind in steppers:
                times[kind].append(run_steps(steppers[kind], index, kind, args.steps))
        ours, hf = statistics.median(times["dozero"]), statistics.median(times["hf"])
        best = max(best, tokens / ours)
        print(
            f"{threads:>7}  {1e3 * ours:>9.1f}  {1e3 * hf:>7.1f}  {hf / ours:>9.2f}x  {tokens / ours:>12,.0f}  "
            f"{tokens / ours / NANOGPT_TOKENS_PER_SECOND:>9.2f}x"
        )
    print(f"\nbest dozero: {best:,.0f} tokens/s = {best / NANOGPT_TOKENS_PER_SECOND:.2f}x nanoGPT's reference")


def full_validation_loss(run_dir, cfg, corpus) -> float:
    """Loss of the run's final model over every non-overlapping window of the validation split: the
    20-batch estimate (nanoGPT's eval_iters at --device=cpu) moves by about +-0.01 with the batches drawn."""
    import torch.nn.functional as F

    from dozero.data.loader import SequentialWindowLoader
    from dozero.model.checkpoint import load_model

    model = load_model(f"{run_dir}/latest").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in SequentialWindowLoader(corpus.val, 64, model.cfg.context_length):  # x, y (B, T)
            total += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    return total / count


def full_run(args) -> None:
    from dozero.train.loop import train

    out = args.out_dir or tempfile.mkdtemp(prefix="dozero-train-bench-")
    cfg = dataclasses.replace(get_train_preset("shakespeare-char"), out_dir=out, seed=args.seed)
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    full = full_validation_loss(result.run_dir, cfg, load_corpus(cfg))
    print(
        f"\nfull run (seed {cfg.seed}): {result.step} steps in {wall:.1f} s wall ({result.tokens_per_second:,.0f} "
        f"tokens/s while training), validation loss {result.val_loss:.4f} on {cfg.eval_iters} batches, {full:.4f} on "
        f"the whole validation split (nanoGPT: {NANOGPT_VAL_LOSS} in ~{NANOGPT_SECONDS:.0f} s); wall-time ratio "
        f"nanoGPT/dozero {NANOGPT_SECONDS / wall:.2f}x; curve: {result.run_dir}/loss.png"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per model (default 7)")
    p.add_argument("--steps", type=int, default=20, help="steps per round (default 20)")
    p.add_argument("--full", action="store_true", help="also run the whole 2000-step preset, timed")
    p.add_argument("--out-dir", default="", help="run folder for --full (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=0, help="threads for --full (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, default=1337, help="seed for --full (default: the preset's 1337)")
    p.add_argument("--skip-steps", action="store_true", help="only the --full run")
    args = p.parse_args()
    if not args.skip_steps:
        step_times(args)
    if args.full:
        full_run(args)


if __name__ == "__main__":
    main()
