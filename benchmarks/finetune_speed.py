"""Full fine-tuning vs LoRA on this CPU: trainable parameters, peak memory and step time.

    python benchmarks/finetune_speed.py                          # SmolLM2-135M and GPT-2 124M shapes
    python benchmarks/finetune_speed.py --steps 2 --tokens 64    # a smoke run

Each (shape, method) runs in a fresh process. Its peak memory is the peak resident memory during the
timed steps (Linux's VmHWM, reset after the warm-up step: building the float model before quantizing
it is not counted), above the process's memory after `import torch`. A step is dozero's Stepper
(forward, backward, clip, fused AdamW) on one sequence of --tokens random token ids, in float32; the
weights are random (speed and memory do not depend on their values). LoRA: rank 8, alpha 16, on qkv,
out_proj, fc and proj of every block (dozero finetune's defaults). qlora-int8 / qlora-int4: the same
LoRA over blocks quantized as `dozero finetune --quantize` does (embedding and head stay float).

    python benchmarks/finetune_speed.py --methods full,lora,qlora-int8,qlora-int4
    python benchmarks/finetune_speed.py --packing       # padded vs packed batches, interleaved in one process

Where LoRA saves memory: full fine-tuning holds the weights, their gradients and AdamW's two moments
(4 copies of every parameter, 16 bytes each in fp32); LoRA holds the frozen weights once plus the
four copies of its ~1-2% of trainable numbers. Activations are the same in both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def resident(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since the last reset_peak_memory) in bytes."""
    from dozero.runtime import resident_bytes

    value = resident_bytes(field)
    if value is None:
        raise RuntimeError(f"no {field} in /proc/self/status (the memory figures need Linux)")
    return value


def measure(shape: str, method: str, steps: int, tokens: int) -> dict:
    import dataclasses

    import torch

    from dozero.config import get_model_config
    from dozero.finetune.lora import LoRAConfig, apply_lora, trainable_parameters
    from dozero.model.gpt import GPTModel
    from dozero.runtime import reset_peak_memory
    from dozero.train.config import TrainConfig
    from dozero.train.optim import make_optimizer
    from dozero.train.step import Stepper

    base_rss = resident("VmRSS")
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_config(shape), context_length=max(tokens, 64))
    model = GPTModel(cfg)
    base_parameters = model.num_parameters()
    if method.startswith("qlora-"):
        from dozero.finetune.sft import quantize_base

        quantize_base(model, method.removeprefix("qlora-"))
    if method != "full":
        apply_lora(model, LoRAConfig())
    train_cfg = TrainConfig(micro_batch_size=1, lr=1e-4, warmup_steps=0)
    device = torch.device("cpu")
    optimizer = make_optimizer(model, train_cfg, device)

    class Random:
        def next_batch(self):
            x = torch.randint(0, cfg.vocab_size, (1, tokens + 1))
            return x[:, :-1], x[:, 1:]

    stepper = Stepper(model, model, optimizer, Random(), train_cfg, 1, device, torch.float32)
    stepper(0)  # the first step allocates AdamW's moments
    reset_peak_memory()
    start = time.perf_counter()
    for i in range(steps):
        stepper(i + 1)
    seconds = (time.perf_counter() - start) / steps
    peak = resident("VmHWM")
    return {
        "shape": shape,
        "method": method,
        "parameters": base_parameters + (trainable_parameters(model) if method != "full" else 0),
        "trainable": trainable_parameters(model),
        "peak_mib": (peak - base_rss) / 2**20,
        "step_s": seconds,
    }


