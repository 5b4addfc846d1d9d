"""Supervised fine-tuning (SFT): teach a pretrained model to answer, scoring only its answers.

    from dozero.finetune.sft import FinetuneConfig, finetune, FINETUNE_DEFAULTS
    finetune(FinetuneConfig(model="smollm2-135m-instruct", data="chat.jsonl", lora_rank=8), FINETUNE_DEFAULTS)

What changes from pretraining (course chapter 7; LLMs-from-scratch ch07; nanochat chat_sft.py): the
data are conversations rendered with the model's chat template, and the loss is the cross-entropy
of the assistant's tokens only (finetune/data.py puts -100 everywhere else), so the model learns to
answer, not to write questions. Everything else is the trainer's: the same loop, Stepper, AdamW and
schedule, accumulation, AMP, signals, metrics.jsonl, loss.png, report.md and verified checkpoints
with exact resume (train/loop.py), through the loop's `recipe` hook for what differs here:
validation is the masked loss over every held-out conversation, and a checkpoint holds the merged
model (loadable by every dozero verb) plus, with LoRA, the adapter in PEFT's layout; resume reloads
the base model (--model) and the adapter, so the frozen weights are bit-exact.

With --lora-rank R only the low-rank matrices train (finetune/lora.py); 0 trains every weight.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dozero import runtime
from dozero.errors import DozeroError
from dozero.finetune.data import IGNORE, SFTLoader, collate, read_jsonl, split, tokenize
from dozero.finetune.lora import LoRAConfig, apply_lora, lora_layers, merge_lora, save_adapter, trainable_parameters
from dozero.finetune.packing import PackedForward
from dozero.train import checkpoint as ckpt
from dozero.train.config import TrainConfig

FINETUNE_FILE = "finetune_config.json"


@dataclass
class FinetuneConfig:
    """What to fine-tune on what; the optimization settings are the trainer's TrainConfig."""

    model: str = "smollm2-135m-instruct"
    """The model to start from: a run folder, a model folder, a GGUF file or a short name."""
    data: str = ""
    """A JSONL file of chat ({"messages": [...]}) or Alpaca ({"instruction", "input", "output"}) records."""
    val_fraction: float = 0.1
    """Share of the conversations held out for validation (at least one)."""
    max_length: int = 0
    """Longest conversation in tokens (0: the model's context length)."""
    too_long: str = "truncate"
    """A conversation longer than max_length: 'truncate' (keep its start) or 'drop'; both are counted."""
    batching: str = "pad"
    """How a batch holds its conversations: 'pad' (one row each, padded to the batch's longest) or 'pack'
    (one after another in rows of max_length, kept apart by an attention mask). Same loss. Measured on a
    CPU (docs/en/fine-tuning.md): 'pack' 1.54x faster for SmolLM2-135M on short chats, 'pad' faster in
    the other three cases (longer chats, a small model)."""
    accumulation: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    lora_rank: int = LoRAConfig.rank
    """LoRA rank r; 0 trains every weight (full fine-tuning)."""
    lora_alpha: float = LoRAConfig.alpha
    """LoRA alpha: the update is scaled by alpha / rank."""
    lora_dropout: float = LoRAConfig.dropout
    """Dropout on the LoRA branch's input."""
    lora_targets: str = LoRAConfig.targets
    """Layers that get LoRA in every block: qkv, out_proj, fc, proj (comma-separated)."""
    quantize: str = ""
    """QLoRA: hold the frozen base's block layers as 'int8' or 'int4' while LoRA trains (less memory;
    needs --lora-rank > 0). Checkpoints are float, the adapter merged into the dequantized weights."""

    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    def validate(self) -> None:
        if not self.data:
            raise DozeroError("--data is required: a JSONL file of chat or Alpaca records")
        if not 0 < self.val_fraction < 1:
            raise DozeroError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_length < 0 or self.accumulation < 1 or self.lora_rank < 0:
            raise DozeroError("--max-length and --lora-rank must be >= 0, --accumulation >= 1")
        if self.quantize not in ("", "int8", "int4"):
            raise DozeroError(f"--quantize must be int8 or int4, got {self.quantize!r}")
        if self.quantize and not self.lora_rank:
            raise DozeroError("--quantize needs LoRA (--lora-rank > 0): a quantized base is frozen")
        if self.batching not in ("pad", "pack"):
            raise DozeroError(f"--batching must be 'pad' or 'pack', got {self.batching!r}")


# Fine-tuning's defaults for the trainer: a few hundred steps at a LoRA-sized learning rate (QLoRA and
# PEFT's examples use 1e-4 to 2e-4; for full fine-tuning lower it, e.g. --lr 2e-5), no weight decay
# (it would pull the adapter toward zero, i.e. toward the base model, for no gain on small data).
FINETUNE_DEFAULTS = dataclasses.replace(
    TrainConfig(),
    preset="finetune",
    out_dir="runs/finetune",
    micro_batch_size=8,
    max_steps=200,
    lr=2e-4,
    min_lr=2e-5,
    warmup_steps=10,
    schedule="cosine",
    weight_decay=0.0,
    eval_interval=50,
    sample_tokens=0,
)


