"""How to train: one typed dataclass (`TrainConfig`) and named presets.

Every field becomes a `dozero train` flag (its docstring is the --help text), so defaults live
here only. A preset is a `TrainConfig` plus the name of a model shape in `dozero.config`:

    >>> from dozero.train.config import get_train_preset
    >>> get_train_preset("shakespeare-char").lr
    0.001
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dozero.config import MODEL_PRESETS, suggest
from dozero.errors import DozeroError

SCHEDULES = ("cosine", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
PARALLEL_STRATEGIES = ("auto", "ddp", "fsdp", "zero2", "tp", "fsdp+tp", "pp")
"""--parallel choices (dozero.parallel applies them; listed here so that reading a config imports no process code)."""


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape (that is a `ModelConfig`)."""

    preset: str = "shakespeare-char"
    """Named recipe to start from (shakespeare-char, shakespeare-char-fast, llama-char, shakespeare-bpe, gpt2-124m);
    flags override it."""
    model: str = "shakespeare-char"
    """Model shape preset from dozero.config (shape flags such as --n-layers override it)."""
    data: str = ""
    """A prepared data folder (`dozero data prepare`), or text file(s) separated by commas. Empty: the
    tiny-Shakespeare corpus shipped with dozero."""
    tokenizer: str = "char"
    """'char' (a character vocabulary built from the text), 'gpt2', or a tokenizer folder. Ignored for a
    prepared data folder, which carries its own."""
    val_fraction: float = 0.1
    """For text input: the last fraction of the tokens is the validation split (nanoGPT: 0.1)."""
    out_dir: str = "runs/shakespeare-char"
    """Run folder: checkpoints, metrics.jsonl, loss.png, report.md."""
    force: bool = False
    """Start the run in --out-dir even if that folder holds files that are not a dozero run's (they stay;
    the run's files are written beside them). Without it such a folder is refused. A folder holding a run
    is never overwritten either way: the new run goes to OUT-2."""
    micro_batch_size: int = 12
    """Sequences per forward/backward pass on each process; lower it if memory runs out."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all processes; reached by gradient accumulation. 0: one micro-batch
    per process (micro_batch_size x context_length x processes)."""
    max_steps: int = 2000
    """Optimizer steps in the whole run."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    schedule: str = "wsd"
    """Learning-rate shape after warmup: wsd (warmup-stable-decay: lr held, then a linear decay to min_lr over
    the last decay_fraction of the steps), cosine (decay to min_lr), or constant."""
    decay_fraction: float = 0.2
    """wsd only: the last fraction of steps that decays linearly to min_lr."""
    optimizer: str = "adamw"
    """adamw, or muon: Muon for the transformer blocks' weight matrices (their momentum orthogonalized), AdamW
    for embeddings, head, biases and norms, one --lr for both (see shakespeare-char-fast)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to biases, LayerNorms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2 (0.99 for small batches; GPT-2/3 recipes use 0.95)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    eval_interval: int = 250
    """Evaluate on the validation split (and save a checkpoint) every this many steps."""
    eval_iters: int = 20
    """Validation batches per evaluation (and train batches for the train-loss estimate)."""
    sample_tokens: int = 120
    """Characters/tokens of text to sample at each evaluation (0: none)."""
    sample_prompt: str = "\n"
    """Prompt for the samples."""
    seed: int = 1337
    """Random seed (model init, data order, dropout)."""
    device: str = "auto"
    """cuda, mps, cpu, or auto."""
    dtype: str = "auto"
    """auto (bf16 on recent GPUs, fp16 + grad scaler on older ones, float32 on CPU), float32, bfloat16,
    float16. bfloat16 is mixed precision (float32 weights and AdamW states); on CPUs with AMX (Intel Xeon
    4th gen+) it makes the shakespeare-char step ~1.3x faster (attention stays float32 there: train/step.py)."""
    compile: bool = False
    """torch.compile the model (faster steps after a compile of some seconds to minutes)."""
    parallel: str = "auto"
    """How several processes (torchrun) share the work: ddp (a whole copy of the model on each), fsdp (weights,
    gradients and AdamW moments sharded over the processes: ZeRO-3), zero2 (fsdp that keeps the gathered weights
    from forward to backward: more memory, less communication), tp (tensor parallelism: each block's heads and
    feed-forward split over all processes, which all read the same batch), fsdp+tp (tp within groups of --tp-size
    processes, fsdp across the groups), pp (pipeline parallelism: the blocks split into one stage per process,
    micro-batches of one sequence flowing through them), or auto (ddp under torchrun). See docs scaling.md."""
    tp_size: int = 2
    """fsdp+tp only: processes per tensor-parallel group (it must divide the number of processes and the heads)."""
    cpu_offload: bool = False
    """fsdp/zero2 only: keep the shards and the optimizer step in CPU memory (fits larger models, slower)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during backward instead of keeping them (less memory, ~1/3 more compute)."""
    threads: int = 0
    """CPU threads for PyTorch (0: PyTorch's choice)."""
    keep_last: int = 2
    """Checkpoints kept in checkpoints/ (latest/ and best/ are always kept)."""
    on_nan: str = "stop"
    """When a loss is NaN/inf: 'stop' (no checkpoint is written) or 'skip' the step."""
    log_interval: int = 10
    """Steps between metrics.jsonl lines and progress-bar updates (each costs a device sync)."""
    tensorboard: str = "auto"
    """Also write the metrics as TensorBoard events in RUN/tensorboard (view: tensorboard --logdir runs):
    auto (when the tensorboard package is installed), on, or off."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this step, as if interrupted; resume later with --resume. 0: off."""
    eval_tasks: str = ""
    """Benchmarks scored at every evaluation, e.g. hellaswag,arc_easy (`dozero eval`'s task names or a .jsonl of
    your own), into metrics.jsonl, TensorBoard and report.md as eval/<task>/<metric>. Empty: none."""
    eval_limit: int = 50
    """With --eval-tasks: the first this many questions of each task (MMLU: of each subject), the same every time."""

    def validate(self) -> None:
        """Refuse a setting that cannot work, naming its flag: the same checks for the command line,
        Python and a run folder's train_config.json."""
        _check_types(self)
        choices = {"schedule": SCHEDULES, "model": tuple(MODEL_PRESETS), "tensorboard": ("auto", "on", "off")}
        choices["on_nan"] = ("stop", "skip")
        choices["parallel"] = PARALLEL_STRATEGIES
        choices["optimizer"] = OPTIMIZERS
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                what = "is not a model shape" if name == "model" else "is not known"
                raise DozeroError(f"{_flag(name)} '{value}' {what}: {suggest(value, allowed)}")
        for name in (
            "micro_batch_size",
            "max_steps",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "eval_limit",
            "tp_size",
        ):
            _check_range(self, name, getattr(self, name) >= 1, ">= 1")
        for name in (
            "global_batch_tokens",
            "warmup_steps",
            "sample_tokens",
            "threads",
            "keep_last",
            "stop_after",
            "seed",
        ):
            _check_range(self, name, getattr(self, name) >= 0, ">= 0")
        for name in ("grad_clip", "weight_decay", "min_lr"):
            _check_range(self, name, getattr(self, name) >= 0, ">= 0")
        _check_range(self, "lr", self.lr > 0, "> 0")
        _check_range(self, "val_fraction", 0 < self.val_fraction < 1, "between 0 and 1 (exclusive)")
        _check_range(self, "decay_fraction", 0 <= self.decay_fraction <= 1, "between 0 and 1")
        for name in ("beta1", "beta2"):
            _check_range(self, name, 0 <= getattr(self, name) < 1, "in [0, 1)")
        if not all(math.isfinite(getattr(self, f.name)) for f in dataclasses.fields(self) if _kind(f) is float):
            raise DozeroError("learning rates, betas and fractions must be finite numbers (not nan or inf)")
        if self.optimizer == "muon" and self.parallel in ("fsdp", "zero2", "tp", "fsdp+tp"):
            raise DozeroError(
                f"--optimizer muon orthogonalizes whole matrices, which --parallel {self.parallel} splits over the "
                "processes: use --parallel ddp or pp"
            )
        if self.cpu_offload and self.parallel not in ("fsdp", "zero2"):
            raise DozeroError("--cpu-offload moves FSDP's shards to the CPU: use it with --parallel fsdp or zero2")
        if self.min_lr > self.lr:
            raise DozeroError(f"--min-lr ({self.min_lr}) is above --lr ({self.lr})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A validated TrainConfig from a JSON dict. Unknown keys are refused, as ModelConfig does;
        keys absent from `d` take their defaults (a run folder from before a field was added)."""
        if not isinstance(d, dict):
            raise DozeroError("the training settings should be a JSON object of TrainConfig fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - RETIRED_KEYS)
        if unknown:
            raise DozeroError(f"training config: unknown keys {unknown}; known keys are {sorted(known)}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        return cfg


# Fields that older versions wrote into train_config.json and that are dropped on load:
# inject_nan_at was a test hook (the tests now patch the loss function instead).
RETIRED_KEYS = {"inject_nan_at"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


def _check_types(cfg: TrainConfig) -> None:
    """Each field holds its declared type (an int is a float too; a bool is not an int)."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), _kind(f)
        ok = isinstance(value, (int, float) if kind is float else kind) and not (
            kind in (int, float) and isinstance(value, bool)
        )
        if not ok:
            raise DozeroError(f"{_flag(f.name)} should be {kind.__name__}, got {value!r}")


def _check_range(cfg: TrainConfig, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise DozeroError(f"{_flag(name)} must be {rule}, got {getattr(cfg, name)}")


# nanoGPT's README "I only have a macbook" run of config/train_shakespeare_char.py:
#   --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
#   --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
# with that config file's lr 1e-3, min_lr 1e-4, warmup 100, beta2 0.99, eval_interval 250, and
# train.py's weight_decay 0.1, beta1 0.9, grad_clip 1.0 (karpathy/nanoGPT). It reaches val 1.88.
# One change: warmup-stable-decay instead of nanoGPT's cosine. 2000 steps of 768 tokens leave this
# model under-trained, and holding the peak lr until the last 20% of the steps lowers the final loss:
# on the whole validation split 1.830 vs 1.896 (seed 1337) and 1.839 vs 1.898 (seed 2); on the
# 20-batch estimate 1.836 vs 1.903 and 1.845 vs 1.903. (`dozero train [--seed 2]` vs the same with
# --schedule cosine; the whole-split loss as benchmarks/train_speed.py --full computes it.)
_SHAKESPEARE_CHAR = TrainConfig()

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "shakespeare-char": _SHAKESPEARE_CHAR,
    # The same model and data, trained for speed (the modded-nanogpt idea: change the recipe, not the model):
    # Muon for the blocks' matrices (optim.py), a 6x higher peak lr, 30 warmup steps, 600 steps, and wsd's
    # decay over the last 40%. Validation loss (20-batch estimate, seed 1337) after N steps of 12 x 64 tokens
    # (benchmarks' search, 2026-11-30; nanoGPT's recipe: 1.886 at step 2000):
    #   AdamW lr 1e-3 (shakespeare-char):             2000 steps 1.836; 1.900 at step 1750
    #   AdamW lr 3e-3 / 6e-3, decay 30%:              1000 steps 1.899 / 1.897
    #   Muon lr 4e-3, decay 30%:                       600 steps 1.890; 650 steps 1.853
    #   Muon lr 6e-3, decay 40%:                       500 steps 1.896; 550 1.873; 600 1.857 (this preset)
    # Larger batches needed more tokens for the same loss (Muon 300 x 24 sequences: 1.955; AdamW 600 x 24:
    # 1.885, 350 x 48: 1.898). benchmarks/train_speed.py --to-loss times it against nanoGPT's own run.
    "shakespeare-char-fast": dataclasses.replace(
        _SHAKESPEARE_CHAR,
        preset="shakespeare-char-fast",
        out_dir="runs/shakespeare-char-fast",
        optimizer="muon",
        max_steps=600,
        lr=6e-3,
        min_lr=1e-4,
        warmup_steps=30,
        decay_fraction=0.4,
    ),
    # The same recipe on the same data with Llama-style blocks (RMSNorm, RoPE, SwiGLU, grouped-query
    # attention, no biases; dozero.config's "llama-char"), to compare the two families side by side.
    "llama-char": dataclasses.replace(
        _SHAKESPEARE_CHAR, preset="llama-char", model="llama-char", out_dir="runs/llama-char"
    ),
    # The complete works (5 MB) with GPT-2's BPE vocabulary: nanoGPT's GPU "baby GPT" shape (6x6x384,
    # context 256) trained on ~50M tokens (about 30 epochs of the ~1.6M-token corpus; it overfits
    # after that, so validation is watched every 250 steps and best/ keeps the best model).
    "shakespeare-bpe": dataclasses.replace(
        _SHAKESPEARE_CHAR,
        preset="shakespeare-bpe",
        model="shakespeare-char-gpu",
        tokenizer="gpt2",
        out_dir="runs/shakespeare-bpe",
        micro_batch_size=16,
        global_batch_tokens=32 * 256,
        max_steps=5000,
        lr=6e-4,
        min_lr=6e-5,
        warmup_steps=200,
        schedule="cosine",  # nanoGPT's
        sample_tokens=60,
    ),
    # GPT-3 paper (Brown et al. 2020), table 2.1, "GPT-3 Small" (= GPT-2 124M's shape): batch 0.5M
    # tokens, lr 6e-4, Adam beta2 0.95, weight decay 0.1, clip 1.0, 375M warmup tokens, cosine to
    # 10% over 300B tokens (appendix B). 2**19 = 524,288 tokens per step; 375M / 2**19 = 715 warmup
    # steps; 300B / 2**19 = 572,205 steps. The same numbers as nanoGPT's config/train_gpt2.py
    # (491,520-token batch) and llm.c's GPT-2 124M run (which stops at 10B tokens: --max-steps 19073).
    "gpt2-124m": dataclasses.replace(
        _SHAKESPEARE_CHAR,
        preset="gpt2-124m",
        model="gpt2",
        tokenizer="gpt2",
        out_dir="runs/gpt2-124m",
        micro_batch_size=16,
        global_batch_tokens=2**19,
        max_steps=572_205,
        lr=6e-4,
        min_lr=6e-5,
        warmup_steps=715,
        schedule="cosine",  # GPT-3's
        beta2=0.95,
        eval_interval=1000,
        eval_iters=50,
        sample_tokens=64,
        dtype="auto",
        compile=True,
        log_interval=1,
    ),
}


def get_train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise DozeroError(f"unknown training preset '{name}': {suggest(name, TRAIN_PRESETS)}")
    return dataclasses.replace(TRAIN_PRESETS[name])