def packing(shape: str, lengths: tuple[int, int], batch: int, window: int, steps: int, rounds: int) -> dict:
    """Seconds per LoRA step on the same `batch` conversations padded vs packed (rows of `window`),
    interleaved round by round in this process so the machine's load shifts both alike."""
    import dataclasses
    import random
    import statistics

    import torch

    from dozero.config import get_model_config
    from dozero.finetune.data import SFTLoader
    from dozero.finetune.lora import LoRAConfig, apply_lora
    from dozero.finetune.packing import PackedForward
    from dozero.model.gpt import GPTModel
    from dozero.train.config import TrainConfig
    from dozero.train.optim import make_optimizer
    from dozero.train.step import Stepper

    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_config(shape), context_length=window)
    rng = random.Random(0)
    conversations = []
    for _ in range(batch):
        n = rng.randint(*lengths)
        conversations.append(([rng.randrange(cfg.vocab_size) for _ in range(n)], [0] * (n // 2) + [1] * (n - n // 2)))
    model = apply_lora(GPTModel(cfg), LoRAConfig())
    train_cfg = TrainConfig(micro_batch_size=batch, lr=1e-4, warmup_steps=0)
    device = torch.device("cpu")
    steppers, positions = {}, {}
    for mode, w in (("pad", 0), ("pack", window)):
        loader = SFTLoader(conversations, batch, seed=0, pad_id=0, window=w)
        fixed = loader.next_batch()
        loader.next_batch = lambda fixed=fixed: fixed  # the same batch every step
        positions[mode] = loader.padded
        optimizer = make_optimizer(model, train_cfg, device)
        steppers[mode] = Stepper(PackedForward(model), model, optimizer, loader, train_cfg, 1, device, torch.float32)
        steppers[mode](0)  # warm-up: AdamW's moments, the kernels' first calls
    times = {"pad": [], "pack": []}
    for _ in range(rounds):
        for mode in ("pad", "pack"):
            start = time.perf_counter()
            for i in range(steps):
                steppers[mode](i + 1)
            times[mode].append((time.perf_counter() - start) / steps)
    real = sum(len(ids) - 1 for ids, _ in conversations)
    ratios = [a / b for a, b in zip(times["pad"], times["pack"], strict=True)]
    return {"shape": shape, "lengths": lengths, "batch": batch, "window": window, "real": real,
            "positions": positions, "pad_s": statistics.median(times["pad"]),
            "pack_s": statistics.median(times["pack"]), "ratio": statistics.median(ratios),
            "ratio_range": (min(ratios), max(ratios))}  # fmt: skip


def print_packing(args) -> None:
    print(f"LoRA steps (rank 8, fp32), {args.batch} conversations per batch, window {args.window}, "
          f"{args.steps} steps x {args.rounds} interleaved rounds; pad/pack > 1: packing is faster\n")  # fmt: skip
    print(f"{'shape':<18}{'lengths':>9}{'tokens':>8}{'pad pos':>9}{'pack pos':>9}{'pad s':>8}{'pack s':>8}"
          f"{'pad/pack':>10}  range")  # fmt: skip
    for shape in args.shapes.split(","):
        for span in args.lengths.split(","):
            lo, hi = (int(v) for v in span.split("-"))
            r = packing(shape, (lo, hi), args.batch, args.window, args.steps, args.rounds)
            print(f"{shape:<18}{span:>9}{r['real']:>8}{r['positions']['pad']:>9}{r['positions']['pack']:>9}"
                  f"{r['pad_s']:>8.3f}{r['pack_s']:>8.3f}{r['ratio']:>9.2f}x  "
                  f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}", flush=True)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m,gpt2", help="model shapes from dozero.config (default: both)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default: 5)")
    p.add_argument("--tokens", type=int, default=256, help="tokens in the sequence of each step (default: 256)")
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)  # the child process
    p.add_argument("--methods", default="full,lora,qlora-int8,qlora-int4", help="full, lora, qlora-int8, qlora-int4")
    p.add_argument("--packing", action="store_true", help="measure padded vs packed batches instead")
    p.add_argument("--lengths", default="20-80,20-400", help="--packing: conversation lengths lo-hi, comma-separated")
    p.add_argument("--batch", type=int, default=8, help="--packing: conversations per batch (default: 8)")
    p.add_argument("--window", type=int, default=1024, help="--packing: longest packed row (default: 1024)")
    p.add_argument("--rounds", type=int, default=5, help="--packing: interleaved rounds (default: 5)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.tokens < 1:
        p.error("--steps and --tokens must be >= 1")
    if args.packing:
        print_packing(args)
        return 0
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.tokens)))
        return 0
    rows = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            child = [sys.executable, __file__, "--one", shape, method, "--steps", str(args.steps)]
            out = subprocess.run(child + ["--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.tokens} tokens per step, float32, {args.steps} timed steps\n")
    print(f"{'shape':<18}{'method':<12}{'trainable':>14}{'of':>14}{'peak MiB':>11}{'step s':>9}  vs the first method")
    for r in rows:
        first = next(f for f in rows if f["shape"] == r["shape"])
        print(f"{r['shape']:<18}{r['method']:<12}{r['trainable']:>14,}{r['parameters']:>14,}"
              f"{r['peak_mib']:>11,.0f}{r['step_s']:>9.2f}  memory {r['peak_mib'] / first['peak_mib']:.0%}, "
              f"speed {first['step_s'] / r['step_s']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
