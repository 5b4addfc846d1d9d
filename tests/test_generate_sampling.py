"""Sampling (dozero.generate.sampling): filters keep exactly the allowed tokens, seeds reproduce, bad settings fail."""

from __future__ import annotations

import math

import pytest
import torch

from dozero.errors import DozeroError
from dozero.generate.engine import GenerationConfig
from dozero.generate.sampling import (
    SamplingConfig,
    apply_penalties,
    min_p_filter,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

DRAWS = 4000


def draws(probs: list[float], config: SamplingConfig, seed: int = 0) -> torch.Tensor:
    """DRAWS samples from the distribution `probs` (as logits), one row per draw."""
    logits = torch.tensor(probs).log().expand(DRAWS, -1)  # (DRAWS, V)
    return sample_next_token(logits, config, torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, SamplingConfig(temperature=0)), logits.argmax(-1))


def test_top_k_only_draws_the_k_most_likely():
    probs = [0.02, 0.3, 0.05, 0.25, 0.01, 0.2, 0.17]
    drawn = set(draws(probs, SamplingConfig(temperature=1.0, top_k=3)).tolist())
    assert drawn == {1, 3, 5}  # the three most likely, and every one of them is reachable
    assert top_k_filter(torch.tensor([[1.0, 2.0]]), 5).tolist() == [[1.0, 2.0]]  # k > V keeps all


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.05, 0.5, 0.1, 0.3, 0.05]  # sorted: 0.5, 0.3 | 0.1 | 0.05, 0.05
    assert set(draws(probs, SamplingConfig(temperature=1.0, top_k=None, top_p=0.75)).tolist()) == {1, 3}
    assert set(draws(probs, SamplingConfig(temperature=1.0, top_k=None, top_p=0.85)).tolist()) == {1, 3, 2}
    # A tiny p still keeps the most likely token.
    assert set(draws(probs, SamplingConfig(temperature=1.0, top_k=None, top_p=0.01)).tolist()) == {1}
    kept = top_p_filter(torch.tensor(probs).log()[None], 0.75).isfinite()[0].tolist()
    assert kept == [False, True, False, True, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = [0.5, 0.3, 0.1, 0.06, 0.04]  # threshold 0.15 * 0.5 = 0.075
    assert set(draws(probs, SamplingConfig(temperature=1.0, top_k=None, min_p=0.15)).tolist()) == {0, 1, 2}
    assert min_p_filter(torch.tensor(probs).log()[None], 0.0).isfinite().all()


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        tokens = draws(logits.exp().tolist(), SamplingConfig(temperature=temperature, top_k=None), seed=3)
        freq = torch.bincount(tokens, minlength=3).float() / DRAWS
        expected = torch.softmax(logits / temperature, -1)
        assert torch.allclose(freq, expected, atol=4 / math.sqrt(DRAWS)), (temperature, freq, expected)


def test_same_seed_same_tokens_other_seed_other_tokens():
    probs = torch.softmax(torch.randn(1000, generator=torch.Generator().manual_seed(1)), -1).tolist()
    config = SamplingConfig(temperature=1.0, top_k=None)
    assert torch.equal(draws(probs, config, seed=5), draws(probs, config, seed=5))
    assert not torch.equal(draws(probs, config, seed=5), draws(probs, config, seed=6))


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1.0, 1.0, 0.0, 3.0]])
    out = apply_penalties(logits, counts, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.25]]  # seen: positive / 2, negative * 2; unseen unchanged
    out = apply_penalties(logits, counts, frequency_penalty=0.5)
    assert out.tolist() == [[1.5, -2.5, 1.0, -1.0]]
    # Greedy with a strong repetition penalty avoids the repeated favourite.
    config = SamplingConfig(temperature=0, repetition_penalty=10.0)
    assert sample_next_token(logits, config, counts=counts).item() == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 1"),
        ({"min_p": 1.5}, "min_p must be in [0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
        ({"stop": ("\n", "")}, "stop strings must be non-empty"),
        ({"stop": ""}, "stop strings must be non-empty"),
        # NaN passes every comparison (nan < 0 is False) and inf turns logits into NaN or zeros
        ({"temperature": math.nan}, "temperature must be a finite number, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number, got inf"),
        ({"top_p": math.nan}, "top_p must be a finite number"),
        ({"min_p": math.nan}, "min_p must be a finite number"),
        ({"repetition_penalty": math.nan}, "repetition_penalty must be a finite number"),
        ({"repetition_penalty": math.inf}, "repetition_penalty must be a finite number"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty must be a finite number, got -inf"),
        ({"top_k": math.nan}, "top_k must be a whole number"),
        ({"top_k": 2.5}, "top_k must be a whole number"),
        ({"max_new_tokens": math.inf}, "max_new_tokens must be a whole number"),
        ({"temperature": "0.8"}, "temperature must be a finite number, got '0.8'"),
    ],
)
def test_bad_settings_say_what_is_wrong(settings, message):
    with pytest.raises(DozeroError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        GenerationConfig(**settings)


def test_documented_special_values():
    assert SamplingConfig(top_k=0).top_k is None  # 0 = no limit (the command line's way to say None)
    assert SamplingConfig(temperature=0).is_greedy
    assert GenerationConfig(stop="\n").stop == ("\n",)  # one string is one stop string
