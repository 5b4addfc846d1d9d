"""Reinforcement learning from rewards, GRPO-style: sample a group of answers, reward them, push up the better.

    from dozero.align.rl import RLConfig, RL_DEFAULTS, rl
    rl(RLConfig(model="smollm2-135m-instruct", data="prompts.jsonl", reward="number"), RL_DEFAULTS)

One step (DeepSeekMath, Shao et al. 2024, section 4.1; nanochat chat_rl.py):
    1. rollouts: `prompts_per_step` prompts, `group_size` sampled answers each, one batch through the
       KV-cache engine (align/rollout.py);
    2. rewards r_i from a Python function of (prompt, answer, record) -- a verifiable check -- or from
       a reward model (align/reward.py: the RLHF path);
    3. group-normalized advantages, the same for every token of answer i (outcome supervision):
           A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
       no value network: the group's mean is the baseline;
    4. loss per token, averaged over each answer's tokens, then over answers (GRPO eq. 3):
           -[min(ratio A, clip(ratio, 1-e, 1+e) A) - kl_coef * KL]     ratio = pi / pi_old
       with the unbiased, always-positive KL estimator pi_ref/pi - log(pi_ref/pi) - 1 (Schulman 2020).
       The answers were sampled by this very policy, so pi_old = pi (ratio 1, its gradient A grad log pi);
       the clip matters with --ppo-epochs > 1, where the same rollouts are reused. The forward and
       backward run over --micro-batch-size answers at a time, gradients accumulated (the same step,
       with one chunk's activations in memory).
Why the reference and KL: the reward is a proxy; maximized alone, the policy finds what the reward
function scores but nobody meant (docs/en/alignment.md shows it), and forgets how to write. The KL
term keeps it near the model that could.

A reward function that raises or returns NaN/inf skips the step (nothing is applied), counted in
metrics.jsonl as reward_errors, and the run goes on. Logged every step: mean reward, pass@1 (share of
answers with reward >= --pass-threshold), pass@k (share of prompts with at least one such answer among
its k), KL, answer length. Validation: greedy answers to the held-out prompts, scored by the reward.

Legend: G answers (prompts_per_step x group_size), L prompt + answer tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from dozero import runtime
from dozero.align.logprobs import token_logprobs
from dozero.align.rewards import load_reward, read_prompts
from dozero.align.rollout import end_id, prompt_ids, rollout
from dozero.errors import DozeroError
from dozero.finetune.data import IGNORE, SFTLoader, split
from dozero.finetune.sft import FINETUNE_DEFAULTS, FinetuneConfig, load_base
from dozero.generate.config import GenerationConfig


@dataclass
class RLConfig(FinetuneConfig):
    """Fine-tuning's settings (model, LoRA, held-out share, ...) plus the RL step's."""

    data: str = ""
    """A JSONL file of prompts: {"prompt" or "messages", any fields the reward reads (e.g. "answer")}."""
    reward: str = "number"
    """number | exact | contains | ends_with:WORD, a Python function FILE.py:NAME, or a reward model folder."""
    group_size: int = 8
    """Answers sampled per prompt (the group whose mean is the baseline)."""
    prompts_per_step: int = 4
    """Prompts per optimizer step."""
    max_new_tokens: int = 32
    """Longest answer in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    kl_coef: float = 0.04
    """Weight of the KL penalty to the reference (0: no anchor, see reward hacking in the guide)."""
    clip: float = 0.2
    """PPO clip range of the probability ratio."""
    ppo_epochs: int = 1
    """Optimizer passes over the same rollouts (>1: the ratio and the clip come into play)."""
    pass_threshold: float = 1.0
    """An answer with at least this reward counts as correct for pass@1 / pass@k."""

    def validate(self) -> None:
        if not self.data:
            raise DozeroError("--data is required: a JSONL file of prompts")
        super().validate()
        if self.group_size < 2 or self.prompts_per_step < 1 or self.max_new_tokens < 1 or self.ppo_epochs < 1:
            raise DozeroError("--group-size must be >= 2; --prompts-per-step, --max-new-tokens, --ppo-epochs >= 1")


