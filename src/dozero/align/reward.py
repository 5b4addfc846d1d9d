"""A reward model: the transformer with a scalar head on the last token, trained on preference pairs.

    from dozero.align.reward import RewardConfig, REWARD_DEFAULTS, train_reward, reward_function
    train_reward(RewardConfig(model="smollm2-135m-instruct", data="pairs.jsonl"), REWARD_DEFAULTS)
    score = reward_function("runs/reward")          # score(prompt, answer, record) -> float, for `align rl`

Step 1 of RLHF (InstructGPT, Ouyang et al. 2022): people compare two answers; a model learns to
score answers so that the preferred one scores higher. The Bradley-Terry model says
P(chosen > rejected) = sigmoid(r_chosen - r_rejected), so the loss is -log sigmoid(r_c - r_r) and the
held-out accuracy is the share of pairs where r_c > r_r. The score is read at the last token of
prompt + answer (the end-of-turn token): the one position that has attended to the whole answer.

`RewardModel` is a transformation of a finished GPTModel (STYLE.md rule 2): its output head is put
aside and replaced by the identity, so the body returns hidden states (B, T, C), and a Linear(C, 1)
reads the score. A checkpoint is the plain language model (the head put back; loadable by every
verb) plus reward_head.safetensors, and with LoRA the adapter: resume restores all three exactly.

Legend: B sequences, T positions, C embedding width, P pairs.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dozero import runtime
from dozero.align.data import PairLoader, read_pairs, tokenize_pairs
from dozero.align.dpo import DPO_DEFAULTS
from dozero.align.step import AlignRecipe
from dozero.errors import DozeroError
from dozero.finetune.data import split
from dozero.finetune.sft import FinetuneConfig, load_base

HEAD_FILE = "reward_head.safetensors"


@dataclass
class RewardConfig(FinetuneConfig):
    data: str = ""
    """A JSONL file of preference pairs: {"prompt" or "messages", "chosen", "rejected"} per line."""

    def validate(self) -> None:
        if not self.data:
            raise DozeroError("--data is required: a JSONL file of prompt/chosen/rejected pairs")
        super().validate()


REWARD_DEFAULTS = dataclasses.replace(DPO_DEFAULTS, preset="reward", out_dir="runs/reward", lr=1e-4)


class RewardModel(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.cfg = backbone, backbone.cfg
        self._lm_head = [backbone.out_head]  # in a list: kept, not registered (not trained, not in state_dict)
        backbone.out_head = nn.Identity()
        self.head = nn.Linear(backbone.cfg.emb_dim, 1)
        nn.init.normal_(self.head.weight, std=1 / (backbone.cfg.emb_dim + 1) ** 0.5)  # InstructGPT-style small init
        nn.init.zeros_(self.head.bias)

    @property
    def trf_blocks(self):  # so LoRA's helpers (lora_layers) see the body's blocks
        return self.backbone.trf_blocks

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """x (B, T) ids, last (B,) index of each row's last real token -> (B,) scores."""
        hidden = self.backbone(x)  # (B, T, C): the identity head returns the final-norm states
        picked = hidden[torch.arange(len(x), device=x.device), last]  # (B, C)
        return self.head(picked).squeeze(-1)

    @contextmanager
    def as_language_model(self):
        """The body with its output head back (for saving and restoring as an ordinary GPTModel)."""
        self.backbone.out_head = self._lm_head[0]
        try:
            yield self.backbone
        finally:
            self.backbone.out_head = nn.Identity()


def pad_full(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, L), last (B,)): whole sequences right-padded, and the index of each one's last token."""
    L = max(len(s) for s in sequences)
    x = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    for b, s in enumerate(sequences):
        x[b, : len(s)] = torch.tensor(s)
    return x, torch.tensor([len(s) - 1 for s in sequences])


def pair_batch(pairs, pad_id: int):
    return pad_full([c for (c, _), _ in pairs] + [r for _, (r, _) in pairs], pad_id)


class RewardLoader(PairLoader):
    def next_batch(self):
        x, y, index = super().next_batch()
        return pair_batch([self.examples[i] for i in index.tolist()], self.pad_id)


def bradley_terry(model, batch):
    x, last = batch
    chosen, rejected = model(x, last).float().chunk(2)  # (P,) each
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.mean().detach()}


