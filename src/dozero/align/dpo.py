"""Direct Preference Optimization (DPO): learn from preference pairs with no reward model and no sampling.

    from dozero.align.dpo import DPOConfig, DPO_DEFAULTS, dpo
    dpo(DPOConfig(model="smollm2-135m-instruct", data="pairs.jsonl", beta=0.1), DPO_DEFAULTS)

RLHF fits a reward model r(x, y) to the pairs, then maximizes E[r] - beta KL(pi || pi_ref) with RL.
That objective's optimum is pi(y|x) ~ pi_ref(y|x) exp(r(x, y) / beta), so r = beta log(pi / pi_ref) + const:
the policy itself is a reward model, and the Bradley-Terry likelihood of the pairs can be maximized
directly (Rafailov et al. 2023, eq. 7):

    loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

beta * (log pi - log pi_ref) is the "implicit reward" of an answer; its chosen-minus-rejected margin and
the share of pairs where it is positive (accuracy) are logged every step. The reference keeps the KL
anchor: without it the loss is happy to push both answers' probabilities down, chosen less than
rejected, and the model drifts into text no one preferred.

Variants (--loss): `sigmoid` (DPO; with --label-smoothing e, the conservative cDPO of Mitchell 2023,
which assumes a share e of the labels is flipped), `robust` (Chowdhury et al. 2024, an unbiased
version of the same assumption), `ipo` (Azar et al. 2023: a squared loss toward a margin of
1/(2 beta), on log-ratios averaged per token, as TRL computes it). Each equals TRL 1.16's DPOTrainer
on the same log-probs (tests/test_align_dpo.py).

The reference's log-probs are computed once, before training (--live-reference recomputes them
every step: the LoRA-disabled model, or a frozen copy; only worth it to check the two agree). Pairs
longer than the context are dropped and counted; a --reference model with another vocabulary is
refused. The run is the trainer's (align/step.py): checkpoints with exact resume, metrics, plots.

Legend: P pairs in a batch, L the longest sequence in the batch.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dozero import runtime
from dozero.align.data import PairLoader, collate_pairs, read_pairs, tokenize_pairs
from dozero.align.logprobs import sequence_logprobs
from dozero.errors import DozeroError
from dozero.finetune.data import IGNORE, split
from dozero.finetune.sft import FINETUNE_DEFAULTS, FinetuneConfig, load_base

LOSSES = ("sigmoid", "robust", "ipo")


@dataclass
class DPOConfig(FinetuneConfig):
    """Fine-tuning's settings (model, LoRA, held-out share, ...) plus DPO's."""

    data: str = ""
    """A JSONL file of preference pairs: {"prompt" or "messages", "chosen", "rejected"} per line."""
    beta: float = 0.1
    """How far the policy may move from the reference (larger: closer to it)."""
    loss: str = "sigmoid"
    """sigmoid (DPO), robust (rDPO) or ipo."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels, in [0, 0.5): conservative DPO (sigmoid) or robust DPO."""
    reference: str = ""
    """The reference model (default: the starting model); it must share the tokenizer."""
    live_reference: bool = False
    """Recompute the reference's log-probs every step instead of once before training."""

    def validate(self) -> None:
        if not self.data:
            raise DozeroError("--data is required: a JSONL file of prompt/chosen/rejected pairs")
        super().validate()
        if self.loss not in LOSSES:
            raise DozeroError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise DozeroError("--beta must be > 0 and --label-smoothing in [0, 0.5)")


