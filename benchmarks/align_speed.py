"""Alignment speed and memory: rollout tokens/s, and a DPO step with a precomputed vs a live reference.

    python benchmarks/align_speed.py                       # GPT-2 124M shape, random weights, CPU
    python benchmarks/align_speed.py --preset gpt2 --device cuda --rows 64
    python benchmarks/align_speed.py --smoke               # a tiny model: checks the script runs

Rollouts are the bottleneck of every public RL implementation (TRL, OpenRLHF and verl move them to
vLLM): the table gives dozero's batched KV-cache engine's tokens/s for `rows` = prompts x group size
sampled answers. For DPO, the reference's log-probs either come from a table computed once before
training (dozero's default) or from a forward pass of a live reference every step: a frozen copy for
full fine-tuning, or the same model with LoRA switched off. Each mode runs in its own process, so
its peak resident memory (CPU: ru_maxrss; CUDA: max_memory_allocated) is its own; the modes take
turns, `--rounds` times, so a shift in the machine's load hits them all (medians and ranges shown).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(preset: str, smoke: bool, device: str):
    from dozero.config import ModelConfig, get_model_config
    from dozero.model.gpt import GPTModel

    torch.manual_seed(0)
    cfg = (
        ModelConfig(vocab_size=512, context_length=128, emb_dim=64, n_heads=4, n_layers=2)
        if smoke
        else get_model_config(preset)
    )
    return GPTModel(cfg).to(device)


def rollout_speed(args) -> dict:
    from dozero.align.rollout import rollout
    from dozero.generate.config import GenerationConfig

    model = build(args.preset, args.smoke, args.device)
    prompts = [[int(t) for t in torch.randint(0, 500, (32,))] for _ in range(args.rows // args.group)]
    config = GenerationConfig(temperature=1.0, top_k=None, max_new_tokens=args.tokens, seed=0, stop_at_eot=False)
    rollout(model, prompts, args.group, GenerationConfig(temperature=1.0, max_new_tokens=2, seed=0), None)  # warm-up
    start = time.perf_counter()
    out = rollout(model, prompts, args.group, config, None)
    seconds = time.perf_counter() - start
    return {"rows": len(out), "tokens": sum(map(len, out)), "tokens_per_second": sum(map(len, out)) / seconds}


def dpo_step(args, mode: str) -> dict:
    """Mean seconds per DPO step (pairs x length tokens each side) and the process's peak memory."""
    import copy

    from dozero.align.dpo import dpo_loss
    from dozero.align.logprobs import sequence_logprobs
    from dozero.align.step import lora_disabled
    from dozero.finetune.lora import LoRAConfig, apply_lora

    model = build(args.preset, args.smoke, args.device)
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if mode == "live-copy" else None
    if mode in ("precomputed", "live-lora-off"):
        apply_lora(model, LoRAConfig(rank=8))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, 500, (2 * args.pairs, args.length), device=args.device)
    y = torch.roll(x, -1, dims=1)
    y[:, : args.length // 2] = -100  # the first half is the prompt
    ref = torch.randn(2 * args.pairs, device=args.device) - 50
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        logps = sequence_logprobs(model, x, y)
        if not mode.startswith("precomputed"):
            with torch.no_grad():
                if frozen is not None:
                    ref = sequence_logprobs(frozen, x, y)
                else:
                    with lora_disabled(model):
                        ref = sequence_logprobs(model, x, y)
        losses, _, _ = dpo_loss(*logps.chunk(2), *ref.chunk(2))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "seconds_per_step": sum(times[1:]) / args.steps, "peak_memory_mb": peak / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=32, help="answers sampled at once (prompts x group)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="times every mode is measured, taking turns")
    p.add_argument("--smoke", action="store_true", help="a tiny model and sizes, to check the script runs")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.group, args.tokens, args.pairs, args.length, args.steps, args.rounds = 8, 4, 8, 2, 32, 1, 1
    if args.only:
        result = rollout_speed(args) if args.only == "rollout" else dpo_step(args, args.only)
        print(json.dumps(result))
        return 0
    names = {
        "precomputed": "precomputed (LoRA)",
        "live-lora-off": "live, LoRA off (LoRA)",
        "precomputed-full": "precomputed (full)",
        "live-copy": "live frozen copy (full)",
    }
    runs = {name: [] for name in ("rollout", *names)}
    for _ in range(args.rounds):
        for only in runs:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", only]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            runs[only].append(json.loads(out))
    speeds = [r["tokens_per_second"] for r in runs["rollout"]]
    print(f"rollouts: {runs['rollout'][0]['rows']} answers x {args.tokens} tokens ({args.device}): median "
          f"{statistics.median(speeds):,.0f} tokens/s (range {min(speeds):,.0f}-{max(speeds):,.0f}, "
          f"{args.rounds} rounds)")  # fmt: skip
    print(f"{'DPO reference':<26} {'s/step (median, range)':>24} {'x precomputed':>14} {'peak MB':>9}")
    for mode, name in names.items():
        times = [r["seconds_per_step"] for r in runs[mode]]
        base = "precomputed-full" if mode == "live-copy" else "precomputed"
        ratios = [t / b["seconds_per_step"] for t, b in zip(times, runs[base], strict=True)]  # same round
        peak = max(r["peak_memory_mb"] for r in runs[mode])
        print(f"{name:<26} {statistics.median(times):>8.3f} ({min(times):.3f}-{max(times):.3f})"
              f" {statistics.median(ratios):>13.2f}x {peak:>9,.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
