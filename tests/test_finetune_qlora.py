"""LoRA over a quantized base (QLoRA-style; dozero.finetune.lora + compress/quantize.py): gradients reach only
A and B and equal those of the same float model, no float copy of a weight is kept for the backward pass,
merging gives a float model with the same logits, and `dozero finetune --quantize` trains and saves a
plain PEFT-layout adapter."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from dozero.config import ModelConfig, get_model_config
from dozero.errors import DozeroError
from dozero.finetune.lora import LoRAConfig, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from dozero.finetune.sft import FinetuneConfig, finetune, load_base, quantize_base
from dozero.model.checkpoint import read_safetensors, save_model
from dozero.model.gpt import GPTModel
from dozero.model.quantized import QuantizedLinear, dequantized_model
from dozero.tokenizer import gpt2

LLAMA = dataclasses.replace(get_model_config("llama-char"), vocab_size=96, emb_dim=64, n_heads=4, n_kv_heads=2,
                            n_layers=2, ff_hidden_dim=96, context_length=32)  # fmt: skip
IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 0, 63], [1, 2, 3, 4, 5, 6, 7, 8]])


def qlora_and_float_twin(kind: str):
    """A QLoRA model and the float model holding its dequantized weights, with the same random A and B."""
    torch.manual_seed(0)
    model = quantize_base(GPTModel(LLAMA), kind)
    twin = dequantized_model(model)
    for m in (model, twin):
        apply_lora(m, LoRAConfig(rank=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for (_, _, a), (_, _, b) in zip(lora_layers(model), lora_layers(twin), strict=True):
            for pa, pb in zip([*a.lora_A, *a.lora_B], [*b.lora_A, *b.lora_B], strict=True):
                pa.normal_(0, 0.05)  # B too: with B = 0 the check would be trivial
                pb.copy_(pa)
    return model, twin


def loss_of(model) -> torch.Tensor:
    return F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_gradients_reach_only_lora_and_equal_the_float_twin(kind):
    model, twin = qlora_and_float_twin(kind)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 4 * LLAMA.n_layers
    loss_of(model).backward()
    loss_of(twin).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}  # every A and B, nothing else
    float_twin = dict(twin.named_parameters())
    for name in trained:  # the recomputed backward through the int weights is the float one
        torch.testing.assert_close(model.get_parameter(name).grad, float_twin[name].grad, rtol=1e-4, atol=1e-6)
    first_A = model.trf_blocks[0].att.qkv.lora_A[0].grad
    assert first_A.abs().sum() > 0  # the gradient crossed every quantized layer above it


def weights_saved_for_backward(model) -> set[tuple[int, ...]]:
    """Shapes of the block weights (either orientation) among the tensors autograd keeps for the backward
    pass, other than the model's own parameters (a saved parameter costs nothing: it is kept anyway)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {(o, i) for o, i in [(64, 64), (128, 64), (192, 64), (64, 96)]}  # qkv, fc (stacked), proj...
    shapes |= {(i, o) for o, i in shapes}
    saved = []

    def keep(t):
        if t.untyped_storage().data_ptr() not in own and tuple(t.shape) in shapes:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss_of(model)
    return set(saved)


def test_no_float_copy_of_a_weight_waits_for_the_backward_pass(monkeypatch):
    import dozero.finetune.lora

    model, _ = qlora_and_float_twin("int4")
    assert weights_saved_for_backward(model) == set()
    monkeypatch.setattr(dozero.finetune.lora, "_is_quantized", lambda layer: False)  # plain autograd instead:
    assert len(weights_saved_for_backward(model)) == 4  # it keeps every layer's dequantized copy (the check works)


def test_merged_model_is_float_with_the_same_logits():
    model, _ = qlora_and_float_twin("int8")
    with torch.no_grad():
        before = model(IDS)
        merged = merge_lora(copy.deepcopy(model))
        after = merged(IDS)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_finetune_quantize_trains_and_saves_a_peft_adapter(tmp_path):
    from dozero.finetune.sft import FINETUNE_DEFAULTS

    torch.manual_seed(0)
    tiny = ModelConfig(vocab_size=50257, context_length=48, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)
    save_model(GPTModel(tiny), tmp_path / "base", tokenizer=gpt2())
    turns = [[{"role": "user", "content": f"add {i} and {i}"}, {"role": "assistant", "content": str(2 * i)}]
             for i in range(12)]  # fmt: skip
    chats = [{"messages": t} for t in turns]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    cfg = dataclasses.replace(FINETUNE_DEFAULTS, out_dir=str(tmp_path / "run"), micro_batch_size=4, max_steps=6,
                              eval_interval=6, warmup_steps=1, lr=1e-2, tensorboard="off", device="cpu")  # fmt: skip
    ft = FinetuneConfig(model=str(tmp_path / "base"), data=str(data), lora_rank=4, quantize="int4")
    result = finetune(ft, cfg, quiet=True)
    assert result.losses[6] < result.losses[1]
    float_base, _, _ = load_base(str(tmp_path / "base"))
    plain = save_adapter(apply_lora(float_base, ft.lora()), tmp_path / "plain", base_model=str(tmp_path / "base"))
    saved = result.run_dir / "latest"
    configs = [json.loads((f / "adapter_config.json").read_text()) for f in (saved, plain)]
    assert configs[0] == configs[1]
    shapes = [{k: tuple(v.shape) for k, v in read_safetensors(f / "adapter_model.safetensors").items()}
              for f in (saved, plain)]  # fmt: skip
    assert shapes[0] == shapes[1]  # a plain LoRA adapter in PEFT's layout: nothing QLoRA-specific
    load_adapter(load_base(str(tmp_path / "base"))[0], saved)  # and it loads onto the float base
    with pytest.raises(DozeroError, match="--quantize needs LoRA"):
        finetune(FinetuneConfig(model=str(tmp_path / "base"), data=str(data), lora_rank=0, quantize="int8"), cfg)


def test_interrupted_qlora_run_resumes_exactly(tmp_path):
    """A QLoRA run stopped at step 3 and resumed takes the same steps as one that never stopped: the
    quantized base is rebuilt the same from the float model, the adapters and AdamW come back."""
    from dozero.finetune.sft import FINETUNE_DEFAULTS

    torch.manual_seed(0)
    tiny = ModelConfig(vocab_size=50257, context_length=48, emb_dim=32, n_heads=2, n_layers=2)
    save_model(GPTModel(tiny), tmp_path / "base", tokenizer=gpt2())
    chats = [{"messages": [{"role": "user", "content": f"twice {i}"}, {"role": "assistant", "content": str(2 * i)}]}
             for i in range(12)]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    ft = FinetuneConfig(model=str(tmp_path / "base"), data=str(data), lora_rank=4, quantize="int8")

    def cfg(name, **changes):
        return dataclasses.replace(FINETUNE_DEFAULTS, out_dir=str(tmp_path / name), micro_batch_size=4, max_steps=6,
                                   eval_interval=3, warmup_steps=1, lr=1e-2, tensorboard="off", device="cpu",
                                   **changes)  # fmt: skip

    whole = finetune(ft, cfg("a"), quiet=True)
    first = finetune(ft, cfg("b", stop_after=3), quiet=True)
    assert first.stopped == "stop_after" and first.step == 3
    rest = finetune(ft, cfg("b"), resume=first.run_dir, quiet=True)
    assert rest.step == 6
    assert {**first.losses, **rest.losses} == whole.losses  # bit-exact
    assert whole.losses[6] < whole.losses[1]
