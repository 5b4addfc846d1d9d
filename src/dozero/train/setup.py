"""A training session's state (`Run`, `TrainResult`) and how it is built: `setup` reads the data, builds
the model, optimizer, loader and observer (or restores them from a checkpoint), checks the batch
arithmetic, and warns when a step will not fit in memory. train/loop.py then runs the steps.

    run = setup(cfg, model_overrides, resume, device, quiet)     # what train() does first
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dozero import parallel, runtime
from dozero.config import ModelConfig, get_model_config
from dozero.errors import DozeroError
from dozero.model.gpt import GPTModel
from dozero.model.info import parameter_breakdown
from dozero.train import checkpoint as ckpt
from dozero.train.config import TrainConfig
from dozero.train.corpus import Corpus, load_corpus
from dozero.train.observe import RunObserver, disk_error
from dozero.train.optim import make_optimizer
from dozero.train.step import Stepper


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
    benchmarks: dict[str, float] = field(default_factory=dict)
    """What the hooks reported at the last evaluation (e.g. {"eval/hellaswag/acc": 0.31}); see `train`."""


@dataclass
class Run:
    """One training session: what `setup` builds and the step, log, evaluation and save functions share."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    corpus: Corpus
    raw_model: GPTModel
    optimizer: torch.optim.Optimizer
    scaler: object
    loader: object
    stepper: Stepper
    observer: RunObserver
    tokens_per_step: int
    result: TrainResult
    step: int = 0
    pending: list = field(default_factory=list)
    """(step, loss on the device, lr, applied) of the steps not yet logged."""
    clock: dict = field(default_factory=dict)
    """Timing of the steps since the last log: start, steps; and the session's train_seconds, start."""
    recipe: object = None
    """What a later stage changes in this loop (fine-tuning: dozero.finetune.sft.SFTRecipe): `verb`, and
    `evaluate` (same arguments as train/loop.py's `evaluate`) and `checkpoint(model)` -> (model to save, extra
    metadata, a function that writes extra files into the checkpoint folder). None for pretraining."""
    hooks: list = field(default_factory=list)
    """Called at every evaluation as hook(model, tokenizer, step) -> {name: number}; logged as metrics."""


def setup(cfg: TrainConfig, overrides: dict, resume, device: torch.device, quiet: bool) -> Run:
    """Data, model, optimizer, loader and observer; on resume, their state from the checkpoint."""
    main = runtime.is_main()
    torch.manual_seed(cfg.seed)
    run_dir = ckpt.session_run_dir(cfg, resume, main)  # first: a foreign folder is refused before any work
    corpus = load_corpus(cfg)
    model_cfg = _model_config(cfg, overrides, resume, corpus.tokenizer.vocab_size)
    accum, tokens_per_step = _accumulation(cfg, model_cfg.context_length)
    raw_model = GPTModel(model_cfg).to(device)
    optimizer = make_optimizer(raw_model, cfg, device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    scaler = runtime.grad_scaler(device, dtype)
    from dozero.data.loader import RandomWindowLoader

    T, (data_rank, world) = model_cfg.context_length, parallel.data_parallel(cfg)  # tensor parallelism: per group
    loader_device = device if device.type != "cpu" else None
    loader = RandomWindowLoader(corpus.train, cfg.micro_batch_size, T, cfg.seed, data_rank, world, loader_device)
    result = TrainResult(run_dir=run_dir, step=0)
    if resume:
        state = ckpt.restore(resume, run_dir, raw_model, optimizer, loader, scaler)
        result.step, result.best_val_loss = state["step"], state.get("best_val_loss")
    if result.step >= cfg.max_steps:
        raise DozeroError(
            f"{run_dir} already ran {result.step} of {cfg.max_steps} steps; give a larger --max-steps to go on"
        )
    if main:  # on resume too, so flags given with --resume (a larger --max-steps) hold for the next resume
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_run_config(run_dir, cfg, model_cfg)
        except OSError as e:
            raise disk_error(e, run_dir, run_dir=run_dir) from None
    # DDP, FSDP, activation checkpointing, compile: applied to the finished (and restored) model.
    model, optimizer = parallel.parallelize(raw_model, optimizer, lambda m: make_optimizer(m, cfg, device), cfg, device)
    step_class = parallel.PipelineStepper if cfg.parallel == "pp" else Stepper  # pp: the schedule runs the passes
    stepper = step_class(model, raw_model, optimizer, loader, cfg, accum, device, dtype, scaler)
    observer = RunObserver(run_dir, main, cfg.max_steps, result.step, show=not quiet, tensorboard=cfg.tensorboard)
    run = Run(
        cfg,
        model_cfg,
        run_dir,
        device,
        dtype,
        corpus,
        raw_model,
        optimizer,
        scaler,
        loader,
        stepper,
        observer,
        tokens_per_step,
        result,
        step=result.step,
    )
    observer.write(
        f"training {parameter_breakdown(model_cfg)['total']:,} parameters on {runtime.describe_hardware(device)}, "
        f"{tokens_per_step:,} tokens/step ({cfg.micro_batch_size} x {T} x {world} processes x {accum} "
        f"accumulation), run folder {run_dir}"
    )
    if main:
        _warn_if_too_big(run)
    return run


def _model_config(cfg, overrides: dict, resume, vocab_size: int) -> ModelConfig:
    if resume:
        _, model_cfg = ckpt.read_run_config(resume)
    else:
        model_cfg = dataclasses.replace(get_model_config(cfg.model), **{**overrides, "vocab_size": vocab_size})
    if model_cfg.vocab_size < vocab_size:
        raise DozeroError(f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the tokenizer's")
    return model_cfg


def _accumulation(cfg: TrainConfig, T: int) -> tuple[int, int]:
    """Micro-batches per optimizer step on each process, and the tokens of one optimizer step."""
    world = parallel.data_parallel(cfg)[1]  # processes reading different batches
    tokens_per_micro_step = cfg.micro_batch_size * T * world
    accum = 1
    if cfg.global_batch_tokens:
        if cfg.global_batch_tokens % tokens_per_micro_step:
            raise DozeroError(
                f"--global-batch-tokens {cfg.global_batch_tokens:,} is not a multiple of micro_batch_size x "
                f"context_length x processes = {cfg.micro_batch_size} x {T} x {world} = {tokens_per_micro_step:,}"
            )
        accum = cfg.global_batch_tokens // tokens_per_micro_step
    return accum, accum * tokens_per_micro_step


def _warn_if_too_big(run: Run) -> None:
    """One line before the first step if its memory estimate (weights, gradients, AdamW moments,
    activations; dozero.model.info) exceeds what the device has free."""
    from dozero.model.info import human_bytes, memory_estimate

    precision = "fp32" if run.dtype == torch.float32 else "bf16"
    need = memory_estimate(run.model_cfg, run.cfg.micro_batch_size)[precision]["training"]
    free = runtime.free_memory(run.device)
    if free is not None and need > free:
        from tqdm.auto import tqdm

        # tqdm.write: on a line of its own above the progress bar, not glued to the bar's end.
        tqdm.write(
            f"warning: one training step needs about {human_bytes(need)} (model.info estimate) but "
            f"{run.device.type} has {human_bytes(free)} free; it may run out of memory: lower --micro-batch-size",
            file=sys.stderr,
        )