RL_DEFAULTS = dataclasses.replace(
    FINETUNE_DEFAULTS, preset="rl", out_dir="runs/rl", max_steps=50, lr=1e-4, min_lr=1e-5, warmup_steps=0,
    eval_interval=10, on_nan="skip",
)  # fmt: skip


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(G,) rewards, prompt-major groups -> (G,) advantages (r - mean) / (std + eps) within each group
    (std with Bessel's correction, as TRL's GRPOTrainer; a group of equal rewards gives 0: nothing to learn)."""
    groups = rewards.view(-1, group_size)  # (prompts, k)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip: float, kl_coef: float):
    """Per-token (G, L) log-probs of the sampled tokens (policy, sampling policy, reference), (G,) advantages,
    (G, L) answer mask -> (loss, mean KL). Each answer's tokens are averaged, then the answers."""
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]  # (G, 1)
    surrogate = torch.minimum(ratio * A, torch.clamp(ratio, 1 - clip, 1 + clip) * A)
    log_ref_ratio = ref_logps - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # >= 0, unbiased for KL(pi || pi_ref)
    per_token = -(surrogate - kl_coef * kl)
    mask = mask.float()
    per_answer = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (G,)
    mean_kl = ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return per_answer.mean(), mean_kl.detach()


def pass_at(rewards: torch.Tensor, group_size: int, threshold: float) -> tuple[float, float]:
    """(pass@1, pass@k): the share of correct answers, and of prompts with at least one correct answer."""
    correct = (rewards >= threshold).view(-1, group_size)
    return float(correct.float().mean()), float(correct.any(dim=1).float().mean())


def batch_of(prompts: list[list[int]], completions: list[list[int]], k: int, pad_id: int):
    """x, y (G, L-1): each prompt + completion; targets only on the completion's tokens."""
    from dozero.finetune.data import collate

    repeated = [p for p in prompts for _ in range(k)]
    rows = [(p + c, [0] * len(p) + [1] * len(c)) for p, c in zip(repeated, completions, strict=True)]
    return collate(rows, pad_id)


class PromptLoader(SFTLoader):
    """SFTLoader's shuffled order and exact-resume position; a batch is a list of prompt records."""

    def next_batch(self):
        order = self._order()
        start = (self.index * self.world_size + self.rank) * self.batch_size
        if start >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order, start = self._order(), self.rank * self.batch_size
        self.index += 1
        return [self.examples[i] for i in (order * 2)[start : start + self.batch_size]]


