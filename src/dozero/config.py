"""Typed configuration for dozero: one dataclass per concern, defaults defined once.

The model's shape lives in `ModelConfig`; named shapes live in `MODEL_PRESETS`. Other stages
(tokenizer, data, train, generate) keep their own dataclasses next to the code that uses them,
and the CLI derives its flags from those dataclasses (see `dozero.cli_args`).

    >>> from dozero.config import get_model_config
    >>> get_model_config("gpt2").emb_dim
    768
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from dozero.errors import DozeroError


@dataclass
class ModelConfig:
    """The shape of a GPT-2 model, with the course's names for each number, and the options that
    turn its blocks into Llama-style ones (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases).
    The defaults are GPT-2's, so configs saved before these options existed load unchanged."""

    vocab_size: int = 50257
    """Number of token ids (GPT-2's BPE: 50,256 merges and bytes + <|endoftext|>)."""
    context_length: int = 1024
    """Longest sequence the model sees; the size of the learned position embedding (or RoPE table)."""
    emb_dim: int = 768
    """Width of every token vector in the residual stream (d_model)."""
    n_heads: int = 12
    """Attention heads per block; emb_dim must be divisible by it."""
    n_layers: int = 12
    """Number of transformer blocks."""
    drop_rate: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for fine-tuning/inference)."""
    qkv_bias: bool = False
    """Bias in the query/key/value projection. The course trains without; OpenAI's weights have it."""
    tie_weights: bool = True
    """Share the output head with the token embedding, as GPT-2 does."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every normalization layer, LayerNorm or RMSNorm (GPT-2: 1e-5)."""
    gelu_approximation: str = "tanh"
    """GELU of the feed-forward: 'tanh' (GPT-2's approximation, needed to load OpenAI's weights) or
    'none' (the exact erf GELU, as nanoGPT trains; ~3x faster than tanh on the AVX2 CPU measured). Unused
    with ff='swiglu'."""
    norm: str = "layernorm"
    """Normalization: 'layernorm' (GPT-2: mean and variance, scale and shift) or 'rmsnorm' (Llama: root
    mean square only, scale only; Zhang & Sennrich 2019)."""
    pos_emb: str = "learned"
    """Positions: 'learned' (GPT-2: a position embedding added to the tokens) or 'rope' (Llama: queries
    and keys rotated by their position, Su et al. 2021; no position parameters)."""
    rope_theta: float = 10000.0
    """RoPE base: the slowest pair of dimensions turns once every ~2*pi*theta positions (Llama 2: 1e4)."""
    ff: str = "gelu"
    """Feed-forward: 'gelu' (GPT-2: expand, GELU, project) or 'swiglu' (Llama: proj(silu(gate(x)) * up(x)),
    Shazeer 2020)."""
    ff_hidden_dim: int = 0
    """Width of the feed-forward's hidden layer; 0 = 4 * emb_dim (GPT-2's)."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention, Ainslie et al. 2023): each serves n_heads / n_kv_heads
    query heads, and the KV cache shrinks by that factor. 0 = n_heads (plain multi-head attention)."""
    bias: bool = True
    """Biases in the attention output projection and the feed-forward, and LayerNorm's shift (GPT-2: all
    on; Llama: none). The query/key/value bias is `qkv_bias`."""
    head_size: int = 0
    """Width of each attention head; 0 = emb_dim / n_heads. Set by pruning attention heads
    (compress/prune.py): the kept heads keep their width, so n_heads * head_size < emb_dim."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise DozeroError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.head_size < 0:
            raise DozeroError(f"model config: head_size must be >= 0 (0 = emb_dim / n_heads), got {self.head_size}")
        if self.head_size == 0 and self.emb_dim % self.n_heads != 0:
            raise DozeroError(
                f"model config: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}); "
                f"try n_heads={_nearest_divisor(self.emb_dim, self.n_heads)}"
            )
        if self.gelu_approximation not in ("tanh", "none"):
            raise DozeroError(
                f"model config: gelu_approximation must be 'tanh' or 'none', got '{self.gelu_approximation}'"
            )
        choices = {"norm": ("layernorm", "rmsnorm"), "pos_emb": ("learned", "rope"), "ff": ("gelu", "swiglu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DozeroError(f"model config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.n_kv_heads <= self.n_heads or self.n_heads % self.kv_heads != 0:
            raise DozeroError(
                f"model config: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}); 0 means n_heads"
            )
        if self.ff_hidden_dim < 0:
            raise DozeroError(f"model config: ff_hidden_dim must be >= 0 (0 = 4 * emb_dim), got {self.ff_hidden_dim}")
        if self.pos_emb == "rope" and (self.head_dim % 2 != 0 or self.rope_theta <= 0):
            raise DozeroError(
                f"model config: RoPE needs an even head size and rope_theta > 0; got head size {self.head_dim}, "
                f"rope_theta {self.rope_theta}"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise DozeroError(f"model config: drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_heads, or n_heads when 0)."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Feed-forward hidden width actually used (ff_hidden_dim, or 4 * emb_dim when 0)."""
        return self.ff_hidden_dim or 4 * self.emb_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DozeroError(f"model config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - near), d))


# Published shapes. GPT-2 sizes: Radford et al. 2019, table 2, and OpenAI's released hparams.json
# (they all have qkv biases). The character presets are nanoGPT's config/train_shakespeare_char.py:
# its default GPU shape and the "on a MacBook / CPU" shape from nanoGPT's README, with nanoGPT's
# exact GELU (nn.GELU()): these are trained from scratch, so nothing ties them to GPT-2's tanh.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(emb_dim=768, n_heads=12, n_layers=12, qkv_bias=True),
    "gpt2-medium": ModelConfig(emb_dim=1024, n_heads=16, n_layers=24, qkv_bias=True),
    "gpt2-large": ModelConfig(emb_dim=1280, n_heads=20, n_layers=36, qkv_bias=True),
    "gpt2-xl": ModelConfig(emb_dim=1600, n_heads=25, n_layers=48, qkv_bias=True),
    "shakespeare-char": ModelConfig(
        vocab_size=65, context_length=64, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0, gelu_approximation="none"
    ),
    "shakespeare-char-gpu": ModelConfig(
        vocab_size=65, context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.2, gelu_approximation="none"
    ),
    # shakespeare-char's size with Llama's blocks: RMSNorm, RoPE, SwiGLU, 2 key/value heads for 4 query
    # heads, no biases. SwiGLU's hidden width is 2/3 * 4C rounded up to a multiple of 64 (384 for
    # C=128), so its three matrices hold about as many parameters as GPT-2's two (Touvron et al. 2023,
    # section 2.2; Shazeer 2020).
    "llama-char": ModelConfig(
        vocab_size=65,
        context_length=64,
        emb_dim=128,
        n_heads=4,
        n_layers=4,
        n_kv_heads=2,
        norm="rmsnorm",
        pos_emb="rope",
        ff="swiglu",
        ff_hidden_dim=384,
        bias=False,
    ),
    # Hugging Face's HuggingFaceTB/SmolLM2-135M config.json (LlamaForCausalLM): 30 layers, hidden 576,
    # 9 heads, 3 key/value heads, intermediate 1536, rms_norm_eps 1e-5, rope_theta 1e5, 8192 positions,
    # vocabulary 49152, tied embeddings, no attention or MLP biases.
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        context_length=8192,
        emb_dim=576,
        n_heads=9,
        n_layers=30,
        n_kv_heads=3,
        norm="rmsnorm",
        pos_emb="rope",
        rope_theta=100000.0,
        ff="swiglu",
        ff_hidden_dim=1536,
        bias=False,
    ),
}

# Parameter counts with the tied head, as published for OpenAI's checkpoints (Hugging Face's
# GPT2LMHeadModel.num_parameters() gives the same numbers).
PUBLISHED_PARAMETER_COUNTS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "smollm2-135m": 134_515_008,  # LlamaForCausalLM(SmolLM2-135M config).num_parameters()
}


def suggest(name: str, choices) -> str:
    """A ' did you mean ...?' hint for a mistyped name, or a list of the valid ones."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'? (choices: {', '.join(choices)})"
    return f"choices: {', '.join(choices)}"


def get_model_config(preset: str, **overrides) -> ModelConfig:
    """A copy of a named preset, with `overrides` applied (e.g. vocab_size=65)."""
    if preset not in MODEL_PRESETS:
        raise DozeroError(f"unknown model preset '{preset}': {suggest(preset, MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[preset], **overrides)
