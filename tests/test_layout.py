"""The one-token decode step of a model laid out for decoding (dozero.generate.layout.OneTokenStep): the
logits and tokens of the model's own forward (GPT-2 and Llama shapes), a pinned number of tensor calls per
token, quantized layers' kernels inside it, and the model's forward wherever it does not apply (a batch, LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dozero.config import ModelConfig
from dozero.generate.engine import BatchState, GenerationConfig, generate_ids
from dozero.generate.layout import DecodingLinear, OneTokenStep, use_decoding_layout
from dozero.model.gpt import GPTModel
from dozero.model.native import native_available

LLAMA_GQA = {"norm": "rmsnorm", "pos_emb": "rope", "ff": "swiglu", "bias": False, "n_kv_heads": 2, "qkv_bias": False}
SHAPES = pytest.mark.parametrize("options", [{"qkv_bias": True}, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=40, stop_at_eot=False)


@pytest.fixture(autouse=True)
def split_like_two_threads(monkeypatch):
    """Every product split in two, as on the 2-core CPU, however small (these models' matrices are below
    the threshold), and attention's window widened every 4 tokens; the test itself runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(DecodingLinear, "SPLIT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(OneTokenStep, "WINDOW", 4)
    yield
    torch.set_num_threads(threads)


def tiny(options: dict, n_layers: int = 2, weight_scale: float = 1.0) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=n_layers, **options)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    return model


def laid_out(model: GPTModel) -> GPTModel:
    model = copy.deepcopy(model)
    use_decoding_layout(model)
    return model


@SHAPES
def test_one_token_step_gives_the_models_logits_and_tokens(options):
    """Prefill, then 12 tokens through the planned step (its window widening 3 times, the last to the cache's
    end), against the model's own forward: logits to fp32 rounding; greedy tokens equal, past the context
    (the window slides: a new step over a new cache)."""
    model = tiny(options)
    fast = laid_out(model)
    new = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(1))
    logits = {}
    with torch.inference_mode():
        for name, m in (("model", model), ("step", fast)):
            state = BatchState(m, [[5, 6, 7, 8, 9]], cache_len=5 + 12)
            assert (state.one_token is not None) == (name == "step")
            steps = [state.prefill()] + [state.decode_one_token(new[i : i + 1]) for i in range(12)]
            logits[name] = torch.stack(steps)  # (13, 1, V)
            m.clear_kv_cache()
    torch.testing.assert_close(logits["step"], logits["model"], atol=1e-5, rtol=0)
    # larger weights than the init: peaked distributions, no near-ties between the greedy tokens
    model = tiny(options, weight_scale=5.0)
    with pytest.warns(UserWarning, match="context length"):
        assert generate_ids(laid_out(model), [[3, 1, 4]], GREEDY) == generate_ids(model, [[3, 1, 4]], GREEDY)


class CountCalls(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("options", "per_layer", "per_token"),
    [({"qkv_bias": True}, 16, 9), (LLAMA_GQA, 17, 11)],
    ids=["gpt2", "llama-gqa"],
)
def test_a_decoded_token_costs_few_tensor_calls(options, per_layer, per_token):
    """The point of the planned step: SmolLM2-135M's decode step made 1,515 tensor calls (~50 a layer),
    each paying Python and the dispatcher; the step makes 17 a layer plus 11 (Llama; GPT-2: 16 + 9).
    Llama layer: norm, expand, qkv product, RoPE (mul, roll, fused multiply-add), cache write, scores,
    softmax, attention product, output product into the stream, norm, expand, fc product, silu, mul, proj
    product into the stream. Per token: embedding, RoPE's two table rows copied in, the mask, the final
    norm and the head (4), the engine's slot."""
    counts = {}
    for n_layers in (2, 3):
        model = laid_out(tiny(options, n_layers))
        token = torch.tensor([4])
        with torch.inference_mode():
            state = BatchState(model, [[5, 6]], cache_len=12)
            state.prefill()
            state.decode_one_token(token)  # slot 2 widens the window to slots [0, 4), so slot 3 need not
            mode = CountCalls()
            mode.calls = []
            with mode:
                state.decode_one_token(token)
        counts[n_layers] = len(mode.calls)
    assert counts[3] - counts[2] == per_layer, mode.calls
    assert counts[2] == 2 * per_layer + per_token, mode.calls


QUANTIZED_SHAPES = {"llama-gqa": LLAMA_GQA, "gpt2": {"qkv_bias": True}, "gpt2-erf": {"gelu_approximation": "none"}}