class RLStepper:
    """One RL step as the trainer's loop calls it: index -> (loss, applied)."""

    def __init__(
        self, model, optimizer, loader, cfg, settings: RLConfig, tokenizer, template, reward_fn, device, dtype
    ):
        self.model, self.optimizer, self.loader, self.cfg, self.s = model, optimizer, loader, cfg, settings
        self.tokenizer, self.reward_fn, self.device, self.dtype = tokenizer, reward_fn, device, dtype
        self.end = end_id(tokenizer, template)
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.observer, self.done, self.reward_errors = None, 0, 0
        self.reference = reference_fn(model, bool(settings.lora_rank))
        # Under torchrun: the training forward through DDP (gradients averaged over ranks); the
        # rollouts and the reference through the model itself (no gradients to share).
        self.forward = runtime.wrap_ddp(model, device)

    def answers(self, prompts, k: int, config) -> tuple[list[list[int]], list[str]]:
        completions = rollout(self.model, prompts, k, config, self.end)
        return completions, [self.tokenizer.decode([t for t in c if t != self.end]) for c in completions]

    def score(self, records, texts, k: int) -> torch.Tensor:
        """(G,) rewards; raises DozeroError when the reward function fails or is not finite."""
        rewards = []
        for i, text in enumerate(texts):
            record = records[i // k]
            try:
                value = float(self.reward_fn(record["messages"][-1]["content"], text, record))
            except DozeroError:
                raise
            except Exception as e:
                raise DozeroError(f"the reward function raised {type(e).__name__}: {e}") from None
            if not math.isfinite(value):
                raise DozeroError(f"the reward function returned {value}")
            rewards.append(value)
        return torch.tensor(rewards)

    def __call__(self, index: int):
        from dozero.align.step import agree, mean_over_ranks
        from dozero.train.optim import lr_at, set_lr

        s, k = self.s, self.s.group_size
        set_lr(self.optimizer, lr_at(index, self.cfg))
        self.done = index + 1
        records = self.loader.next_batch()
        prompts = [r["ids"] for r in records]
        world, rank = runtime.world_size(), runtime.rank()  # each rank samples its own prompts, its own noise
        config = GenerationConfig(temperature=s.temperature, top_k=None, max_new_tokens=s.max_new_tokens,
                                  seed=self.cfg.seed + index * world + rank)  # fmt: skip
        completions, texts = self.answers(prompts, k, config)
        error = None
        try:
            rewards = self.score(records, texts, k)
        except DozeroError as e:  # skipped and counted; the run goes on
            error = str(e)
        if agree(error is not None):  # on every rank, so none waits for another's gradients
            self.reward_errors += 1
            self.log(index, reward_errors=self.reward_errors, reward_error=(error or "on another rank")[:200])
            return torch.tensor(math.nan), False
        advantages = group_advantages(rewards, k).to(self.device)
        x, y = (t.to(self.device) for t in batch_of(prompts, completions, k, self.pad_id))
        mask = y != IGNORE
        with torch.no_grad(), runtime.autocast(self.device, self.dtype):
            ref = self.reference(x, y)
            old = token_logprobs(self.model, x, y) if s.ppo_epochs > 1 else None
        for _ in range(s.ppo_epochs):
            loss, kl = self.backward(x, y, mask, advantages, ref, old)
            if agree(not torch.isfinite(loss)):
                self.optimizer.zero_grad(set_to_none=True)
                return loss, False
            if self.cfg.grad_clip > 0:
                params = [p for p in self.model.parameters() if p.requires_grad]
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        pass1, passk = pass_at(rewards, k, s.pass_threshold)
        lengths = sum(len(c) for c in completions) / len(completions)
        self.log(index, **mean_over_ranks(dict(mean_reward=float(rewards.mean()), pass_at_1=pass1, pass_at_k=passk,
                                               kl=float(kl), answer_tokens=lengths)))  # fmt: skip
        return loss, True

    def backward(self, x, y, mask, advantages, ref, old):
        """The GRPO loss's gradient, accumulated over chunks of --micro-batch-size answers: the loss is a
        mean over answers, so the chunks' shares add up to it, and only one chunk's activations are held
        (for SmolLM2 they, not the logits, are most of a step's memory). Returns (loss, mean KL), detached."""
        s, G = self.s, len(x)
        n = self.cfg.micro_batch_size or G
        loss_sum, kl_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for start in range(0, G, n):
            part = slice(start, start + n)
            share = len(x[part]) / G
            with runtime.no_sync(self.forward, start + n < G), runtime.autocast(self.device, self.dtype):
                logps = token_logprobs(self.forward, x[part], y[part])  # (n, L-1)
                loss, kl = grpo_loss(logps, logps.detach() if old is None else old[part], ref[part], advantages[part],
                                     mask[part], s.clip, s.kl_coef)  # fmt: skip
            (loss * share).backward()
            loss_sum += loss.detach() * share
            kl_sum += kl * share
        return loss_sum, kl_sum

    def log(self, index: int, **values) -> None:
        if self.observer is not None:
            self.observer.log([{"step": index + 1, **values}])


def reference_fn(model, lora: bool):
    """(x, y) -> (G, L-1) reference log-probs of the targets: the policy with LoRA off (no second model
    in memory), or a frozen copy of the starting weights. Called under no_grad."""
    import copy

    from dozero.align.step import lora_disabled

    if lora:

        def without_lora(x, y):
            with lora_disabled(model):
                return token_logprobs(model, x, y)

        return without_lora
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda x, y: token_logprobs(frozen, x, y)


def held_out_reward(stepper: RLStepper, records) -> dict:
    """Greedy answers to held-out prompts, scored: mean reward and accuracy (share >= pass_threshold)."""
    config = GenerationConfig(temperature=0.0, max_new_tokens=stepper.s.max_new_tokens)
    _, texts = stepper.answers([r["ids"] for r in records], 1, config)
    rewards = stepper.score(records, texts, 1)
    return {
        "mean_reward": float(rewards.mean()),
        "accuracy": float((rewards >= stepper.s.pass_threshold).float().mean()),
    }


def rl(settings: RLConfig, cfg, resume=None, quiet: bool = False, reward_fn=None):
    """Train per `settings` with the trainer's `cfg` (or continue `resume`); `reward_fn` overrides
    settings.reward from Python. Returns the TrainResult (its val_loss is minus the held-out mean reward)."""
    from dozero.align.step import AlignRecipe, processes, start_run
    from dozero.finetune.lora import apply_lora
    from dozero.train.loop import _finish, _loop

    cfg.validate()
    settings.validate()
    device = runtime.pick_device(cfg.device)
    with runtime.torch_settings(device, cfg.threads), processes(device):
        torch.manual_seed(cfg.seed)
        model, tokenizer, template = load_base(settings.model)
        label = settings.reward if reward_fn is None else getattr(reward_fn, "__name__", "a Python function")
        reward_fn = reward_fn or load_reward(settings.reward, device)
        records = read_prompts(settings.data)
        limit = (settings.max_length or model.cfg.context_length) - settings.max_new_tokens
        for r in records:
            r["ids"] = prompt_ids(tokenizer, template, r["messages"])
        kept = [r for r in records if len(r["ids"]) <= limit]
        if not kept:
            raise DozeroError(f"every prompt is longer than the context minus --max-new-tokens ({limit} tokens)")
        train_set, val_set = split(kept, settings.val_fraction, cfg.seed)
        if settings.lora_rank:
            apply_lora(model, settings.lora())
        model.to(device)
        loader = PromptLoader(train_set, settings.prompts_per_step, cfg.seed, 0, runtime.rank(), runtime.world_size())
        pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        holder = {}

        def evaluate(m, val):
            metrics = held_out_reward(holder["stepper"], val)
            return -metrics["mean_reward"], metrics

        recipe = AlignRecipe("rl", settings, template, pad_id, evaluate)
        answers_per_step = settings.prompts_per_step * settings.group_size * runtime.world_size()
        tokens_per_step = answers_per_step * settings.max_new_tokens
        source = (f"{settings.data}: {len(records)} prompts ({len(records) - len(kept)} dropped as longer than the "
                  f"context), {len(train_set)} for training, {len(val_set)} held out")  # fmt: skip
        run = start_run(settings, cfg, model, tokenizer, None, recipe, (train_set, val_set, loader, tokens_per_step),
                        resume, device, source, quiet)  # fmt: skip
        stepper = RLStepper(
            model, run.optimizer, loader, cfg, settings, tokenizer, template, reward_fn, device, run.dtype
        )
        stepper.observer, holder["stepper"] = run.observer, stepper
        run.stepper = recipe.stepper = stepper
        run.observer.write(
            f"RL of {settings.model}: {settings.prompts_per_step} prompts x {settings.group_size} answers per step, "
            f"reward {label}, "
            f"KL {settings.kl_coef}; {source}"
        )
        _loop(run)
        return _finish(run)
