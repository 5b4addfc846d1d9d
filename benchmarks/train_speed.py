"""Training speed on the shakespeare-char recipe: dozero vs nanoGPT, run live, and Hugging Face.

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/train_speed.py                 # step times
    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/train_speed.py --to-loss       # + time to val 1.886
    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/train_speed.py --compile       # + compiled
    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/train_speed.py --no-hf --bf16 --compile  # + bf16
    .venv/bin/python benchmarks/train_speed.py --rounds 2 --steps 5 --warmup 2              # a quick check

nanoGPT is never copied into dozero: its own `model.py` (the GPT module and `configure_optimizers`)
and `train.py` are used from a checkout of karpathy/nanoGPT, by default `../shared/reference/nanogpt`
beside the repository (override: `--nanogpt DIR` or the NANOGPT_DIR environment variable). Without
one, the nanoGPT parts are skipped with a message. To get it:

    git clone https://github.com/karpathy/nanoGPT ../nanogpt   # then --nanogpt ../nanogpt

1. Step time (always). One process builds, with the same seed, on the same batches:
     dozero   GPTModel of the shakespeare-char shape, dozero's training Stepper (AdamW, clip 1.0)
     nanoGPT  its GPT (n_layer 4, n_head 4, n_embd 128, block_size 64, bias False, dropout 0), its
              configure_optimizers (weight decay 0.1, lr 1e-3, betas 0.9/0.99), and the body of its
              train.py loop on a CPU: forward with targets, backward, clip 1.0, step, zero_grad
     HF       transformers.GPT2LMHeadModel of the same shape and GELU, driven by dozero's Stepper
   Each draws 12 x 64-token windows from its own copy of the same seeded loader, so step i sees the
   same batch in all three. After --warmup untimed steps each, --rounds rounds run a block of
   --steps steps of each model in turn (the order rotates every round, so a drift in the machine's
   load falls on all of them); each block's ms/step is printed, then the medians and the median of
   the per-round ratios nanoGPT ms / dozero ms (above 1: dozero is faster).
2. --to-loss: time to nanoGPT's validation loss. nanoGPT's own train.py (its README's CPU recipe) and
   `dozero train --preset shakespeare-char-fast` (the same model and data; Muon, a higher lr, 600 steps:
   see dozero/train/config.py) run back to back as child processes on the same characters (dozero's 90/10
   split written as nanoGPT's train.bin/val.bin). Each one's eval lines ("step N: ... val loss X") are
   timed as they arrive: the time to the first val loss <= 1.886 (the figure nanoGPT's recipe reaches at
   step 2000) from the process's start (imports included; the first output's time is printed), the whole
   run's wall time, and the ratio nanoGPT time / dozero time. dozero's run is the command as a user types
   it: its evaluations (with their sample, checkpoint and loss.png) are inside the timed run.
   --dozero-args replaces the dozero flags (e.g. '--preset shakespeare-char' for the default recipe).
3. --compile (with 1): both models also compiled, torch.compile(model) (nanoGPT's train.py compiles by
   default); the first step's time (the compile) is printed, the compiled pair compared with each other.
4. --bf16 (with 1): both models also under bfloat16 autocast, float32 weights and AdamW states: dozero as
   `dozero train --dtype bfloat16` runs it (on a CPU its attention stays float32: train/step.py), nanoGPT's
   forward under torch.autocast, as its train.py's `ctx` on a GPU (on a CPU its train.py runs float32). Two
   ratios: nanoGPT as its train.py runs on a CPU (float32) / dozero bf16, and nanoGPT bf16 / dozero bf16.
   With --compile too: the compiled pair in bf16, and nanoGPT float32 (eager, as its README's CPU recipe
   runs, and compiled) / dozero compiled bf16.
5. --breakdown (with 1): dozero's and nanoGPT's float32 steps under torch.profiler, in interleaved rounds,
   by kind of kernel (matrix products, attention, GELU, LayerNorm, AdamW, other kernels, the time outside
   them); the step's product FLOPs (torch.utils.flop_counter) and a 2048x2048 product's rate in the same
   run; and what 1.5x nanoGPT's step would leave for everything but the products at that rate, beside
   what the rest takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from dozero import runtime
from dozero.config import get_model_config
from dozero.data.loader import RandomWindowLoader
from dozero.model.gpt import GPTModel
from dozero.train.config import get_train_preset
from dozero.train.corpus import load_corpus
from dozero.train.optim import lr_at, make_optimizer, set_lr
from dozero.train.step import Stepper

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NANOGPT = REPO.parent / "shared" / "reference" / "nanogpt"
TARGET_VAL_LOSS = 1.886  # nanoGPT's CPU recipe at step 2000 (1.8857 on this project's machines)
CPU = torch.device("cpu")
DOZERO_TO_LOSS = "--preset shakespeare-char-fast"
EVAL_LINE = re.compile(r"^step (\d+): .*?val loss (\d+\.\d+)")


def nanogpt_dir(flag: str) -> Path | None:
    """The nanoGPT checkout to use, or None (with the reason printed) when there is none."""
    folder = Path(flag or os.environ.get("NANOGPT_DIR") or DEFAULT_NANOGPT).expanduser()
    if not (folder / "model.py").is_file():
        print(f"nanoGPT not found at {folder} (no model.py): the nanoGPT comparison is skipped.")
        print("Get it with `git clone https://github.com/karpathy/nanoGPT` and pass --nanogpt DIR.\n")
        return None
    return folder


def import_nanogpt(folder: Path):
    """nanoGPT's model.py as a module named `nanogpt_model` (its own name, `model`, is too generic)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- 1. step time ------------------------------------------------------------------------------


