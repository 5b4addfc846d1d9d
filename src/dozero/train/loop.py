"""The pretraining loop: next-token prediction, AdamW, schedule, evaluation, checkpoints.

    from dozero.train import train, get_train_preset
    result = train(get_train_preset("shakespeare-char"))       # what `dozero train` runs
    result.val_loss, result.run_dir

One optimizer step (course chapter 5; nanoGPT train.py):
    for each of `accum` micro-batches:  logits = model(x); loss = cross_entropy(logits, y); loss/accum backward
    clip the gradient norm; set the learning rate for this step; AdamW step; zero the gradients.
Every `eval_interval` steps: validation loss and perplexity, a sampled line of text, loss.png, and
a checkpoint (latest/, best/ if improved). The loss of every step is kept on the device and read
in groups of `log_interval` (one host sync per group instead of one per step).

Legend for shapes: B micro-batch size, T context length, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dozero import runtime
from dozero.config import ModelConfig, get_model_config
from dozero.errors import DozeroError
from dozero.files import write_json
from dozero.model.gpt import GPTModel
from dozero.train.checkpoint import find_resume_point, load_trainer_state, save_checkpoint
from dozero.train.config import TrainConfig
from dozero.train.corpus import load_corpus
from dozero.train.observe import RunObserver, flops_per_token
from dozero.train.optim import make_optimizer
from dozero.train.step import Stepper

CONFIG_FILE = "train_config.json"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    """Optimizer steps done (in this and earlier sessions of the run)."""
    losses: dict[int, float] = field(default_factory=dict)
    """Train loss of each step run in this session, by step number (1-based)."""
    val_loss: float | None = None
    best_val_loss: float | None = None
    stopped: str = "done"
    """'done', 'stop_after', or the name of the signal that stopped the run (SIGINT, SIGTERM)."""
    tokens_per_second: float = 0.0
    seconds: float = 0.0


def choose_run_dir(out_dir: str) -> Path:
    """`out_dir`, or `out_dir-2`, `-3`... if a run already lives there (never overwrite a run)."""
    base = Path(out_dir)
    candidate, n = base, 1
    while (candidate / CONFIG_FILE).exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def read_run_config(run_dir: Path) -> tuple[TrainConfig, ModelConfig]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DozeroError(f"--resume {run_dir}: no {CONFIG_FILE} there; is it a dozero run folder?")
    saved = json.loads(path.read_text())
    return TrainConfig.from_dict(saved["train"]), ModelConfig.from_dict(saved["model"])


def train(
    cfg: TrainConfig, model_overrides: dict | None = None, resume: str | Path | None = None, quiet: bool = False
) -> TrainResult:
    """Train per `cfg` (model shape: `cfg.model` plus `model_overrides`), or continue the run in
    folder `resume` (its saved settings; `cfg` may change max_steps and the like)."""
    cfg.validate()
    device = runtime.pick_device(cfg.device)
    distributed = runtime.init_distributed(device)
    try:
        return _train(cfg, model_overrides or {}, resume, device, quiet)
    finally:
        if distributed:
            runtime.destroy_distributed()


def _train(cfg: TrainConfig, model_overrides: dict, resume, device: torch.device, quiet: bool) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the float32 parts (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    main = runtime.is_main()
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg)
    tokenizer = corpus.tokenizer

    if resume:
        run_dir = Path(resume)
        _, model_cfg = read_run_config(run_dir)
    else:
        run_dir = choose_run_dir(cfg.out_dir) if main else Path(cfg.out_dir)
        base = get_model_config(cfg.model)
        model_cfg = dataclasses.replace(base, **{**model_overrides, "vocab_size": tokenizer.vocab_size})
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise DozeroError(f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the tokenizer's")
    T = model_cfg.context_length
    world = runtime.world_size()
    tokens_per_micro_step = cfg.micro_batch_size * T * world
    accum = 1
    if cfg.global_batch_tokens:
        if cfg.global_batch_tokens % tokens_per_micro_step:
            raise DozeroError(
                f"--global-batch-tokens {cfg.global_batch_tokens:,} is not a multiple of micro_batch_size x "
                f"context_length x processes = {cfg.micro_batch_size} x {T} x {world} = {tokens_per_micro_step:,}"
            )
        accum = cfg.global_batch_tokens // tokens_per_micro_step
    tokens_per_step = accum * tokens_per_micro_step

    raw_model = GPTModel(model_cfg).to(device)
    optimizer = make_optimizer(raw_model, cfg, device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    scaler = runtime.grad_scaler(device, dtype)
    from dozero.data.loader import RandomWindowLoader

    loader_device = device if device.type != "cpu" else None
    loader = RandomWindowLoader(corpus.train, cfg.micro_batch_size, T, cfg.seed, runtime.rank(), world, loader_device)

    step, best_val = 0, None
    if resume:
        from dozero.model.checkpoint import load_model

        folder = find_resume_point(run_dir)
        raw_model.load_state_dict(load_model(folder).state_dict())
        state = load_trainer_state(folder, optimizer)
        step, best_val = state["step"], state.get("best_val_loss")
        loader.load_state_dict(state["loader"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
    if step >= cfg.max_steps:
        raise DozeroError(f"{run_dir} already ran {step} of {cfg.max_steps} steps; give a larger --max-steps to go on")
    if main:  # on resume too, so flags given with --resume (a larger --max-steps) hold for the next resume
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG_FILE, {"train": cfg.to_dict(), "model": model_cfg.to_dict()}, indent=1)

    model = torch.compile(raw_model) if cfg.compile else raw_model
    model = runtime.wrap_ddp(model, device)
    observer = RunObserver(run_dir, main, cfg.max_steps, step, show=not quiet, tensorboard=cfg.tensorboard)
    n_params = raw_model.num_parameters()
    fpt = flops_per_token(n_params, model_cfg.n_layers, model_cfg.emb_dim, T)
    peak = runtime.peak_flops(device)
    observer.write(
        f"training {n_params:,} parameters on {runtime.describe_hardware(device)}, {tokens_per_step:,} tokens/step "
        f"({cfg.micro_batch_size} x {T} x {world} processes x {accum} accumulation), run folder {run_dir}"
    )

    train_step = Stepper(model, raw_model, optimizer, loader, cfg, accum, device, dtype, scaler)

    stop_signal: list[str] = []
    previous_handlers = _install_stop_handlers(stop_signal)
    result = TrainResult(run_dir=run_dir, step=step, best_val_loss=best_val)
    pending: list[tuple[int, torch.Tensor, float, bool]] = []
    timer = {"start": time.perf_counter(), "steps": 0, "train_seconds": 0.0, "session_start": time.perf_counter()}

    def flush() -> None:
        """Read the pending losses from the device (mean over ranks), log them, and stop on NaN/inf."""
        if not pending:
            return
        values = runtime.all_reduce_mean(torch.stack([p[1] for p in pending]).float()).tolist()
        records = []
        for (s, _, lr, applied), value in zip(pending, values, strict=True):
            finite = math.isfinite(value)
            records.append({"step": s, "loss": value if finite else None, "lr": lr})
            if not applied:
                records[-1]["skipped"] = True
            if finite:
                result.losses[s] = value
            elif cfg.on_nan == "stop":
                observer.log(records)
                raise DozeroError(
                    f"the training loss became {value} at step {s}; stopped without writing a checkpoint "
                    f"(the last good one is in {run_dir}/latest, if any). Lower --lr, check the data, or pass "
                    "--on-nan skip to skip such steps"
                )
        pending.clear()
        elapsed = time.perf_counter() - timer["start"]
        timer["train_seconds"] += elapsed
        tokens_per_second = timer["steps"] * tokens_per_step / max(elapsed, 1e-9)
        result.tokens_per_second = tokens_per_second
        postfix = {"loss": f"{values[-1]:.4f}", "tok/s": f"{tokens_per_second:,.0f}"}
        record = {"step": s, "tokens_per_second": round(tokens_per_second, 1)}
        if peak:
            mfu = fpt * tokens_per_second / (peak * world)
            postfix["mfu"] = f"{100 * mfu:.1f}%"
            record["mfu"] = round(mfu, 4)
        observer.log(records + [record])
        observer.progress(s, **postfix)
        timer["start"], timer["steps"] = time.perf_counter(), 0

    def save(at_step: int, is_best: bool, val_loss: float | None) -> None:
        if main:
            trainer_state = {
                "loader": loader.state_dict(),
                "rng": runtime.rng_state(),
                "best_val_loss": result.best_val_loss,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "tokens_seen": at_step * tokens_per_step,
            }
            metadata = {"train": {"step": at_step, "val_loss": val_loss, "preset": cfg.preset}}
            save_checkpoint(
                run_dir, at_step, raw_model, tokenizer, optimizer, trainer_state, metadata, is_best, cfg.keep_last
            )
        runtime.barrier()

    oom = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))
    try:
        while step < cfg.max_steps:
            try:
                loss, applied = train_step(step)
            except oom as e:
                raise DozeroError(
                    f"out of memory at step {step + 1} with --micro-batch-size {cfg.micro_batch_size}: use a smaller "
                    "micro-batch; set --global-batch-tokens to keep the same batch through gradient accumulation"
                ) from e
            step += 1
            timer["steps"] += 1
            pending.append((step, loss, optimizer.param_groups[0]["lr"], applied))
            evaluate_now = step % cfg.eval_interval == 0 or step == cfg.max_steps
            # Ranks agree on a stop signal only at log steps: under DDP the check is an all-reduce and a sync.
            at_log_step = step % cfg.log_interval == 0
            signalled = at_log_step and runtime.any_rank_true(bool(stop_signal), device)
            stop_now = signalled or step == cfg.stop_after
            if at_log_step or evaluate_now or stop_now:
                flush()
            if evaluate_now:
                val_loss = evaluate(raw_model, corpus.val, cfg, T, device, dtype)
                result.val_loss = val_loss
                is_best = result.best_val_loss is None or val_loss < result.best_val_loss
                if is_best:
                    result.best_val_loss = val_loss
                record = {"step": step, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}
                observer.log([record])
                line = f"step {step}: train loss {result.losses.get(step, math.nan):.4f}, val loss {val_loss:.4f}"
                if cfg.sample_tokens and main:
                    line += " | " + sample_text(raw_model, tokenizer, cfg, device, cfg.sample_tokens).replace("\n", " ")
                observer.write(line)
                observer.plot()
                save(step, is_best, val_loss)
            elif stop_now:
                save(step, False, None)
            if stop_now:
                result.stopped = stop_signal[0] if stop_signal else "stop_after"
                observer.write(f"stopped at step {step} ({result.stopped}); resume: dozero train --resume {run_dir}")
                break
            if evaluate_now:
                timer["start"], timer["steps"] = time.perf_counter(), 0  # evaluation time is not training speed
    finally:
        _restore_handlers(previous_handlers)
        observer.close()
    result.step = step
    result.seconds = time.perf_counter() - timer["session_start"]
    if timer["train_seconds"] > 0:
        session_steps = len(result.losses)
        result.tokens_per_second = session_steps * tokens_per_step / timer["train_seconds"]
    last = [result.losses[s] for s in sorted(result.losses)[-cfg.log_interval :]]
    summary = {
        "stopped": result.stopped,
        "val_loss": result.val_loss,
        "best_val_loss": result.best_val_loss,
        "tokens_per_second": result.tokens_per_second,
        "train_loss": sum(last) / len(last) if last else math.nan,
        "train_window": len(last),
    }
    observer.write_report(
        cfg=cfg,
        model_cfg=model_cfg,
        n_params=n_params,
        hardware=runtime.describe_hardware(device),
        source=corpus.source,
        steps=step,
        tokens=step * tokens_per_step,
        seconds=result.seconds,
        summary=summary,
    )
    return result


@torch.no_grad()
def evaluate(model: GPTModel, tokens, cfg: TrainConfig, T: int, device, dtype) -> float:
    """Mean loss on `eval_iters` batches of validation windows. The windows are drawn with a fixed
    seed, so every evaluation of the run scores the same text (comparable numbers, no drift from
    sampling noise), and the training RNG is left untouched. Under DDP each rank scores its share of
    every global batch, as in training, so N ranks x B sequences score the same windows as one
    process x N*B, in 1/N of the time."""
    from dozero.data.loader import RandomWindowLoader

    loader = RandomWindowLoader(
        tokens, cfg.micro_batch_size, T, seed=cfg.seed + 1, rank=runtime.rank(), world_size=runtime.world_size()
    )
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(cfg.eval_iters):
        x, y = (t.to(device) for t in loader.next_batch())  # (B, T)
        with runtime.autocast(device, dtype):
            logits = model(x)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    model.train(was_training)
    return float(runtime.all_reduce_mean(total) / cfg.eval_iters)


def sample_text(model: GPTModel, tokenizer, cfg: TrainConfig, device, max_new_tokens: int) -> str:
    """A sampled continuation of `cfg.sample_prompt`, without disturbing the training RNG."""
    from dozero.generate import generate

    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        # A sample longer than the context slides its window; expected here, so not worth a warning
        # in the middle of the progress bar.
        warnings.filterwarnings("ignore", message="generation reached the context length")
        text = generate(
            model, tokenizer, cfg.sample_prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=cfg.seed
        )
    model.train(was_training)
    return text


def _install_stop_handlers(flag: list[str]):
    """SIGINT/SIGTERM ask the loop to finish the current step, save a checkpoint and return."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if flag:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        flag.append(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
