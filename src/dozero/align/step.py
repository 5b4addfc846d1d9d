"""What DPO and the reward model share with the trainer: a step with its own loss, and the run around it.

    stepper = AlignStepper(model, optimizer, loader, cfg, accum, device, dtype, scaler, loss_fn)
    loss, applied = stepper(index)          # the same call the trainer's loop (train/loop.py) makes

The trainer's Stepper computes next-token cross-entropy; alignment losses are functions of whole
sequences (log-probabilities of chosen and rejected answers, or a scalar score), so the step takes a
`loss_fn(model, batch) -> (loss, metrics)` and keeps everything else the trainer does: learning-rate
schedule, gradient accumulation, AMP, clipping, NaN/inf skipping, and exact resume (the loader's
position and the RNGs go into the trainer's checkpoints). Each step's metrics (reward margin and
accuracy, ...) are written to metrics.jsonl beside the loss.

`start_run` builds the trainer's `Run` for such a step (run folder, config files, observer), so an
alignment run is the trainer's `_loop` and `_finish`: the same progress line, signals, loss.png,
report.md and verified checkpoints as pretraining and fine-tuning.

Under `torchrun --nproc_per_node=N` (`processes` joins the group) each rank reads its own share of the
batches (the loaders take rank and world size), the loss runs through DistributedDataParallel, which
averages the gradients, so every rank takes the same step, and only rank 0 writes. N ranks x batch b
give the per-step losses of one process x N*b (tests/test_align_ddp.py).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch

from dozero import runtime
from dozero.errors import DozeroError
from dozero.finetune.sft import SFTRecipe
from dozero.train import checkpoint as ckpt
from dozero.train.optim import lr_at, set_lr


@contextmanager
def processes(device):
    """torchrun's process group for the length of a run (nothing in a single process)."""
    distributed = runtime.init_distributed(device)
    try:
        yield
    finally:
        if distributed:
            runtime.destroy_distributed()


def agree(flag: bool) -> bool:
    """True on every rank when it is True on any (a step is skipped by all ranks or by none: one rank
    leaving out a backward would leave the others waiting for its gradients)."""
    return bool(runtime.any_rank_max(int(flag)))


def mean_over_ranks(values: dict) -> dict:
    """{name: float} averaged over the ranks (each rank's own batch), for the metrics rank 0 logs."""
    if not values or runtime.world_size() == 1:
        return values
    means = runtime.all_reduce_mean(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, means.tolist(), strict=True))


@contextmanager
def lora_disabled(model):
    """The model as its base weights alone: every LoRA update scaled by 0 (exactly the base's output,
    as PEFT's disable_adapter), restored on exit. The reference of a LoRA run at no extra memory."""
    from dozero.finetune.lora import lora_layers

    layers = [layer for _, _, layer in lora_layers(model)]
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales, strict=True):
            layer.scale = scale