DPO_DEFAULTS = dataclasses.replace(
    FINETUNE_DEFAULTS, preset="dpo", out_dir="runs/dpo", micro_batch_size=4, max_steps=100, lr=5e-5, min_lr=5e-6,
    eval_interval=25,
)  # fmt: skip


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss="sigmoid",
             label_smoothing=0.0, chosen_tokens=None, rejected_tokens=None):  # fmt: skip
    """(per-pair losses, chosen rewards, rejected rewards), each (P,), from (P,) summed log-probs.
    `chosen_tokens` / `rejected_tokens` (P,): answer lengths, needed by IPO only."""
    chosen_logratios = policy_chosen - ref_chosen  # (P,)
    rejected_logratios = policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    if loss == "sigmoid":  # cDPO when label_smoothing > 0: the expected loss if a share e of labels is flipped
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss == "robust":  # the unbiased estimate of the clean loss under the same noise (rDPO, eq. 8)
        e = label_smoothing
        losses = (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    elif loss == "ipo":  # per-token log-ratios, pulled toward the margin 1/(2 beta) (IPO eq. 17)
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise DozeroError(f"unknown DPO loss {loss!r}; one of {', '.join(LOSSES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_metrics(losses, chosen_rewards, rejected_rewards) -> dict:
    margins = chosen_rewards - rejected_rewards
    return {
        "dpo_loss": losses.mean().detach(),
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "reward_margin": margins.mean(),
        "reward_accuracy": (margins > 0).float().mean(),
    }


@torch.no_grad()
def reference_logprobs(model, examples, batch_size: int, pad_id: int, device) -> torch.Tensor:
    """(N, 2) log-probs of each pair's chosen and rejected answer under `model` (computed once)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        x, y = (t.to(device) for t in collate_pairs(examples[start : start + batch_size], pad_id))
        chosen, rejected = sequence_logprobs(model, x, y).float().chunk(2)
        out.append(torch.stack([chosen, rejected], dim=1))
    model.train(was_training)
    return torch.cat(out).cpu()


class DPOLoss:
    """loss_fn(model, (x, y, pair indices)) for AlignStepper: reference log-probs looked up (or recomputed)."""

    def __init__(self, settings: DPOConfig, ref_logps: torch.Tensor, live_reference=None):
        self.s, self.ref_logps, self.live_reference = settings, ref_logps, live_reference

    def __call__(self, model, batch):
        x, y, index = batch
        chosen, rejected = sequence_logprobs(model, x, y).chunk(2)  # (P,) each
        if self.live_reference is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected = self.live_reference(x, y).chunk(2)
        else:
            ref = self.ref_logps.to(x.device)[index]  # (P, 2)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        lengths = (y != IGNORE).sum(dim=1).chunk(2)
        losses, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.s.beta, self.s.loss,
                                  self.s.label_smoothing, *lengths)  # fmt: skip
        return losses.mean(), pair_metrics(losses, cr, rr)


def live_reference_fn(model, reference, lora: bool):
    """(x, y) -> (2P,) reference log-probs computed now: `reference` if given, the policy with its LoRA
    switched off, or a frozen copy of the starting weights (made before training)."""
    if reference is not None:
        return lambda x, y: sequence_logprobs(reference, x, y)
    if lora:
        from dozero.align.step import lora_disabled

        def without_lora(x, y):
            with lora_disabled(model):
                return sequence_logprobs(model, x, y)

        return without_lora
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda x, y: sequence_logprobs(frozen, x, y)


def load_reference(spec: str, tokenizer, device):
    """The --reference model, refused when its vocabulary differs from the policy's tokenizer."""
    ref_model, ref_tokenizer, _ = load_base(spec)
    probe = "The quick brown fox, 123 <|im_end|>"
    if ref_tokenizer.vocab_size != tokenizer.vocab_size or ref_tokenizer.encode(
        probe, special="allow"
    ) != tokenizer.encode(probe, special="allow"):
        raise DozeroError(
            f"--reference {spec}: its tokenizer ({ref_tokenizer.vocab_size:,} tokens) is not the policy's "
            f"({tokenizer.vocab_size:,}); log-probabilities of different tokens cannot be compared: use a model "
            "of the same family"
        )
    return ref_model.to(device).eval().requires_grad_(False)


def dpo(settings: DPOConfig, cfg, resume=None, quiet: bool = False):
    """Train per `settings` with the trainer's `cfg` (or continue `resume`). Returns the TrainResult."""
    from dozero.align.step import AlignRecipe, processes, start_run
    from dozero.finetune.lora import apply_lora
    from dozero.train.loop import _finish, _loop

    cfg.validate()
    settings.validate()
    device = runtime.pick_device(cfg.device)
    with runtime.torch_settings(device, cfg.threads), processes(device):
        torch.manual_seed(cfg.seed)
        model, tokenizer, template = load_base(settings.model)
        T = model.cfg.context_length
        if settings.max_length > T:
            raise DozeroError(f"--max-length {settings.max_length} is longer than the model's context ({T})")
        examples, stats = tokenize_pairs(read_pairs(settings.data), tokenizer, template, (settings.max_length or T) + 1)
        train_set, val_set = split(examples, settings.val_fraction, cfg.seed)
        pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        model.to(device)
        reference = load_reference(settings.reference, tokenizer, device) if settings.reference else None
        live = None
        if settings.live_reference:
            live = live_reference_fn(model, reference, bool(settings.lora_rank))
        train_ref = reference_logprobs(reference or model, train_set, cfg.micro_batch_size, pad_id, device)
        val_ref = reference_logprobs(reference or model, val_set, cfg.micro_batch_size, pad_id, device)
        if settings.lora_rank:
            apply_lora(model, settings.lora())
        loss_fn = DPOLoss(settings, train_ref, live)
        val_loss = DPOLoss(settings, val_ref)

        def evaluate(m, val):
            sums, n = {}, 0
            for start in range(0, len(val), cfg.micro_batch_size):
                chunk = val[start : start + cfg.micro_batch_size]
                x, y = (t.to(device) for t in collate_pairs(chunk, pad_id))
                index = torch.arange(start, start + len(chunk), device=device)
                _, metrics = val_loss(m, (x, y, index))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
                n += len(chunk)
            means = {k: v / n for k, v in sums.items()}
            return means["dpo_loss"], means

        loader = PairLoader(train_set, cfg.micro_batch_size, cfg.seed, pad_id, runtime.rank(), runtime.world_size())
        tokens_per_step = round(
            settings.accumulation * cfg.micro_batch_size * runtime.world_size() * stats.tokens / max(1, stats.pairs)
        )
        recipe = AlignRecipe("dpo", settings, template, pad_id, evaluate)
        source = f"{settings.data}: {stats.describe()}; {len(train_set)} for training, {len(val_set)} held out"
        run = start_run(settings, cfg, model, tokenizer, loss_fn, recipe, (train_set, val_set, loader, tokens_per_step),
                        resume, device, source, quiet)  # fmt: skip
        run.observer.write(
            f"DPO ({settings.loss}, beta {settings.beta}) of {settings.model}, reference "
            f"{settings.reference or 'the starting model'} ({'live' if live else 'log-probs computed once'}); {source}"
        )
        _loop(run)
        return _finish(run)
