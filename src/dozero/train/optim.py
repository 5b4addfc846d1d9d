"""AdamW (or Muon + AdamW) with decay / no-decay groups, and the learning-rate schedules.

Weight decay pulls weights toward zero. It helps matrices (the model's capacity) but hurts the
few numbers that set scale and offset (biases, LayerNorm scale/shift), so those are left out, as in
GPT-2/3 and nanoGPT. The tied embedding/head matrix is decayed once (it is one parameter).

    make_optimizer(model, cfg, device)     cfg.optimizer: "adamw" | "muon"
    lr_at(step, cfg): warmup -> cosine | constant | warmup-stable-decay

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; the modded-nanogpt speedruns) updates
a weight matrix with its momentum made orthogonal: every direction of the update gets the same step,
instead of the few directions that dominate the gradient. Embeddings, the output head, biases and
norms stay on AdamW. On the shakespeare-char model it reaches a given validation loss in about half
the tokens of AdamW (config.py's shakespeare-char-fast preset has the measurements).
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as adamw_update

from dozero.train.config import TrainConfig

MUON_MOMENTUM = 0.95
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
"""The quintic's coefficients (Keller Jordan's Muon, also torch.optim.Muon's): picked for the largest
slope at zero, so 5 steps push every singular value into about [0.7, 1.2] (exactly 1 is not needed)."""
NEWTON_SCHULZ_STEPS = 5


def param_groups(model: torch.nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """AdamW groups: tensors with 2+ dimensions decay, vectors (biases, norms) do not. With `muon`, a
    third group: the blocks' weight matrices (attention and feed-forward), which Muon updates."""
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        if muon and p.dim() == 2 and "trf_blocks." in name:
            matrices.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if muon:
        groups.append({"params": matrices, "weight_decay": weight_decay, "muon": True})
    return groups


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over each parameter instead of a dozen element-wise
    ops): on CUDA, and on CPU since PyTorch 2.4. Measured on the shakespeare-char step (2-core EPYC,
    benchmarks/train_speed.py): 1.07x faster steps than foreach. Other devices: foreach (a few
    batched ops instead of a Python loop per tensor). cfg.optimizer "muon": `MuonAdamW`."""
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "muon":
        groups = param_groups(model, cfg.weight_decay, muon=True)
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=fused or None,
        foreach=None if fused else True,
    )


def orthogonalize(g: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """About U V^T for g = U S V^T (the SVD): g with all its singular values set near 1, by a
    Newton-Schulz iteration x <- a x + (b x x^T + c (x x^T)^2) x, which only multiplies matrices.
    In bfloat16, as torch.optim.Muon: the iteration does not need more precision, and on this
    project's 2-core EPYC a 512 x 128 matrix took 12-15 ms in bfloat16 vs 17-20 ms in float32."""
    a, b, c = NEWTON_SCHULZ
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: x x^T is then the smaller square (m, m)
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm = 1: where the iteration converges
    for _ in range(steps):
        gram = x @ x.T  # (m, m)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G G) x
    return (x.T if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked {"muon": True}, AdamW (torch's own update) for the others.

    Muon, per matrix W (A x B) with gradient g: m <- 0.95 m + 0.05 g; u = Nesterov's look-ahead
    0.05 g + 0.95 m; W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) orthogonalize(u). The factor
    0.2 sqrt(max(A, B)) gives the update the root-mean-square of an AdamW update (Liu et al. 2025,
    "Muon is scalable for LLM training"), so one learning rate and schedule serve both groups: the
    same arithmetic as torch.optim.Muon(adjust_lr_fn="match_rms_adamw"), in one optimizer so that a
    checkpoint holds one state. Every parameter keeps AdamW's state names: Muon's momentum is its
    `exp_avg`; its `exp_avg_sq` stays zero (one layout for all, as dozero's checkpoints check)."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.99), eps=1e-8, fused=False):
        # "fused" in each group: on load, torch then moves the step counts to the parameters' device.
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, fused=fused))

    def _state(self, p: torch.Tensor, fused: bool) -> dict:
        state = self.state[p]
        if not state:  # the fused kernel wants the step count beside the parameter, foreach on the CPU
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else None)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self._state(p, group["fused"]) for p in params]
            if group["muon"]:
                self._muon(group, params, states)
                continue
            beta1, beta2 = group["betas"]
            adamw_update(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                fused=group["fused"] or None,
                foreach=None if group["fused"] else True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )

    def _muon(self, group: dict, params: list, states: list) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        for p, state in zip(params, states, strict=True):
            momentum = state["exp_avg"]
            momentum.lerp_(p.grad, 1 - MUON_MOMENTUM)
            update = orthogonalize(p.grad.lerp(momentum, MUON_MOMENTUM))
            p.mul_(1 - lr * weight_decay)
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
            state["step"] += 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine:   linear warmup to lr, then half a cosine down to min_lr at max_steps (GPT-3, appendix B).
    constant: linear warmup, then lr.
    wsd:      warmup, lr held, then a linear decay to min_lr over the last `decay_fraction` of the
              steps (warmup-stable-decay; Hu et al. 2024, MiniCPM): a run can be extended from any
              checkpoint before its decay.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + min(1.0, progress) * (cfg.min_lr - cfg.lr)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
