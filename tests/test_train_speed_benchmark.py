"""benchmarks/train_speed.py --breakdown: the matrix-product FLOPs it divides by, and the profile it prints."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from dozero.config import get_model_config
from dozero.train.config import get_train_preset
from dozero.train.corpus import load_corpus


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parents[1] / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_product_flops_are_three_times_the_forward_products(bench):
    """PyTorch's flop counter on one dozero step of the benchmark's shape: forward 2 x tokens x (the
    weights every token goes through), backward twice that (gradients of the inputs and of the weights)."""
    cfg = get_train_preset("shakespeare-char")
    corpus = load_corpus(cfg)
    shape = dataclasses.replace(get_model_config(cfg.model), vocab_size=corpus.tokenizer.vocab_size)
    _, step = bench.dozero_step(cfg, corpus, shape)
    C, V = shape.emb_dim, shape.vocab_size
    per_layer = C * 3 * C + C * C + C * 4 * C + 4 * C * C  # qkv, out_proj, fc, proj
    tokens = cfg.micro_batch_size * shape.context_length
    assert bench.product_flops(step, 0) == 3 * 2 * tokens * (shape.n_layers * per_layer + C * V)

    row = bench.profile_step(step, 1, 2)
    assert row["matrix products"] > 0 and row["attention"] > 0 and row["GELU"] > 0 and row["AdamW"] > 0
    parts = sum(v for k, v in row.items() if k != "whole step (profiled)")
    assert parts == pytest.approx(row["whole step (profiled)"])


def test_kinds_of_kernels(bench):
    assert bench.kind_of("aten::addmm") == "matrix products"
    assert bench.kind_of("aten::mm") == "matrix products"
    assert bench.kind_of("aten::gelu_backward") == "GELU"
    assert bench.kind_of("aten::native_layer_norm_backward") == "LayerNorm"
    assert bench.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bench.kind_of("aten::mm_out_something") == "other kernels"  # products by their exact names only