class SFTRecipe:
    """The loop's hook (train/loop.py `Run.recipe`): masked validation and what a checkpoint holds."""

    verb = "finetune"
    cross_entropy = True  # the held-out score is a loss per token: its exp is a perplexity

    def __init__(self, ft: FinetuneConfig, template: str, pad_id: int):
        self.ft, self.template, self.pad_id = ft, template, pad_id

    @torch.no_grad()
    def evaluate(self, model, val, cfg, T, device, dtype) -> float:
        """Mean loss per answer token over every held-out conversation (not a mean of batch means)."""
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), device=device), 0
        for start in range(0, len(val), cfg.micro_batch_size):
            x, y = (t.to(device) for t in collate(val[start : start + cfg.micro_batch_size], self.pad_id))
            with runtime.autocast(device, dtype):
                logits = model(x)  # (B, L-1, V)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
            count += int((y != IGNORE).sum())
        model.train(was_training)
        return float(runtime.all_reduce_mean(total / count))

    def checkpoint(self, model):
        """(plain model to save, metadata, writer of the adapter files): a LoRA model is saved merged
        (every verb loads it as is) with its adapter beside, which is what resume reads."""
        metadata = {"chat_template": self.template, "finetune": dataclasses.asdict(self.ft)}
        if not lora_layers(model):
            return model, metadata, None
        merged = merge_lora(copy.deepcopy(model))
        return merged, metadata, lambda folder: save_adapter(model, folder, base_model=self.ft.model)


def finetune(ft: FinetuneConfig, cfg: TrainConfig, resume=None, quiet: bool = False):
    """Fine-tune per `ft` with the trainer's settings `cfg`, or continue the run `resume` names (a run
    folder or one of its checkpoints). Returns the trainer's TrainResult."""
    from dozero.train.loop import _finish, _loop

    ft.validate()
    # The trainer's data/tokenizer fields are pretraining's; set them so train_config.json and report.md
    # say what this run read (the tokenizer is the model's own).
    cfg = dataclasses.replace(cfg, data=ft.data, tokenizer=ft.model)
    cfg.validate()
    device = runtime.pick_device(cfg.device)
    with runtime.torch_settings(device, cfg.threads):
        distributed = runtime.init_distributed(device)
        try:
            run = _setup(ft, cfg, resume, device, quiet)
            _loop(run)
            result = _finish(run)
            if run.loader.padded and not quiet and runtime.is_main():  # what --batching pad/pack costs here
                waste = 1 - run.loader.real / run.loader.padded
                print(f"batches ({ft.batching}): {waste:.0%} of the positions computed were padding")
            return result
        finally:
            if distributed:
                runtime.destroy_distributed()


def load_base(spec: str):
    """(model, tokenizer, template) to start from; a dozero BPE model without ChatML tokens gets them."""
    from dozero.finetune.chat import CHATML_TEMPLATE, add_chat_tokens, chat_template
    from dozero.model.checkpoint import load_model, resolve_model_dir
    from dozero.tokenizer import load_tokenizer

    folder = resolve_model_dir(spec)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder)
    tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {folder}")
    template = chat_template(tokenizer, folder if folder.is_dir() else None)
    if template == CHATML_TEMPLATE:
        tokenizer, model = add_chat_tokens(tokenizer, model)
    return model, tokenizer, template


def quantize_base(model, kind: str):
    """QLoRA's base (Dettmers et al. 2023): every block's linear layer as int8 (a scale per row) or int4
    (groups of 32, llama.cpp's Q4_0 rule), in place. The embedding and the tied head stay float, as
    QLoRA keeps them in 16 bits: a lookup, and the one layer every token's loss reads. The reference
    kernel: LoRA's backward recomputes the product in float, so the forward must be that same product
    (the bfloat16 "packed" kernel would make the two disagree)."""
    from dozero.compress.quantize import QuantizeConfig, quantize

    return quantize(model, QuantizeConfig(bits=8 if kind == "int8" else 4, head=False, kernel="reference"))