class HFLogits(torch.nn.Module):
    """GPT2LMHeadModel seen as ids -> logits, so the same Stepper drives it."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf(input_ids=x).logits


def dozero_step(cfg, corpus, shape, compile_model=False, dtype=torch.float32):
    """dozero's model and training Stepper; compiled: the forward is torch.compile(model), as
    `dozero train --compile` runs it (the Stepper then clips and steps the plain model's parameters).
    dtype bfloat16: `dozero train --dtype bfloat16` (autocast; float32 weights and AdamW states)."""
    torch.manual_seed(cfg.seed)
    model = GPTModel(shape).train()
    loader = RandomWindowLoader(corpus.train, cfg.micro_batch_size, shape.context_length, cfg.seed)
    forward = torch.compile(model) if compile_model else model
    stepper = Stepper(forward, model, make_optimizer(model, cfg, CPU), loader, cfg, 1, CPU, dtype)
    return model, lambda index: stepper(index)[0]


def hf_step(cfg, corpus, shape):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dozero.model.hf import config_to_hf

    torch.manual_seed(cfg.seed)
    # The same shape, GELU and dropout (0) as dozero's, through the exporter's config mapping.
    raw = GPT2LMHeadModel(GPT2Config(**config_to_hf(shape), attn_implementation="sdpa")).train()
    loader = RandomWindowLoader(corpus.train, cfg.micro_batch_size, shape.context_length, cfg.seed)
    stepper = Stepper(HFLogits(raw), raw, make_optimizer(raw, cfg, CPU), loader, cfg, 1, CPU, torch.float32)
    return raw, lambda index: stepper(index)[0]


def nanogpt_step(cfg, corpus, shape, nanogpt, compile_model=False, dtype=torch.float32):
    """nanoGPT's model and optimizer, and its train.py loop body as it runs on a CPU (no autocast; the
    GradScaler is disabled there, so scaler.step is optimizer.step). The learning rate follows its
    cosine schedule (dozero's formula; the lr value does not change a step's time). compile_model:
    `model = torch.compile(model)`, what its train.py does with compile=True (its default). dtype
    bfloat16: its forward under `torch.autocast(device_type, dtype)`, its train.py's `ctx` on a GPU
    (on a CPU that train.py uses a nullcontext: float32)."""
    torch.manual_seed(cfg.seed)
    conf = nanogpt.GPTConfig(
        block_size=shape.context_length,
        vocab_size=shape.vocab_size,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        n_embd=shape.emb_dim,
        dropout=0.0,
        bias=False,
    )
    with redirect_stdout(StringIO()):  # it prints its parameter counts
        model = nanogpt.GPT(conf).train()
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), "cpu")
    loader = RandomWindowLoader(corpus.train, cfg.micro_batch_size, shape.context_length, cfg.seed)
    cosine = dataclasses.replace(cfg, schedule="cosine")
    forward = torch.compile(model) if compile_model else model

    def step(index: int) -> torch.Tensor:
        set_lr(optimizer, lr_at(index, cosine))
        x, y = loader.next_batch()  # (B, T) each
        with runtime.autocast(CPU, dtype):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def time_block(step, start: int, n: int) -> float:
    """Milliseconds per step over steps start .. start+n-1."""
    begin = time.perf_counter()
    for index in range(start, start + n):
        loss = step(index)
    float(loss)  # the work is done (a no-op sync on CPU, a real one elsewhere)
    return 1e3 * (time.perf_counter() - begin) / n


def build_all(args, cfg, corpus, shape) -> dict:
    """name -> (model, step function), each built from the same seed. With --compile, also both
    models compiled (nanoGPT's train.py compiles by default), so each is compared with its like."""
    runners = {"dozero": dozero_step(cfg, corpus, shape)}
    folder = nanogpt_dir(args.nanogpt)
    nanogpt = import_nanogpt(folder) if folder is not None else None
    if nanogpt is not None:
        runners["nanoGPT"] = nanogpt_step(cfg, corpus, shape, nanogpt)
    if not args.no_hf:
        runners["HF"] = hf_step(cfg, corpus, shape)
    if args.compile:
        runners["dozero+c"] = dozero_step(cfg, corpus, shape, compile_model=True)
        if nanogpt is not None:
            runners["nanoGPT+c"] = nanogpt_step(cfg, corpus, shape, nanogpt, compile_model=True)
    if args.bf16:
        bf16 = torch.bfloat16
        runners["dozero+bf16"] = dozero_step(cfg, corpus, shape, dtype=bf16)
        if nanogpt is not None:
            runners["nanoGPT+bf16"] = nanogpt_step(cfg, corpus, shape, nanogpt, dtype=bf16)
        if args.compile:
            runners["dozero+c+bf16"] = dozero_step(cfg, corpus, shape, compile_model=True, dtype=bf16)
            if nanogpt is not None:
                runners["nanoGPT+c+bf16"] = nanogpt_step(cfg, corpus, shape, nanogpt, compile_model=True, dtype=bf16)
    return runners


def step_times(args) -> None:
    cfg = get_train_preset("shakespeare-char")
    corpus = load_corpus(cfg)
    shape = dataclasses.replace(get_model_config(cfg.model), vocab_size=corpus.tokenizer.vocab_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = cfg.micro_batch_size * shape.context_length
    print(f"{runtime.describe_hardware(torch.device('cpu'))}; torch {torch.__version__}")
    runners = build_all(args, cfg, corpus, shape)
    names = list(runners)
    for name, (model, step) in runners.items():
        n_params = sum(p.numel() for p in model.parameters())
        begin = time.perf_counter()
        first = float(step(0))  # the same batch for all: about ln(65) = 4.17 from a fresh init
        took = time.perf_counter() - begin  # compiled: the compile of forward and backward (not in the ms/step)
        print(f"{name:>14}: {n_params:,} parameters, first loss {first:.3f}, first step {took:.1f} s")
    print(f"step = {cfg.micro_batch_size} x {shape.context_length} tokens: forward, backward, clip, AdamW")
    print(f"{args.warmup} warm-up steps each, then {args.rounds} rounds of {args.steps} steps each; ms/step:\n")
    for _, step in runners.values():
        for index in range(1, 1 + args.warmup):
            step(index)
    times: dict[str, list[float]] = {name: [] for name in names}
    index = 1 + args.warmup
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(time_block(runners[name][1], index, args.steps))
        index += args.steps
        cells = "  ".join(f"{name} {times[name][-1]:6.1f}" for name in names)
        ratios = "".join(
            f"  {other}/{mine} {times[other][-1] / times[mine][-1]:.2f}x"
            for other, mine in PAIRS
            if other in times and mine in times and other != "HF"
        )
        print(f"round {r + 1:>2}: {cells}{ratios}")
    summarize(times, tokens)
    if args.breakdown:
        breakdown({name: runners[name][1] for name in ("dozero", "nanoGPT") if name in runners}, index, times)


PAIRS = (
    ("nanoGPT", "dozero"),
    ("HF", "dozero"),
    ("nanoGPT+c", "dozero+c"),
    ("nanoGPT", "dozero+bf16"),
    ("nanoGPT+bf16", "dozero+bf16"),
    ("nanoGPT", "dozero+c+bf16"),
    ("nanoGPT+c", "dozero+c+bf16"),
    ("nanoGPT+c+bf16", "dozero+c+bf16"),
)
"""The ratios printed: each model against dozero run the same way (eager with eager, compiled with compiled,
bf16 autocast with bf16 autocast), and nanoGPT as its train.py runs on a CPU (float32) against dozero's bf16."""


def summarize(times: dict[str, list[float]], tokens: int) -> None:
    print()
    for name, ms in times.items():
        median = statistics.median(ms)
        spread = f"{min(ms):.1f}-{max(ms):.1f}"
        print(f"{name:>14}: median {median:.1f} ms/step ({spread}), {1e3 * tokens / median:,.0f} tokens/s")
    for other, mine in PAIRS:
        if other in times and mine in times:
            ratios = [o / d for o, d in zip(times[other], times[mine], strict=True)]
            print(
                f"{other}/{mine} ms per step: median {statistics.median(ratios):.2f}x "
                f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x; above 1: dozero is faster)"
            )


KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("scaled_dot_product",),
    "GELU": ("aten::gelu",),
    "LayerNorm": ("layer_norm",),
    "AdamW": ("adamw",),
}
"""What the breakdown sums: products by their exact op names, the rest by a part of the name."""
NOT_KERNELS = ("matrix products", "outside kernels", "whole step (profiled)")
"""The breakdown's rows that are not the rest's kernels."""


