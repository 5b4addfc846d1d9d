"""Knowledge distillation: train a small student to match a large teacher's next-token distributions.

    dozero compress distill --teacher smollm2-135m-instruct --student llama-char --data tinyshakespeare \\
        --out out/student --steps 200
    from dozero.compress.distill import DistillConfig, distill, distillation_loss

The loss (Hinton et al. 2015), on every position of every window:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token)

T (temperature) > 1 softens both distributions so the student also learns which wrong tokens the teacher
finds likely; the T^2 keeps the KL term's gradients on the same scale as the cross-entropy's when T
changes. alpha = 0 is ordinary training on the same tokens and steps: the baseline a distilled student
must beat. The student trains through the trainer's own machinery (train/step.py `Stepper`: AdamW,
the learning-rate schedule, gradient clipping, the NaN guard, random windows of data/loader.py); only the
loss differs. Teacher and student must share a vocabulary (the same token ids mean the same text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dozero.errors import DozeroError


@dataclass
class DistillConfig:
    """The distillation run: the loss mix and a short training schedule."""

    temperature: float = 2.0
    """Softens teacher and student distributions before the KL (Hinton et al. 2015: 2-20); > 0."""
    alpha: float = 0.5
    """Weight of the KL (teacher) term; 1 - alpha goes to the usual cross-entropy. 0 = no teacher."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Windows per step."""
    context_length: int = 64
    """Tokens per window (at most the student's context length)."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, warmup then the trainer's schedule)."""
    warmup_steps: int = 20
    """Steps of linear warmup."""
    val_fraction: float = 0.1
    """The end of the data held out to measure the student (loss and perplexity)."""
    seed: int = 1337
    """Seeds the student's initialization and the windows."""

    def check(self) -> None:
        if self.temperature <= 0:
            raise DozeroError(f"distill: temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise DozeroError(f"distill: alpha (the KL's share of the loss) must be in [0, 1], got {self.alpha}")
        if self.steps < 1 or self.batch_size < 1 or self.context_length < 1:
            raise DozeroError("distill: steps, batch size and context length must be >= 1")


def distillation_loss(student_logits, teacher_logits, targets, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets), mean over positions.
    Logits (B, T, V), targets (B, T)."""
    student = student_logits.flatten(0, 1).float()  # (N, V)
    teacher = teacher_logits.flatten(0, 1).float()  # (N, V)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()  # per position, averaged
    ce = F.cross_entropy(student, targets.flatten())
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def check_same_vocabulary(teacher, student, teacher_tok=None, student_tok=None) -> None:
    """A one-line error unless teacher and student read the same token ids as the same text."""
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise DozeroError(
            f"distill: the teacher has a vocabulary of {teacher.cfg.vocab_size:,} tokens and the student "
            f"{student.cfg.vocab_size:,}; the student must use the teacher's tokenizer (e.g. --student a preset "
            "name, built with the teacher's vocabulary)"
        )
    if teacher_tok is not None and student_tok is not None and teacher_tok.fingerprint() != student_tok.fingerprint():
        raise DozeroError("distill: teacher and student have different tokenizers (same size, other tokens)")


def split_tokens(ids: list[int], val_fraction: float, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(ids, dtype=np.int64)
    n_val = max(int(len(tokens) * val_fraction), context_length + 1)
    if len(tokens) - n_val < 2 * (context_length + 1):
        raise DozeroError(f"distill: the data has only {len(tokens):,} tokens, too few for windows of {context_length}")
    return tokens[:-n_val], tokens[-n_val:]


@torch.no_grad()
def held_out_loss(model, tokens: np.ndarray, context_length: int) -> float:
    """Mean next-token cross-entropy over consecutive windows of `tokens` (every token predicted once)."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(tokens) - 1, context_length):
        window = torch.from_numpy(tokens[s : s + context_length + 1])
        if len(window) < 2:
            break
        logits = model(window[None, :-1])[0]  # (T, V)
        total += float(F.cross_entropy(logits.float(), window[1:], reduction="sum"))
        count += len(window) - 1
    return total / count


def distill(student, teacher, train_tokens: np.ndarray, config: DistillConfig, progress=None) -> list[float]:
    """Train `student` (in place) against `teacher` on random windows of `train_tokens`; the losses per step.
    With alpha 0 the teacher is not used and may be None (plain training on the same machinery)."""
    from dozero.data.loader import RandomWindowLoader
    from dozero.train.config import TrainConfig
    from dozero.train.optim import make_optimizer
    from dozero.train.step import Stepper

    config.check()
    if teacher is None and config.alpha > 0:
        raise DozeroError("distill: alpha > 0 needs a teacher")
    if teacher is not None:
        check_same_vocabulary(teacher, student)
        teacher.eval()
    T = min(config.context_length, student.cfg.context_length, (teacher or student).cfg.context_length)
    train_cfg = TrainConfig(
        max_steps=config.steps,
        lr=config.lr,
        min_lr=config.lr / 10,
        warmup_steps=min(config.warmup_steps, config.steps - 1),
        micro_batch_size=config.batch_size,
        seed=config.seed,
        device="cpu",
        dtype="float32",
    )
    device = torch.device("cpu")
    student.train()

    def loss_fn(logits, x, y):
        if config.alpha == 0:  # the baseline: no teacher term, so no teacher forward (most of a step's time)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        with torch.no_grad():
            teacher_logits = teacher(x)  # (B, T, V)
        return distillation_loss(logits, teacher_logits, y, config.temperature, config.alpha)

    loader = RandomWindowLoader(train_tokens, config.batch_size, T, config.seed)
    optimizer = make_optimizer(student, train_cfg, device)
    stepper = Stepper(student, student, optimizer, loader, train_cfg, 1, device, torch.float32, loss_fn=loss_fn)
    losses = []
    for step in range(config.steps):
        loss, _ = stepper(step)
        losses.append(float(loss))
        if progress is not None:
            progress(step + 1, losses[-1])
        if not math.isfinite(losses[-1]):
            raise DozeroError(f"distill: the loss became {losses[-1]} at step {step + 1}; try a lower --lr")
    student.eval()
    return losses
