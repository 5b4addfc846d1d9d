"""Pipeline parallelism (GPipe, Huang et al. 2019) with torch.distributed.pipelining.

N processes each hold a contiguous run of L/N blocks (a stage); the first also embeds the tokens,
the last also holds the final norm and the head. A batch is cut into micro-batches (one sequence
each) that flow through the stages: while stage 1 works on micro-batch 1, stage 0 already works on
micro-batch 2. Each process keeps 1/N of the blocks' weights, gradients and moments, and only
activations cross between processes ((B, T, C) per micro-batch, forward and backward).

    apply_pp(model, optimizer, make_optimizer, cfg, device)   # prunes `model` to this rank's stage

What the pipeline changes around the model:
  * GPT-2 ties the head to the token embedding, which live on the first and the last stage: each
    keeps a copy, and their gradients are summed between the two after every backward (Megatron-LM
    does the same), so both copies take the same step.
  * Gradient clipping needs the norm over all stages: the squared norms are summed over processes.
  * Every process reads the same batch (the first needs the tokens, the last the targets), and the
    loss, computed on the last stage, is sent to all.
  * `model(x)` (evaluation) runs the pipeline forward and every process gets the logits. Sampling
    text (KV-cache generation) does not run through the pipeline: `dozero train --parallel pp` skips
    the sample at evaluations.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dozero import runtime
from dozero.errors import DozeroError
from dozero.parallel.optional import torch_module
from dozero.train.optim import lr_at, set_lr
from dozero.train.step import Stepper


class Stage(nn.Module):
    """This rank's part of a GPTModel, holding the model's own modules (so parameters keep their
    names, e.g. trf_blocks.5.att.qkv.weight). Same arithmetic as GPTModel.forward for a full
    sequence without a KV cache: (B, T) ids or (B, T, C) activations in, (B, T, C) or (B, T, V) out."""

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.cfg = first, last, model.cfg
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.drop_emb = model.drop_emb
        self.trf_blocks = nn.ModuleDict({str(i): model.trf_blocks[i] for i in blocks})
        self.final_norm = model.final_norm if last else None
        self.out_head = model.out_head if last else None
        self.rope = (model.rope_cos, model.rope_sin) if model.cfg.pos_emb == "rope" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)
        if self.first:
            x = self.tok_emb(x)  # (B, T, C)
            if self.pos_emb is not None:
                x = x + self.pos_emb(positions)
            x = self.drop_emb(x)
        rope = None
        if self.rope is not None:  # 2 x (1, 1, T, hs)
            rope = (self.rope[0][positions].unsqueeze(-3), self.rope[1][positions].unsqueeze(-3))
        for block in self.trf_blocks.values():
            x, _ = block(x, None, None, False, rope)
        return self.out_head(self.final_norm(x)) if self.last else x  # (B, T, V) or (B, T, C)


def stage_blocks(n_layers: int, n_stages: int, rank: int) -> range:
    if n_layers % n_stages:
        raise DozeroError(
            f"--parallel pp gives each of {n_stages} processes the same number of blocks, and {n_stages} does not "
            f"divide the model's {n_layers} layers: use a number of processes that divides {n_layers}"
        )
    per = n_layers // n_stages
    return range(rank * per, (rank + 1) * per)


def check_settings(cfg, device: torch.device, n_stages: int) -> None:
    """One line for what the pipeline does not run. One process would be the first and the last stage
    at once (the schedule assumes two ends); float16 needs a GradScaler whose skip-on-overflow each
    stage would decide alone (bfloat16 has float32's range and needs none); the evaluation tasks generate."""
    if n_stages < 2:
        raise DozeroError(
            "--parallel pp splits the blocks over 2 or more processes: launch with torchrun --nproc_per_node=N "
            "(N >= 2), or use --parallel auto in one process"
        )
    if runtime.resolve_dtype(cfg.dtype, device) == torch.float16:
        raise DozeroError("--parallel pp does not scale float16 losses: use --dtype bfloat16 or float32")
    if cfg.eval_tasks:
        raise DozeroError("--eval-tasks scores with generation, which does not run through --parallel pp")


def apply_pp(model: nn.Module, optimizer, make_optimizer, cfg, device):
    """Make `model` this rank's stage in place (other ranks' blocks removed, so its parameters and a
    sharded checkpoint hold this stage's only), build the GPipe schedule (one micro-batch per
    sequence) and an optimizer for what is left, carrying over a restored AdamW state."""
    n, rank = runtime.world_size(), runtime.rank()
    check_settings(cfg, device, n)
    pipelining = torch_module("pipelining", "pp")  # a one-line error on a torch without it
    blocks = stage_blocks(model.cfg.n_layers, n, rank)
    first, last = rank == 0, rank == n - 1
    stage = Stage(model, blocks, first, last)
    for i in range(model.cfg.n_layers):  # drop what other stages hold
        if i not in blocks:
            model.trf_blocks[i] = nn.Identity()
    if not first:
        model.tok_emb, model.pos_emb = None, None
    if not last:
        model.final_norm, model.out_head = None, None
    new = make_optimizer(model)
    for p in (p for g in new.param_groups for p in g["params"]):
        if p in optimizer.state:  # the same Parameter objects: a restored state carries over
            new.state[p] = optimizer.state[p]
    model.pipeline_loss = MicroBatchLoss()  # its share is set by PipelineStepper, which knows the accumulation
    pipeline = pipelining.PipelineStage(stage, rank, n, device)
    # scale_grads=False: the schedule would rescale every gradient in the stage after each step, those
    # of earlier accumulation steps too; the loss is divided instead (MicroBatchLoss).
    model.pipeline = pipelining.ScheduleGPipe(
        pipeline, n_microbatches=cfg.micro_batch_size, loss_fn=model.pipeline_loss, scale_grads=False
    )
    model.pipeline_first, model.pipeline_last = first, last
    model.tied_group = dist.new_group([0, n - 1]) if model.cfg.tie_weights else None  # every rank calls new_group
    model.forward = _pipeline_forward(model)  # evaluation: the same call as an unsplit model
    if cfg.sample_tokens:
        if runtime.is_main():
            print(
                "note: --parallel pp samples no text at evaluations (generation does not run through the pipeline)",
                file=sys.stderr,
            )
        cfg.sample_tokens = 0
    return model, new


class MicroBatchLoss:
    """Each micro-batch's share of the step's mean loss: divided by `share` (the micro-batches of the
    step: micro_batch_size x accumulation steps), their gradients add up to the gradient of the mean."""

    share: int = 1

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # logits (b, T, V), y (b, T)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / self.share


def _pipeline_forward(model):
    def forward(x, *args, **kwargs):
        if args or kwargs:
            raise DozeroError("a pipeline-parallel model computes whole sequences only (no KV cache, no masks)")
        if model.pipeline_first:
            model.pipeline.eval(x)
        else:  # the schedule scores every micro-batch it runs: a stand-in target, its loss unused
            logits = model.pipeline.eval(target=torch.zeros(x.shape, dtype=torch.long, device=x.device))
        shape = (*x.shape, model.cfg.vocab_size)
        # float32 on every rank, whatever autocast computed: the broadcast's buffers must match.
        logits = logits.float().contiguous() if model.pipeline_last else torch.empty(shape, device=x.device)
        dist.broadcast(logits, src=runtime.world_size() - 1)
        return logits

    return forward


@dataclass
class PipelineStepper(Stepper):
    """Stepper's optimizer step (same learning rate, clipping, skip on NaN) with the forward and
    backward passes run by the pipeline schedule over this rank's stage."""

    def __post_init__(self):
        self.raw_model.pipeline_loss.share = self.cfg.micro_batch_size * self.accum  # the loop's accumulation

    def __call__(self, index: int) -> tuple[torch.Tensor, bool]:
        cfg, model, schedule = self.cfg, self.raw_model, self.raw_model.pipeline
        set_lr(self.optimizer, lr_at(index, cfg))
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            x, y = (t.to(self.device) for t in self.loader.next_batch())  # (B, T) each; every rank, the same
            losses: list = []
            with runtime.autocast(self.device, self.dtype):
                if model.pipeline_first:
                    schedule.step(x)
                elif model.pipeline_last:
                    schedule.step(target=y, losses=losses)
                else:
                    schedule.step()
            if losses:  # each micro-batch's share: their sum x accum is this batch's mean loss
                loss_sum += torch.stack(losses).detach().sum() * self.accum
        dist.broadcast(loss_sum, src=runtime.world_size() - 1)
        params = [p for p in model.parameters() if p.grad is not None]
        if model.tied_group is not None and (model.pipeline_first or model.pipeline_last):
            tied = (model.tok_emb if model.pipeline_first else model.out_head).weight
            dist.all_reduce(tied.grad, group=model.tied_group)  # embedding + head: one weight's two uses
        grad_norm = _global_grad_norm(model, params)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm, foreach=True)
        if cfg.on_nan == "skip" and not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_sum / self.accum, False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum, True


def _global_grad_norm(model, params: list) -> torch.Tensor:
    """The gradient norm of the whole model: squared norms summed over the stages (the tied weight
    counted once, on the first stage)."""
    skip = model.out_head.weight if model.tied_group is not None and model.pipeline_last else None
    squares = sum((p.grad.float().pow(2).sum() for p in params if p is not skip), torch.zeros(()))
    dist.all_reduce(squares)
    return squares.sqrt()