def kind_of(op: str) -> str:
    if op in KINDS["matrix products"]:
        return "matrix products"
    others = ((kind, parts) for kind, parts in KINDS.items() if kind != "matrix products")
    return next((kind for kind, parts in others if any(part in op for part in parts)), "other kernels")


def profile_step(step, start: int, n: int) -> dict[str, float]:
    """ms a step in each kind of PyTorch kernel (self times of aten ops, so none is counted twice), and the
    wall time left outside them (Python, the autograd engine, the profiler's own cost)."""
    from torch.profiler import profile

    begin = time.perf_counter()
    with profile() as prof:
        for index in range(start, start + n):
            step(index)
    wall = 1e3 * (time.perf_counter() - begin) / n
    ms = dict.fromkeys([*KINDS, "other kernels"], 0.0)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ms[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / n
    ms["outside kernels"] = wall - sum(ms.values())
    ms["whole step (profiled)"] = wall
    return ms


def product_flops(step, index: int) -> float:
    """FLOPs of one step's matrix products, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(index)
    counts = counter.get_flop_counts()["Global"]
    return float(sum(flops for op, flops in counts.items() if str(op) in ("aten.mm", "aten.addmm", "aten.bmm")))


def float32_rate(size: int = 2048, repeats: int = 5) -> float:
    """This CPU's float32 matrix-product rate right now, GFLOP/s: the best of a few square products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def timed(work) -> float:
    begin = time.perf_counter()
    work()
    return time.perf_counter() - begin


def breakdown(steps: dict, index: int, times: dict[str, list[float]], rounds: int = 5, n: int = 10) -> None:
    """--breakdown: where a float32 step goes, dozero's and nanoGPT's, and what 1.5x nanoGPT would leave
    for everything but the matrix products if every product ran at this CPU's best float32 rate. Profiled
    in interleaved rounds, like the step times (the machine's load drifts); each figure is a median."""
    flops = product_flops(steps["dozero"], index)
    profiles: dict[str, list[dict]] = {name: [] for name in steps}
    rates = []
    for r in range(rounds):
        rates.append(float32_rate())
        for name, step in steps.items():
            profiles[name].append(profile_step(step, index + 1 + r * n, n))
    rate = statistics.median(rates)
    rows = {
        name: {kind: statistics.median(p[kind] for p in runs) for kind in runs[0]} for name, runs in profiles.items()
    }
    print(f"\nwhere a float32 step goes (torch.profiler, {rounds} rounds of {n} steps each; medians), ms a step:")
    print(f"{'':>24}" + "".join(f"{name:>10}" for name in rows))
    for kind in next(iter(rows.values())):
        print(f"{kind:>24}" + "".join(f"{row[kind]:10.1f}" for row in rows.values()))
    products = rows["dozero"]["matrix products"]
    print(
        f"dozero's products: {flops / 1e9:.2f} GFLOP a step (torch.utils.flop_counter) at {flops / products / 1e6:.0f} "
        f"GFLOP/s; a 2048x2048 float32 product runs at {rate:.0f} GFLOP/s in this run (median)"
    )
    if "nanoGPT" in times:
        # The rest of a step: its median unprofiled time (the rounds) minus its products' profiled time, so
        # the profiler's own cost is not counted in it.
        rest = {name: statistics.median(times[name]) - row["matrix products"] for name, row in rows.items()}
        kernels = {name: sum(v for k, v in row.items() if k not in NOT_KERNELS) for name, row in rows.items()}
        target, floor = statistics.median(times["nanoGPT"]) / 1.5, flops / rate / 1e6
        print(
            f"1.5x nanoGPT's median step is {target:.1f} ms. Every product at {rate:.0f} GFLOP/s would take "
            f"{floor:.1f} ms, leaving {target - floor:.1f} ms for the rest of the step. The rest takes "
            + " and ".join(f"{rest[name]:.1f} ms in {name}'s step" for name in rows)
            + " (its median minus its products); PyTorch's kernels in it, without the Python around them, "
            + " and ".join(f"{kernels[name]:.1f}" for name in rows)
        )


# ---- 2. time to nanoGPT's validation loss ------------------------------------------------------


def write_nanogpt_data(folder: Path, corpus) -> None:
    """nanoGPT's data/shakespeare_char: the same 90/10 character split as dozero's, as uint16 ids
    (its prepare script's format). meta.pkl carries only the vocabulary size, which its train.py reads."""
    import pickle

    folder.mkdir(parents=True)
    np.asarray(corpus.train, dtype=np.uint16).tofile(folder / "train.bin")
    np.asarray(corpus.val, dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": corpus.tokenizer.vocab_size}, f)


def nanogpt_command(folder: Path, steps: int, eval_interval: int) -> list[str]:
    """nanoGPT's README CPU recipe for shakespeare_char, with config/train_shakespeare_char.py's
    settings spelled out (that file is not needed)."""
    recipe = dict(
        device="cpu", compile=False, eval_iters=20, log_interval=1, block_size=64, batch_size=12, n_layer=4,
        n_head=4, n_embd=128, max_iters=steps, lr_decay_iters=steps, dropout=0.0,
        # config/train_shakespeare_char.py:
        out_dir="out-shakespeare-char", eval_interval=eval_interval, always_save_checkpoint=False,
        dataset="shakespeare_char", gradient_accumulation_steps=1, learning_rate=1e-3, min_lr=1e-4,
        beta2=0.99, warmup_iters=100,
    )  # fmt: skip
    return [sys.executable, "-u", str(folder / "train.py"), *(f"--{k}={v}" for k, v in recipe.items())]


def timed_run(name: str, command: list[str], cwd: Path, env: dict) -> dict:
    """Run `command`, timing its eval lines from the process's start."""
    start = time.perf_counter()
    evals, reached, first_line = [], None, None
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            if first_line is None:  # imports done: what the process's start costs before any work
                first_line = time.perf_counter() - start
                print(f"  {name}: first output at {first_line:.1f} s", flush=True)
            match = EVAL_LINE.match(line)
            if match:
                step, loss, at = int(match.group(1)), float(match.group(2)), time.perf_counter() - start
                evals.append((step, loss, at))
                print(f"  {name}: step {step:>5}  val loss {loss:.4f}  at {at:6.1f} s", flush=True)
                if reached is None and loss <= TARGET_VAL_LOSS:
                    reached = at
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} exited {proc.returncode}: {' '.join(command)}")
    return {"wall": wall, "reached": reached, "final": evals[-1][1] if evals else float("nan")}


def time_to_loss(args) -> None:
    folder = nanogpt_dir(args.nanogpt)
    if folder is None:
        return
    cfg = get_train_preset("shakespeare-char")
    corpus = load_corpus(cfg)
    work = Path(tempfile.mkdtemp(prefix="dozero-train-bench-"))
    write_nanogpt_data(work / "data" / "shakespeare_char", corpus)
    (work / "configurator.py").symlink_to(folder / "configurator.py")  # train.py execs it from its cwd
    env = dict(os.environ, TQDM_DISABLE="1")
    # dozero's run is `dozero train` as a user types it: its preset's steps, evaluations (each with its
    # sample, checkpoint and loss.png, all inside the timed run) and logging; --dozero-args changes them.
    dozero = [sys.executable, "-u", "-m", "dozero", "train", "--out-dir", str(work / "runs" / "dozero")]
    dozero += shlex.split(args.dozero_args)
    commands = {"nanoGPT": nanogpt_command(folder, args.to_loss_steps, args.eval_interval), "dozero": dozero}
    print(
        f"\ntime to val loss <= {TARGET_VAL_LOSS}, back to back: nanoGPT {args.to_loss_steps} steps "
        f"(eval every {args.eval_interval}), then `{shlex.join(dozero[3:])}` (folder {work}):"
    )
    results = {name: timed_run(name, command, work, env) for name, command in commands.items()}
    for name, r in results.items():
        reached = f"{r['reached']:.1f} s" if r["reached"] is not None else "not reached"
        print(
            f"{name:>8}: to {TARGET_VAL_LOSS}: {reached}; whole run {r['wall']:.1f} s, final val loss {r['final']:.4f}"
        )
    n, d = results["nanoGPT"], results["dozero"]
    if n["reached"] is not None and d["reached"] is not None:
        print(f"time to {TARGET_VAL_LOSS}: nanoGPT / dozero = {n['reached'] / d['reached']:.2f}x (goal: 2x)")
    print(f"whole run: nanoGPT / dozero = {n['wall'] / d['wall']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--steps", type=int, default=20, help="steps per model per round (default 20)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per model first (default 10)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the step times (default: PyTorch's)")
    p.add_argument("--no-hf", action="store_true", help="leave out Hugging Face's model")
    p.add_argument("--compile", action="store_true", help="also time dozero and nanoGPT with torch.compile(model)")
    p.add_argument(
        "--bf16", action="store_true", help="also time dozero and nanoGPT under bfloat16 autocast (float32 weights)"
    )
    p.add_argument(
        "--breakdown", action="store_true", help="also profile dozero's and nanoGPT's float32 steps by kind of kernel"
    )
    p.add_argument("--nanogpt", default="", help=f"nanoGPT checkout (default: $NANOGPT_DIR or {DEFAULT_NANOGPT})")
    p.add_argument("--to-loss", action="store_true", help="also time both full runs to nanoGPT's val loss")
    p.add_argument("--skip-steps", action="store_true", help="only the --to-loss runs")
    p.add_argument("--to-loss-steps", type=int, default=2000, help="--to-loss: nanoGPT's steps (default 2000)")
    p.add_argument("--eval-interval", type=int, default=250, help="--to-loss: nanoGPT's steps between evals (250)")
    p.add_argument(
        "--dozero-args", default=DOZERO_TO_LOSS, help=f"--to-loss: `dozero train` flags (default '{DOZERO_TO_LOSS}')"
    )
    args = p.parse_args()
    if min(args.rounds, args.steps, args.to_loss_steps, args.eval_interval) < 1 or args.warmup < 0:
        p.error("--rounds, --steps, --to-loss-steps and --eval-interval must be >= 1, --warmup >= 0")
    if not args.skip_steps:
        step_times(args)
    if args.to_loss:
        time_to_loss(args)


if __name__ == "__main__":
    main()