class RewardRecipe(AlignRecipe):
    """Checkpoints: the language model (head back, LoRA merged) + reward_head.safetensors (+ adapter)."""

    def checkpoint(self, model):
        from dozero.model.checkpoint import write_safetensors

        with model.as_language_model() as lm:
            saved, metadata, adapter = super().checkpoint(lm)
            saved = copy.deepcopy(saved) if saved is lm else saved

        def write(folder):
            write_safetensors(
                Path(folder) / HEAD_FILE, {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
            )
            if adapter is not None:
                adapter(folder)

        return saved, {**metadata, "reward_head": HEAD_FILE}, write


def train_reward(settings: RewardConfig, cfg, resume=None, quiet: bool = False):
    """Train a reward model per `settings` (or continue `resume`). Returns the TrainResult; its
    val_loss is the held-out Bradley-Terry loss, and metrics.jsonl has val_accuracy."""
    from dozero.align.step import processes, start_run
    from dozero.finetune.lora import apply_lora
    from dozero.model.checkpoint import read_safetensors
    from dozero.train.checkpoint import find_resume_point
    from dozero.train.loop import _finish, _loop

    cfg.validate()
    settings.validate()
    device = runtime.pick_device(cfg.device)
    with runtime.torch_settings(device, cfg.threads), processes(device):
        torch.manual_seed(cfg.seed)
        lm, tokenizer, template = load_base(settings.model)
        T = lm.cfg.context_length
        examples, stats = tokenize_pairs(read_pairs(settings.data), tokenizer, template, settings.max_length or T)
        train_set, val_set = split(examples, settings.val_fraction, cfg.seed)
        if settings.lora_rank:
            apply_lora(lm, settings.lora())
        model = RewardModel(lm).to(device)
        pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0

        def evaluate(m, val):
            sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
            for start in range(0, len(val), cfg.micro_batch_size):
                chunk = val[start : start + cfg.micro_batch_size]
                loss, metrics = bradley_terry(m, [t.to(device) for t in pair_batch(chunk, pad_id)])
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] += float(v) * len(chunk)
            means = {k: v / len(val) for k, v in sums.items()}
            return means["loss"], means

        loader = RewardLoader(train_set, cfg.micro_batch_size, cfg.seed, pad_id, runtime.rank(), runtime.world_size())
        tokens_per_step = round(
            settings.accumulation * cfg.micro_batch_size * runtime.world_size() * stats.tokens / max(1, stats.pairs)
        )
        recipe = RewardRecipe("reward", settings, template, pad_id, evaluate)
        source = f"{settings.data}: {stats.describe()}; {len(train_set)} for training, {len(val_set)} held out"
        head_state = None
        if resume:  # the head is not part of the language model the trainer restores
            head_state = read_safetensors(find_resume_point(resume)[0] / HEAD_FILE)
        with model.as_language_model():
            run = start_run(settings, cfg, model, tokenizer, bradley_terry, recipe,
                            (train_set, val_set, loader, tokens_per_step), resume, device, source, quiet,
                            restore_model=model.backbone)  # fmt: skip
        if head_state is not None:
            model.head.load_state_dict(head_state)
        _loop(run)
        return _finish(run)


def load_reward_model(folder: str | Path, device=None):
    """(RewardModel, tokenizer, template) from a `dozero align reward` run or checkpoint folder."""
    from dozero.model.checkpoint import read_safetensors, resolve_model_dir

    folder = resolve_model_dir(folder)
    if not (folder / HEAD_FILE).is_file():
        raise DozeroError(f"{folder} is not a reward model (no {HEAD_FILE}); train one with `dozero align reward`")
    lm, tokenizer, template = load_base(str(folder))
    model = RewardModel(lm)
    model.head.load_state_dict(read_safetensors(folder / HEAD_FILE))
    return model.to(device or "cpu").eval(), tokenizer, template


def reward_function(folder, device=None):
    """score(prompt, answer, record) -> float from a trained reward model (the RLHF path of `align rl`)."""
    from dozero.align.data import render_answer

    model, tokenizer, template = load_reward_model(folder, device)
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(prompt: str, answer: str, record: dict) -> float:
        ids, _ = render_answer(tokenizer, record.get("messages") or [{"role": "user", "content": prompt}], answer,
                               template)  # fmt: skip
        ids = ids[-model.cfg.context_length :]
        return float(model(torch.tensor([ids], device=device), torch.tensor([len(ids) - 1], device=device)))

    return score
