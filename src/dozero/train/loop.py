"""The pretraining loop: next-token prediction, AdamW, schedule, evaluation, checkpoints.

    from dozero.train import train, get_train_preset
    result = train(get_train_preset("shakespeare-char"))       # what `dozero train` runs
    result.val_loss, result.run_dir

One optimizer step (course chapter 5; nanoGPT train.py):
    for each of `accum` micro-batches:  logits = model(x); loss = cross_entropy(logits, y); loss/accum backward
    clip the gradient norm; set the learning rate for this step; AdamW step; zero the gradients.
Every `eval_interval` steps: validation loss and perplexity, a sampled line of text, loss.png, and
a checkpoint (latest/, best/ if improved). The loss of every step is kept on the device and read
in groups of `log_interval` (one host sync per group instead of one per step). SIGINT/SIGTERM are
looked at after every step: the run saves a checkpoint there and stops (a second one stops at once).

The code reads top to bottom: `train` -> `setup` (train/setup.py: a `Run` holding the session's state) -> `_loop`
(`_step`, `_flush`, `_evaluate`, `_save`) -> `_finish`.

Legend for shapes: B micro-batch size, T context length, V vocabulary size.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from dozero import parallel, runtime
from dozero.errors import DozeroError
from dozero.model.gpt import GPTModel
from dozero.model.info import parameter_breakdown
from dozero.train import checkpoint as ckpt
from dozero.train.config import TrainConfig
from dozero.train.observe import disk_error, flops_per_token, has_checkpoint
from dozero.train.optim import make_optimizer
from dozero.train.setup import Run, TrainResult, setup
from dozero.train.step import mixed_precision

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
"""Exit status of a run stopped by a signal (128 + the signal's number, as shells report it)."""


def train(
    cfg: TrainConfig,
    model_overrides: dict | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    hooks=None,
) -> TrainResult:
    """Train per `cfg` (model shape: `cfg.model` plus `model_overrides`), or continue the run that
    `resume` names: a run folder (from its latest/) or one of its checkpoints (RUN/checkpoints/step_N).
    The run's saved settings hold; `cfg` may change max_steps and the like. Torch's thread count
    and TF32 switches are restored on return.

    hooks: a function (cfg, tokenizer) -> [hook(model, tokenizer, step) -> {name: number}], called once
    the data is read; each hook runs at every evaluation and its numbers go into metrics.jsonl. A later
    stage plugs in here: cfg.eval_tasks needs dozero.evaluate.during_training.benchmark_hooks (what
    `dozero train` passes), since train may not import evaluate."""
    cfg.validate()
    if cfg.eval_tasks and hooks is None:
        raise DozeroError(
            "--eval-tasks needs the evaluation stage: train(cfg, hooks=benchmark_hooks) with "
            "dozero.evaluate.during_training.benchmark_hooks (the dozero train command does this)"
        )
    device = runtime.pick_device(cfg.device)
    with runtime.torch_settings(device, cfg.threads):
        distributed = runtime.init_distributed(device)
        try:
            run = setup(cfg, model_overrides or {}, resume, device, quiet)
            run.hooks = hooks(run.cfg, run.corpus.tokenizer) if hooks else []
            _loop(run)
            return _finish(run)
        finally:
            if distributed:
                runtime.destroy_distributed()


# ----------------------------------------------------------------------------- the loop


def _loop(run: Run) -> None:
    cfg = run.cfg
    now = time.perf_counter()
    run.clock.update(start=now, steps=0, train_seconds=0.0, session_start=now)
    with runtime.stop_signals() as stop:
        try:
            while run.step < cfg.max_steps:
                _step(run)
                # Every step: free in one process; under DDP a small all-reduce on the CPU (no device sync),
                # so every rank stops after the same step.
                signum = runtime.any_rank_max(stop.signum)
                stop_now = bool(signum) or run.step == cfg.stop_after
                evaluate_now = run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps
                if run.step % cfg.log_interval == 0 or evaluate_now or stop_now:
                    _flush(run)
                if evaluate_now:
                    _evaluate(run)
                elif stop_now:
                    _save(run, is_best=False, val_loss=None)
                if stop_now:
                    run.result.stopped = signal.Signals(signum).name if signum else "stop_after"
                    resume = f"dozero {getattr(run.recipe, 'verb', 'train')} --resume {run.run_dir}"
                    run.observer.write(f"stopped at step {run.step} ({run.result.stopped}); resume: {resume}")
                    break
                if evaluate_now:  # evaluation time is not training speed
                    run.clock.update(start=time.perf_counter(), steps=0)
        finally:
            run.observer.close()


def _out_of_memory(e: RuntimeError) -> bool:
    """CUDA's torch.OutOfMemoryError, or an allocation that failed on a CPU ("DefaultCPUAllocator: can't
    allocate memory") or on Apple's GPU ("MPS backend out of memory"), which PyTorch raises as plain
    RuntimeErrors."""
    oom = getattr(torch, "OutOfMemoryError", None)
    message = str(e)
    return (oom is not None and isinstance(e, oom)) or "can't allocate memory" in message or "out of memory" in message


def _step(run: Run) -> None:
    try:
        loss, applied = run.stepper(run.step)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not _out_of_memory(e):
            raise
        raise DozeroError(
            f"out of memory at step {run.step + 1} with --micro-batch-size {run.cfg.micro_batch_size}: use a "
            "smaller micro-batch; set --global-batch-tokens to keep the same batch through gradient accumulation"
        ) from e
    run.step += 1
    run.clock["steps"] += 1
    run.pending.append((run.step, loss, run.optimizer.param_groups[0]["lr"], applied))


def _flush(run: Run) -> None:
    """Read the pending losses from the device (mean over ranks), log them, and stop on NaN/inf."""
    if not run.pending:
        return
    values = runtime.all_reduce_mean(torch.stack([p[1] for p in run.pending]).float()).tolist()
    records = []
    for (s, _, lr, applied), value in zip(run.pending, values, strict=True):
        finite = math.isfinite(value)
        records.append({"step": s, "loss": value if finite else None, "lr": lr})
        if not applied:
            records[-1]["skipped"] = True
        if finite:
            run.result.losses[s] = value
        elif run.cfg.on_nan == "stop":
            run.observer.log(records)
            raise DozeroError(
                f"the training loss became {value} at step {s}; stopped without writing a checkpoint "
                f"(the last good one is in {run.run_dir}/latest, if any). Lower --lr, check the data, or pass "
                "--on-nan skip to skip such steps"
            )
    run.pending.clear()
    elapsed = time.perf_counter() - run.clock["start"]
    run.clock["train_seconds"] += elapsed
    tokens_per_second = run.clock["steps"] * run.tokens_per_step / max(elapsed, 1e-9)
    run.result.tokens_per_second = tokens_per_second
    postfix = {"loss": f"{values[-1]:.4f}", "tok/s": f"{tokens_per_second:,.0f}"}
    record = {"step": s, "tokens_per_second": round(tokens_per_second, 1)}
    peak = runtime.peak_flops(run.device)
    if peak:
        fpt = flops_per_token(
            parameter_breakdown(run.model_cfg)["total"],
            run.model_cfg.n_layers,
            run.model_cfg.emb_dim,
            run.model_cfg.context_length,
        )
        mfu = fpt * tokens_per_second / (peak * runtime.world_size())
        postfix["mfu"] = f"{100 * mfu:.1f}%"
        record["mfu"] = round(mfu, 4)
    run.observer.log(records + [record])
    run.observer.progress(s, **postfix)
    run.clock.update(start=time.perf_counter(), steps=0)


def _evaluate(run: Run) -> None:
    """Validation loss, a sample line, loss.png, and a checkpoint (best/ too if the loss improved)."""
    cfg, result = run.cfg, run.result
    score = run.recipe.evaluate if run.recipe is not None else evaluate
    val_loss = score(run.raw_model, run.corpus.val, cfg, run.model_cfg.context_length, run.device, run.dtype)
    result.val_loss = val_loss
    is_best = result.best_val_loss is None or val_loss < result.best_val_loss
    if is_best:
        result.best_val_loss = val_loss
    record = {"step": run.step, "val_loss": val_loss}
    if getattr(run.recipe, "cross_entropy", True):  # alignment's held-out scores are not: no perplexity of them
        record["val_perplexity"] = math.exp(min(val_loss, 50))
    run.observer.log([record])
    line = f"step {run.step}: train loss {result.losses.get(run.step, math.nan):.4f}, val loss {val_loss:.4f}"
    sharded = parallel.is_sharded(run.raw_model)  # then every rank runs the forward passes (all-gathers)
    if cfg.sample_tokens and (runtime.is_main() or sharded):
        sample = sample_text(run.raw_model, run.corpus.tokenizer, cfg, run.device, cfg.sample_tokens)
        line += " | " + sample.replace("\n", " ")
    run.observer.write(line)
    run.observer.plot()
    _save(run, is_best, val_loss)
    if runtime.is_main() or sharded:  # after the save: a failing hook loses no training
        for hook in run.hooks:
            scores = hook(run.raw_model, run.corpus.tokenizer, run.step)
            result.benchmarks.update(scores)
            run.observer.log([{"step": run.step, **scores}])
            run.observer.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def _save(run: Run, is_best: bool, val_loss: float | None) -> None:
    raw_model, optimizer = run.raw_model, run.optimizer
    # A sharded model: every rank writes its own pieces (PyTorch's DCP). A recipe's
    # checkpoint (fine-tuning) is gathered: every rank sends its shards, rank 0 writes an ordinary one.
    sharded = parallel.is_sharded(raw_model) and run.recipe is None
    if parallel.is_sharded(raw_model) and not sharded:
        cpu = torch.device("cpu")
        raw_model, optimizer = parallel.gather_to_plain(
            raw_model, optimizer, lambda: GPTModel(run.model_cfg), lambda m: make_optimizer(m, run.cfg, cpu)
        )
    if runtime.is_main() or sharded:
        trainer_state = {
            "loader": run.loader.state_dict(),
            "rng": runtime.rng_state(),
            "best_val_loss": run.result.best_val_loss,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "tokens_seen": run.step * run.tokens_per_step,
        }
        metadata = {"train": {"step": run.step, "val_loss": val_loss, "preset": run.cfg.preset}}
        model, extra_files = raw_model, None
        if run.recipe is not None:
            model, more, extra_files = run.recipe.checkpoint(raw_model)
            metadata.update(more)
        try:
            ckpt.save_checkpoint(
                run.run_dir,
                run.step,
                model,
                run.corpus.tokenizer,
                optimizer,
                trainer_state,
                metadata,
                is_best,
                run.cfg.keep_last,
                extra_files,
                sharded=sharded,
            )
        except OSError as e:
            kept = (
                "the previous checkpoints are intact" if has_checkpoint(run.run_dir) else "no checkpoint is saved yet"
            )
            raise disk_error(e, run.run_dir / "checkpoints", kept, run.run_dir) from None
    runtime.barrier()


def _finish(run: Run) -> TrainResult:
    """Totals of the session into the result and report.md."""
    result, clock = run.result, run.clock
    result.step = run.step
    result.seconds = time.perf_counter() - clock["session_start"]
    if clock["train_seconds"] > 0:
        result.tokens_per_second = len(result.losses) * run.tokens_per_step / clock["train_seconds"]
    last = [result.losses[s] for s in sorted(result.losses)[-run.cfg.log_interval :]]
    summary = {
        "stopped": result.stopped,
        "val_loss": result.val_loss,
        "best_val_loss": result.best_val_loss,
        "tokens_per_second": result.tokens_per_second,
        "train_loss": sum(last) / len(last) if last else math.nan,
        "train_window": len(last),
        "benchmarks": result.benchmarks,
    }
    run.observer.write_report(
        cfg=run.cfg,
        model_cfg=run.model_cfg,
        n_params=parameter_breakdown(run.model_cfg)["total"],  # the whole model's: under pp raw_model is one stage
        hardware=runtime.describe_hardware(run.device),
        source=run.corpus.source,
        steps=run.step,
        tokens=run.step * run.tokens_per_step,
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

    rank, world = parallel.data_parallel(cfg)  # a tensor-parallel group scores one batch together
    loader = RandomWindowLoader(tokens, cfg.micro_batch_size, T, seed=cfg.seed + 1, rank=rank, world_size=world)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(cfg.eval_iters):
        x, y = (t.to(device) for t in loader.next_batch())  # (B, T)
        with mixed_precision(device, dtype):  # as the training step computes it
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