def _setup(ft: FinetuneConfig, cfg: TrainConfig, resume, device, quiet: bool):
    from dozero.files import write_json
    from dozero.train.corpus import Corpus
    from dozero.train.loop import Run, TrainResult
    from dozero.train.observe import RunObserver, disk_error
    from dozero.train.optim import make_optimizer
    from dozero.train.step import Stepper

    main = runtime.is_main()
    torch.manual_seed(cfg.seed)
    run_dir = ckpt.session_run_dir(cfg, resume, main)  # first: a foreign folder is refused before any work
    model, tokenizer, template = load_base(ft.model)
    T = model.cfg.context_length
    if ft.max_length > T:
        raise DozeroError(f"--max-length {ft.max_length} is longer than the model's context ({T})")
    examples, stats = tokenize(read_jsonl(ft.data), tokenizer, template, (ft.max_length or T) + 1, ft.too_long)
    train_set, val_set = split(examples, ft.val_fraction, cfg.seed)
    if ft.quantize:
        quantize_base(model, ft.quantize)
    if ft.lora_rank:
        apply_lora(model, ft.lora())
    model.to(device).train()
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    window = (ft.max_length or T) if ft.batching == "pack" else 0
    loader = SFTLoader(train_set, cfg.micro_batch_size, cfg.seed, pad_id, runtime.rank(), runtime.world_size(), window)
    optimizer = make_optimizer(model, cfg, device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    scaler = runtime.grad_scaler(device, dtype)
    result = TrainResult(run_dir=run_dir, step=0)
    if resume:
        state = _restore(resume, run_dir, model, optimizer, loader, scaler)
        result.step, result.best_val_loss = state["step"], state.get("best_val_loss")
    if result.step >= cfg.max_steps:
        raise DozeroError(f"{run_dir} already ran {result.step} of {cfg.max_steps} steps; give a larger --max-steps")
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_run_config(run_dir, cfg, model.cfg)
            write_json(run_dir / FINETUNE_FILE, dataclasses.asdict(ft), indent=1)
        except OSError as e:
            raise disk_error(e, run_dir) from None
    forward = runtime.wrap_ddp(PackedForward(model) if window else model, device)
    stepper = Stepper(forward, model, optimizer, loader, cfg, ft.accumulation, device, dtype, scaler)
    observer = RunObserver(run_dir, main, cfg.max_steps, result.step, show=not quiet, tensorboard=cfg.tensorboard)
    mean_length = stats.tokens / max(1, len(examples))
    tokens_per_step = round(ft.accumulation * cfg.micro_batch_size * runtime.world_size() * mean_length)
    source = f"{ft.data}: {stats.describe()}; {len(train_set)} for training, {len(val_set)} held out"
    run = Run(cfg, model.cfg, run_dir, device, dtype, Corpus(tokenizer, train_set, val_set, source), model, optimizer,
              scaler, loader, stepper, observer, tokens_per_step, result, step=result.step,
              recipe=SFTRecipe(ft, template, pad_id))  # fmt: skip
    mode = f"LoRA rank {ft.lora_rank} on {ft.lora_targets}" if ft.lora_rank else "full fine-tuning"
    mode += f" over an {ft.quantize} base" if ft.quantize else ""
    mode += f", batches {'packed' if window else 'padded'}"
    observer.write(
        f"fine-tuning {trainable_parameters(model):,} of {_count_weights(model):,} parameters ({mode}) of "
        f"{ft.model} on {runtime.describe_hardware(device)}; {source}; run folder {run_dir}"
    )
    return run


def _count_weights(model) -> int:
    """Parameters, and the numbers a quantized layer holds as integers (buffers, not parameters)."""
    from dozero.model.quantized import QuantizedLinear

    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return model.num_parameters() + sum(m.in_features * m.out_features for m in quantized)


def _restore(resume, run_dir, model, optimizer, loader, scaler) -> dict:
    """The checkpoint's trained weights (with LoRA: its adapter onto the freshly loaded base, so the
    frozen weights are the base's own bits), optimizer, loader position and RNGs."""
    import sys

    from dozero.finetune.lora import ADAPTER_WEIGHTS, adapter_tensors
    from dozero.model.checkpoint import load_model, read_safetensors

    folder, note = ckpt.find_resume_point(resume)
    if lora_layers(model):
        saved = read_safetensors(folder / ADAPTER_WEIGHTS)
        names = list(adapter_tensors(model))
        if sorted(saved) != sorted(names):
            raise DozeroError(f"{folder}: the adapter does not match this run's LoRA settings")
        params = [p for _, _, layer in lora_layers(model) for A, B in zip(layer.lora_A, layer.lora_B, strict=True)
                  for p in (A, B)]  # fmt: skip
        with torch.no_grad():
            for name, p in zip(names, params, strict=True):
                p.copy_(saved[name])
    else:
        model.load_state_dict(load_model(folder).state_dict())
    state = ckpt.load_trainer_state(folder, optimizer)
    ckpt.check_finite(folder, model, optimizer)
    loader.load_state_dict(state["loader"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    runtime.set_rng_state(state["rng"])
    if runtime.is_main():
        ckpt.set_aside_later_checkpoints(run_dir, state["step"])
        if note:
            print(note, file=sys.stderr)
    return state


def read_finetune_config(run_dir) -> FinetuneConfig:
    from pathlib import Path

    from dozero.model.checkpoint import read_json

    saved = read_json(Path(run_dir) / FINETUNE_FILE)
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in saved.items() if k in known})