@pytest.mark.parametrize("shape", QUANTIZED_SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_run_their_kernel_inside_the_step(bits, shape):
    """A quantized model (int8 per row, int4 in groups of 32; the "packed" kernels) decodes through the
    planned step, each product through the layer's own kernel, or with dozero's kernels every block in one
    call of decode.c: logits within 1e-4 (int8) or 3e-4 (int4) of the largest one of the model's own
    forward, and the same greedy tokens. Those bounds are rounding's: the step's norm, RoPE and attention
    round differently in the last fp32 bit, which can move an input's rounding by a step (bfloatl6's, or the
    16-bit and 15-bit integers of dozero's int8 and int4 kernels: with these tiny models' large weights one
    such step moves a logit by up to 1.5e-4 of the largest); a wrong sum is off by far more. Llama (RMSNorm,
    RoPE, grouped-query attention, SwiGLU) and GPT-2 (LayerNorm, biases, learned positions, tanh or erf GELU)."""
    from dozero.compress.quantize import QuantizeConfig, quantize

    model = tiny(QUANTIZED_SHAPES[shape], weight_scale=5.0)
    model = quantize(model, QuantizeConfig(bits=bits, group_size=32 if bits == 4 else 0))
    assert_step_equals_forward(model, laid_out(model), tolerance=1e-4 if bits == 8 else 3e-4)


@pytest.mark.skipif(not native_available(), reason="needs dozero's kernels (AVX-512 VNNI, a C compiler)")
@pytest.mark.parametrize("bits", [8, 4])
def test_with_dozeros_kernels_a_token_is_one_call_for_all_blocks(bits):
    """decode.c runs every block of a quantized model in one call: the tensor calls of a token no longer
    grow with the layers (a float model's make 17 a layer, test above), and its logits are the Python
    plan's (`LayerPlan`, the same kernels) within the rounding bound of the test above."""
    from dozero.compress.quantize import QuantizeConfig, quantize

    counts, logits = {}, {}
    for n_layers in (2, 3):
        model = quantize(tiny(LLAMA_GQA, n_layers), QuantizeConfig(bits=bits, group_size=32 if bits == 4 else 0))
        for native in (True, False):
            fast = laid_out(model)
            with torch.inference_mode():
                state = BatchState(fast, [[5, 6]], cache_len=12)
                if not native:
                    state.one_token.native = None
                assert (state.one_token.native is not None) == native
                steps = [state.prefill()] + [state.decode_one_token(torch.tensor([t])) for t in (4, 9, 1)]
                mode = CountCalls()
                mode.calls = []
                with mode:
                    steps.append(state.decode_one_token(torch.tensor([7])))
            counts[n_layers, native] = len(mode.calls)
            logits[n_layers, native] = torch.stack(steps)
        scale = logits[n_layers, False].abs().max().item()
        torch.testing.assert_close(logits[n_layers, True], logits[n_layers, False], atol=3e-4 * scale, rtol=0)
    assert counts[3, True] == counts[2, True] < counts[2, False] < counts[3, False]


@pytest.mark.skipif(not native_available(), reason="needs dozero's kernels (AVX-512 VNNI, a C compiler)")
def test_with_dozeros_kernels_decoding_past_the_context_gives_the_models_tokens():
    """40 greedy tokens from a 32-token context: decode.c's attention over a window that widens every 4
    slots, then a new step over a new cache when the window slides; the model's own forward gives the
    same tokens."""
    from dozero.compress.quantize import QuantizeConfig, quantize

    model = quantize(tiny(LLAMA_GQA, weight_scale=5.0), QuantizeConfig(bits=4, group_size=32))
    config = GenerationConfig(temperature=0.0, max_new_tokens=40, stop_at_eot=False)
    fast = laid_out(model)
    with torch.inference_mode():
        assert BatchState(fast, [[3, 1, 4]], 32).one_token.native is not None
    with pytest.warns(UserWarning, match="context length"):
        assert generate_ids(fast, [[3, 1, 4]], config) == generate_ids(model, [[3, 1, 4]], config)


def assert_step_equals_forward(model, fast, tolerance: float = 1e-4) -> None:
    """`fast` (laid out for decoding) decodes 8 tokens through the planned step, `model` through its forward:
    logits within `tolerance` of the largest (at least `tolerance`), and the same greedy tokens."""
    new = torch.randint(0, min(97, model.cfg.vocab_size), (8,), generator=torch.Generator().manual_seed(1))
    logits = {}
    with torch.inference_mode():
        for name, m in (("model", model), ("step", fast)):
            state = BatchState(m, [[5, 6, 7]], cache_len=3 + 8)
            assert (state.one_token is not None) == (name == "step")
            steps = [state.prefill()] + [state.decode_one_token(new[i : i + 1]) for i in range(8)]
            logits[name] = torch.stack(steps)
            m.clear_kv_cache()
    scale = max(1.0, logits["model"].abs().max().item())
    torch.testing.assert_close(logits["step"], logits["model"], atol=tolerance * scale, rtol=0)
    config = GenerationConfig(temperature=0.0, max_new_tokens=8, stop_at_eot=False)
    assert generate_ids(fast, [[3, 1, 4]], config) == generate_ids(model, [[3, 1, 4]], config)


def test_what_it_does_not_handle_takes_the_models_forward():
    """A batch and LoRA layers decode through the model's forward (DecodingBlock), with the same tokens as
    without the layout."""
    from dozero.finetune.lora import LoRAConfig, apply_lora

    model = tiny(LLAMA_GQA, weight_scale=5.0)
    config = GenerationConfig(temperature=0.0, max_new_tokens=8, stop_at_eot=False)
    batch = [[5, 6, 7], [8, 9]]
    fast = laid_out(model)
    assert BatchState(fast, batch, 10).one_token is None
    assert generate_ids(fast, batch, config) == generate_ids(model, batch, config)
    changed = apply_lora(copy.deepcopy(model), LoRAConfig())
    fast = laid_out(changed)
    assert BatchState(fast, [[5, 6, 7]], 10).one_token is None
    assert generate_ids(fast, [[5, 6, 7]], config) == generate_ids(changed, [[5, 6, 7]], config)
