"""LoRA (dozero.finetune.lora): merge equals the unmerged forward, PEFT loads dozero's adapter onto the
Hugging Face export and gives dozero's logits, dozero loads a PEFT-written adapter, bad input is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dozero.config import ModelConfig, get_model_config
from dozero.errors import DozeroError
from dozero.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from dozero.model.checkpoint import save_model
from dozero.model.gpt import GPTModel

LLAMA = dataclasses.replace(get_model_config("llama-char"), vocab_size=96, emb_dim=48, n_heads=6, n_kv_heads=2,
                            n_layers=2, ff_hidden_dim=64, context_length=32)  # fmt: skip
GPT2 = ModelConfig(vocab_size=96, context_length=32, emb_dim=48, n_heads=4, n_layers=2, qkv_bias=True)
IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 0, 63], [1, 2, 3, 4, 5, 6, 7, 8]])


def tiny(cfg: ModelConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def with_random_lora(model: GPTModel, **settings) -> GPTModel:
    """LoRA with B drawn at random too (B = 0 at the start would make every comparison trivial)."""
    apply_lora(model, LoRAConfig(**settings))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, _, layer in lora_layers(model):
            for B in layer.lora_B:
                B.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_merge_equals_unmerged_forward_and_unmerge_restores(cfg):
    model = with_random_lora(tiny(cfg), rank=4, alpha=8)
    base_weight = model.trf_blocks[0].att.qkv.base.weight.clone()
    with torch.no_grad():
        unmerged = model(IDS)
        layer = model.trf_blocks[0].att.qkv
        layer.merge()
        assert not torch.equal(layer.base.weight, base_weight)
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, base_weight, rtol=0, atol=1e-6)
        merged = merge_lora(model)(IDS)
    assert not torch.allclose(unmerged, tiny(cfg)(IDS), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny(cfg).state_dict())  # a plain model again


def test_only_lora_is_trained_and_counts_match():
    model = apply_lora(tiny(LLAMA), LoRAConfig(rank=4, targets="qkv,fc"))
    C, kv, H, r = 48, 2 * 8, 64, 4
    per_block = r * C * 3 + r * (C + 2 * kv) + r * C * 2 + r * 2 * H  # A: one (r, C) per block of rows
    assert trainable_parameters(model) == 2 * per_block
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():  # B = 0 at the start: exactly the base model
        torch.testing.assert_close(model(IDS), tiny(LLAMA)(IDS), rtol=0, atol=0)


def test_fused_qkv_equals_three_separate_loras():
    model = with_random_lora(tiny(LLAMA), rank=3, targets="qkv")
    layer = model.trf_blocks[1].att.qkv
    x = torch.randn(2, 5, 48)
    separate = [x @ (layer.base.weight[rows].t() + layer.scale * (B @ A).t()) for rows, A, B in zip(
        (slice(0, 48), slice(48, 64), slice(64, 80)), layer.lora_A, layer.lora_B, strict=True)]  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.cat(separate, dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_peft_loads_dozero_adapter_with_the_same_logits(tmp_path, cfg):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    save_model(tiny(cfg), tmp_path / "base", format="hf")
    model = with_random_lora(tiny(cfg), rank=4, alpha=12)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    with torch.no_grad():
        ours = merge_lora(model)(IDS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours, rtol=0, atol=1e-4)


def test_dozero_loads_peft_written_adapter(tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    save_model(tiny(LLAMA), tmp_path / "base", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(hf, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = load_adapter(tiny(LLAMA), tmp_path / "peft")
    assert {t for _, t, _ in lora_layers(model)} == {"qkv", "proj"}
    assert float(model.trf_blocks[0].att.qkv.lora_B[1].detach().abs().sum()) == 0  # k_proj was not a target
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), peft_model.eval()(IDS).logits, rtol=0, atol=1e-4)


def test_adapter_round_trip_and_shape_mismatch(tmp_path):
    model = with_random_lora(tiny(LLAMA), rank=2, targets="out_proj,fc")
    save_adapter(model, tmp_path / "a")
    back = load_adapter(tiny(LLAMA), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), rtol=0, atol=0)
    wider = dataclasses.replace(LLAMA, emb_dim=60, n_heads=6)
    other = tiny(wider)
    with pytest.raises(DozeroError, match="made for another model"):
        load_adapter(other, tmp_path / "a")
    assert not lora_layers(other)  # nothing half-applied
    with pytest.raises(DozeroError, match="fit no layer"):
        load_adapter(tiny(dataclasses.replace(LLAMA, n_layers=1)), tmp_path / "a")


def test_bad_settings_are_refused():
    with pytest.raises(DozeroError, match="larger than the layer 'qkv'"):
        apply_lora(tiny(LLAMA), LoRAConfig(rank=17))  # k and v blocks have 16 rows
    with pytest.raises(DozeroError, match="matches no layer"):
        apply_lora(tiny(LLAMA), LoRAConfig(targets="q_projj"))
    with pytest.raises(DozeroError, match="rank must be >= 1"):
        apply_lora(tiny(LLAMA), LoRAConfig(rank=0))
    with pytest.raises(DozeroError, match="no LoRA layers"):
        save_adapter(tiny(LLAMA), "unused")


def test_merge_lora_command_writes_a_plain_model(tmp_path, capsys):
    from dozero.cli import main
    from dozero.finetune.sft import load_base
    from dozero.model.checkpoint import load_model
    from dozero.tokenizer import gpt2

    cfg = dataclasses.replace(GPT2, vocab_size=50257)
    save_model(tiny(cfg), tmp_path / "base", tokenizer=gpt2())
    model, _, _ = load_base(str(tmp_path / "base"))  # as finetune starts: ChatML tokens added
    with_random_lora(model, rank=2)
    save_adapter(model, tmp_path / "adapter")
    assert main(["model", "merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    merged = load_model(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), merge_lora(model)(IDS), rtol=0, atol=1e-5)
    save_model(tiny(dataclasses.replace(cfg, emb_dim=64)), tmp_path / "other", tokenizer=gpt2())
    args = ["model", "merge-lora", str(tmp_path / "other"), str(tmp_path / "adapter"), str(tmp_path / "out2")]
    assert main(args) == 2
    assert "made for another model" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    assert main(args[:4] + [str(tmp_path / "out")]) == 2  # never over another model
    assert "already holds a model" in capsys.readouterr().err
