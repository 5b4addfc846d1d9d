"""The settings of text generation, as typed dataclasses: how a token is chosen (`SamplingConfig`)
and when to stop (`GenerationConfig`). No torch here, so `dozero generate --help` starts fast; the
CLI's flags are these fields (see `dozero.cli_args`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dozero.errors import DozeroError


@dataclass
class SamplingConfig:
    """How the next token is chosen from the logits. Filters combine: top-k, then top-p, then min-p."""

    temperature: float = 0.8
    """Divide the logits by this before sampling: <1 sharper, >1 flatter; 0 = greedy (always the most likely token)."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens (0 or None = no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probabilities add up to top_p (1 = off)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely token's probability (0 = off)."""
    repetition_penalty: float = 1.0
    """Make tokens already in the text less likely (CTRL, Keskar et al. 2019): positive logits are divided by it,
    negative ones multiplied. 1 = off; 1.1-1.3 is typical."""
    frequency_penalty: float = 0.0
    """Subtract this times a token's count in the text from its logit (OpenAI's frequency penalty). 0 = off."""

    def __post_init__(self) -> None:
        if self.top_k == 0:  # the command line's way to say "no limit"
            self.top_k = None
        self.validate()

    def validate(self) -> None:
        # NaN passes every comparison below (nan < 0 is False), and inf divides logits into NaN or
        # zeros: both are refused first, for Python callers as for the command line.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty"):
            _check_finite(name, getattr(self, name))
        if self.top_k is not None and not _is_int(self.top_k):
            raise DozeroError(f"top_k must be a whole number (or None/0 for no limit), got {self.top_k!r}")
        if self.temperature < 0:
            raise DozeroError(
                f"temperature must be >= 0, got {self.temperature}; use 0 for greedy decoding, about 0.8 for sampling"
            )
        if self.top_k is not None and self.top_k < 1:
            raise DozeroError(f"top_k must be >= 1 (or None/0 for no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise DozeroError(f"top_p must be in (0, 1], got {self.top_p}; 1 turns nucleus sampling off")
        if not 0.0 <= self.min_p <= 1.0:
            raise DozeroError(f"min_p must be in [0, 1], got {self.min_p}; 0 turns it off")
        if self.repetition_penalty <= 0:
            raise DozeroError(f"repetition_penalty must be > 0, got {self.repetition_penalty}; 1 turns it off")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_counts(self) -> bool:
        """Whether the penalties need the per-token counts of the text so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0


@dataclass
class GenerationConfig(SamplingConfig):
    """Sampling settings plus when to stop."""

    max_new_tokens: int = 200
    """Generate at most this many tokens after the prompt."""
    seed: int | None = None
    """Random seed: the same seed, model and prompt give the same text (None = a fresh random seed)."""
    stop: tuple[str, ...] = ()
    """Stop a sample when its new text contains one of these strings (the string itself is not returned)."""
    stop_at_eot: bool = True
    """Stop a sample at the end-of-text token, as a document ends in the training data."""
    compile: bool = False
    """Compile the one-token decode step with torch.compile: 10-35 s the first time (a few seconds once
    PyTorch has cached it on disk), then a small model's tokens cost about a third (4 layers x 128:
    ~1,900 instead of ~700 tokens/s here); at 124M memory decides and it gains little. Pays off for long
    generations only (benchmarks/generate_speed.py --compile measures it). The cache is rounded up to a
    multiple of 512 slots, so later calls in the same process (chat turns) reuse the compiled step."""

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.max_new_tokens):
            raise DozeroError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise DozeroError(f"seed must be a whole number (or None for a fresh one), got {self.seed!r}")
        if self.max_new_tokens < 0:
            raise DozeroError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # a single stop string given as a plain string
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise DozeroError(f"stop strings must be non-empty text, got {list(self.stop)!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DozeroError(f"{name} must be a finite number, got {value!r}")