class AlignStepper:
    def __init__(self, model, optimizer, loader, cfg, accum, device, dtype, scaler, loss_fn):
        self.model, self.optimizer, self.loader, self.cfg, self.accum = model, optimizer, loader, cfg, accum
        self.device, self.dtype, self.scaler, self.loss_fn = device, dtype, scaler, loss_fn
        self.observer = None  # set by start_run: where each step's metrics go
        self.done = 0  # steps taken (the held-out metrics are logged under it)
        # DDP around the model, made at the first step: the reward model swaps its output head while
        # the run is set up, and DDP must see the modules the loss will use.
        self.forward = None

    def __call__(self, index: int) -> tuple[torch.Tensor, bool]:
        set_lr(self.optimizer, lr_at(index, self.cfg))
        self.done = index + 1
        if self.forward is None:
            self.forward = runtime.wrap_ddp(self.model, self.device)
        loss_sum, sums = torch.zeros((), device=self.device), {}
        for micro in range(self.accum):
            batch = [t.to(self.device) for t in self.loader.next_batch()]
            with runtime.no_sync(self.forward, micro < self.accum - 1):  # DDP: share gradients once, at the end
                with runtime.autocast(self.device, self.dtype):
                    loss, metrics = self.loss_fn(self.forward, batch)
                loss_sum += loss.detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / self.accum
                loss = loss / self.accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = loss_sum
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        sums = mean_over_ranks(sums)
        if self.observer is not None and sums:
            self.observer.log([{"step": index + 1, **{k: round(v, 6) for k, v in sums.items()}}])
        if self.cfg.on_nan == "skip" and agree(not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_sum / self.accum, False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum, True


class AlignRecipe(SFTRecipe):
    """The loop's hook: held-out score by `evaluate_fn(model, val) -> (loss, metrics)`, and checkpoints as
    fine-tuning writes them (merged model + LoRA adapter) with this stage's settings in the metadata."""

    cross_entropy = False  # DPO's loss, minus a mean reward, a pair loss: exp() of them means nothing

    def __init__(self, method: str, settings, template: str, pad_id: int, evaluate_fn):
        super().__init__(settings, template, pad_id)
        self.verb, self.method, self.evaluate_fn = f"align {method}", method, evaluate_fn
        self.observer, self.stepper = None, None  # set by start_run

    @torch.no_grad()
    def evaluate(self, model, val, cfg, T, device, dtype) -> float:
        was_training = model.training
        model.eval()
        with runtime.autocast(device, dtype):
            loss, metrics = self.evaluate_fn(model, val)
        model.train(was_training)
        if self.observer is not None and metrics:
            self.observer.log(
                [{"step": self.stepper.done, **{f"val_{k}": round(float(v), 6) for k, v in metrics.items()}}]
            )
        return float(loss)

    def checkpoint(self, model):
        model, metadata, writer = super().checkpoint(model)
        metadata["align"] = {"method": self.method, **dataclasses.asdict(self.ft)}
        return model, metadata, writer


def start_run(settings, cfg, model, tokenizer, loss_fn, recipe, data, resume, device, source: str, quiet: bool,
              restore_model=None):  # fmt: skip
    """The trainer's Run for an alignment stage: `data` is (train examples, held-out examples, loader,
    tokens of one optimizer step). `restore_model`: what the checkpoint's language model is loaded into
    on resume, when it is not `model` itself (the reward model's body)."""
    from dozero.files import write_json
    from dozero.finetune.sft import _restore
    from dozero.train.corpus import Corpus
    from dozero.train.loop import Run, TrainResult
    from dozero.train.observe import RunObserver, disk_error
    from dozero.train.optim import make_optimizer

    main = runtime.is_main()
    train_set, val_set, loader, tokens_per_step = data
    model.to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    scaler = runtime.grad_scaler(device, dtype)
    run_dir = ckpt.session_run_dir(cfg, resume, main)
    result = TrainResult(run_dir=run_dir, step=0)
    if resume:
        state = _restore(resume, run_dir, restore_model or model, optimizer, loader, scaler)
        result.step, result.best_val_loss = state["step"], state.get("best_val_loss")
    if result.step >= cfg.max_steps:
        raise DozeroError(f"{run_dir} already ran {result.step} of {cfg.max_steps} steps; give a larger --max-steps")
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_run_config(run_dir, cfg, model.cfg)
            write_json(run_dir / ALIGN_FILE, {"method": recipe.method, **dataclasses.asdict(settings)}, indent=1)
        except OSError as e:
            raise disk_error(e, run_dir) from None
    stepper = AlignStepper(model, optimizer, loader, cfg, settings.accumulation, device, dtype, scaler, loss_fn)
    observer = RunObserver(run_dir, main, cfg.max_steps, result.step, show=not quiet, tensorboard=cfg.tensorboard)
    stepper.observer = recipe.observer = observer
    recipe.stepper = stepper
    run = Run(cfg, model.cfg, run_dir, device, dtype, Corpus(tokenizer, train_set, val_set, source), model, optimizer,
              scaler, loader, stepper, observer, tokens_per_step, result, step=result.step, recipe=recipe)  # fmt: skip
    return run


ALIGN_FILE = "align_config.json"


def read_align_config(run_dir, cls):
    """The settings an alignment run was started with (for --resume)."""
    from dozero.model.checkpoint import read_json

    saved = read_json(Path(run_dir) / ALIGN_FILE)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in saved.items() if k in known})
