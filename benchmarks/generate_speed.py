"""Generation speed of dozero vs Hugging Face `generate`: greedy decoding with a KV cache, same weights.

Batch 1, a 16-token prompt, 128 new tokens. Both models get identical random weights (through
dozero's Hugging Face conversion). Each repetition runs ours and theirs back to back, alternating
which goes first, and the script prints medians and the ratios ours / theirs:

  tokens/s           128 new tokens / wall time of the whole call (prefill included)
  first token (ms)   wall time of a call with max_new_tokens=1 (prefill + one sampling step)
  steps alone        127 / (the whole call's time - the first token's): tokens/s of the decoding steps

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/generate_speed.py
    .venv/bin/python benchmarks/generate_speed.py --shapes small --repeats 9
    .venv/bin/python benchmarks/generate_speed.py --device cuda --dtype bfloat16

Targets (issue 6): >= 1.5x Hugging Face tokens/s at the 124M shape, >= 3x at the small shape.

Quantized rows (issue 16; `--quant`, default int8 and int4 in the three kernels): the CLI's model after
`dozero compress quantize` (compress/quantize.py), int8 per output channel and int4 in groups of 32, the
tied embedding/head included. The plain rows use the default kernel, "packed": dozero's own int8/int4
kernels for decoding (model/gemv.c: the input row as 16-bit integers, the CPU's integer dot products) and
PyTorch's weight-only kernels, in bfloat16, for the prompt (SmolLM2-135M int8: perplexity +0.4%);
"reference" dequantizes each matrix per call (only the weights' rounding changes the output); "fbgemm" is
FBGEMM's int8 kernel, which also rounds the inputs to 8 bits (costly in quality: docs/en/compression.md).
Their tokens differ from the float ones by design: the script prints how many of them agree with Hugging
Face's, not "OUTPUTS DIFFER". Each shape
also prints its memory-bandwidth limit: bytes of weights read per token / the bandwidth measured here
(one `sum()` over 512 MB), the speed a decoder that only reads its weights once per token would reach.

    .venv/bin/python benchmarks/generate_speed.py --shapes gpt2 smollm2 --repeats 3
    .venv/bin/python benchmarks/generate_speed.py --shapes gpt2 smollm2 --quant int8 int4
"dozero CLI layout" is the model as `dozero generate` uses it: `layout.use_decoding_layout`, done once
at load (untimed), stores the weights (in, out) and splits each few-row product over the threads
(`layout.DecodingLinear`). "dozero" is a model used as it is (Python API; only its head is laid out).
Latest figures are in the README. At 124M, batch-1 decoding reads ~500 MB of fp32 weights per token:
memory speed decides, and the split lets both cores read. At the small shape the work per token is
tiny and per-operation overhead decides; `--compile` removes most of it. Outputs are checked token
for token against Hugging Face in every repetition ("OUTPUTS DIFFER!" otherwise).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dozero.compress.quantize import QuantizeConfig, quantize, weight_bytes
from dozero.config import ModelConfig, get_model_config
from dozero.generate.engine import GenerationConfig, generate_ids
from dozero.generate.layout import use_decoding_layout
from dozero.model.checkpoint import model_from_state_dict
from dozero.model.hf import config_to_hf, state_dict_from_hf

SHAPES = {
    "gpt2": get_model_config("gpt2", qkv_bias=True),
    # The course's character-level Shakespeare model (preset shakespeare-char: 4 layers, 128 wide, 65
    # characters), with a 256-token context so that 16 + 128 tokens fit without sliding (Hugging Face
    # cannot slide). Here the work per token is tiny, so per-token overhead decides the speed.
    "small": get_model_config("shakespeare-char", context_length=256, qkv_bias=True),
    # The same 4 x 128 body with GPT-2's 50,257-token vocabulary: the output head (25.7 MB) is then most
    # of the work per token, and it costs both implementations the same.
    "small-bpe": get_model_config("shakespeare-char", vocab_size=50257, context_length=256, qkv_bias=True),
    # SmolLM2-135M's Llama shape (30 blocks, 576 wide, GQA 9/3, SwiGLU 1536, tied 49,152-token head).
    "smollm2": get_model_config("smollm2-135m"),
}

QUANT_ROWS = {
    "int8": QuantizeConfig(bits=8),  # the default kernel, "packed"
    "int4": QuantizeConfig(bits=4, group_size=32),
    "int8 reference": QuantizeConfig(bits=8, kernel="reference"),
    "int4 reference": QuantizeConfig(bits=4, group_size=32, kernel="reference"),
    "int8 fbgemm": QuantizeConfig(bits=8, kernel="fbgemm"),
    "int4 fbgemm": QuantizeConfig(bits=4, group_size=32, kernel="fbgemm"),
}


def build_pair(cfg: ModelConfig, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf_dict = {k: v for k, v in config_to_hf(cfg).items() if k != "architectures"}
    theirs = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_dict)).eval()  # GPT-2 or Llama
    ours = model_from_state_dict(cfg, state_dict_from_hf(theirs.state_dict(), cfg), "benchmark")
    return ours.to(device=device, dtype=dtype).eval(), theirs.to(device=device, dtype=dtype)


def timed(fn, device) -> tuple[float, list[int]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_ours(model, prompt, new_tokens, compile=False):
    config = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens, stop_at_eot=False, compile=compile)
    return generate_ids(model, [prompt.tolist()[0]], config)[0]


def run_theirs(model, prompt, new_tokens):
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            use_cache=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[0, prompt.shape[1] :].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy outputs share before they part (after that they follow other texts)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def measured_bandwidth() -> float:
    """Bytes/s of one `sum()` over 512 MB (fp32), the median of 3: what reading weights can reach here."""
    data = torch.ones(128 * 2**20)
    times = [timed(data.sum, torch.device("cpu"))[0] for _ in range(4)][1:]
    return data.numel() * 4 / statistics.median(times)


def bench(name, cfg, prompt_tokens, new_tokens, repeats, device, dtype, compile, quant=()) -> dict:
    """{runner: (tokens/s, first-token ms)} medians, and whether all runners gave the same tokens."""
    ours, theirs = build_pair(cfg, device, dtype)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    runs = {"dozero": lambda n: run_ours(ours, prompt, n)}
    if device.type == "cpu":  # the CLI's model: weights laid out for decoding once, at load (not timed)
        laid_out = copy.deepcopy(ours)
        use_decoding_layout(laid_out)
        runs["dozero CLI layout"] = lambda n: run_ours(laid_out, prompt, n)
    if compile:
        runs["dozero compiled"] = lambda n: run_ours(ours, prompt, n, compile=True)
    models = {"dozero": ours}
    for row in quant:  # as `dozero generate` runs a quantized folder: quantized, then the CPU layout
        models[row] = quantize(copy.deepcopy(ours), QUANT_ROWS[row])
        use_decoding_layout(models[row])
        runs[row] = lambda n, m=models[row]: run_ours(m, prompt, n)
    runs["Hugging Face"] = lambda n: run_theirs(theirs, prompt, n)
    for who, fn in runs.items():  # warm-up: allocator, kernels, lazy imports, compilation
        seconds = timed(lambda fn=fn: fn(new_tokens), device)[0]
        print(f"  warm-up {who}: {seconds:.1f} s", flush=True)
    times = {(who, what): [] for who in runs for what in ("full", "first", "decode")}
    same = True
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        outputs = {}
        for who in order:
            seconds, outputs[who] = timed(lambda who=who: runs[who](new_tokens), device)
            times[who, "full"].append(seconds)
            times[who, "first"].append(timed(lambda who=who: runs[who](1), device)[0])
            times[who, "decode"].append((seconds - times[who, "first"][-1]) / (new_tokens - 1))  # a token's step
        same &= all(out == outputs["Hugging Face"] for who, out in outputs.items() if who not in quant)
        agree = {who: common_prefix(outputs[who], outputs["Hugging Face"]) for who in quant}
    med = {key: statistics.median(values) for key, values in times.items()}
    results = {who: (new_tokens / med[who, "full"], 1000 * med[who, "first"], 1 / med[who, "decode"]) for who in runs}
    return results, same, {who: weight_bytes(m) for who, m in models.items()}, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "small"], choices=list(SHAPES))
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="also time dozero with compile=True")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quant", nargs="*", default=list(QUANT_ROWS), choices=list(QUANT_ROWS),
                        help="quantized rows (default: all; none: --quant with no value)")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"device {device}, {args.dtype}, torch threads {torch.get_num_threads()}, batch 1, prompt "
        f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, median of {args.repeats} repetitions"
    )
    bandwidth = measured_bandwidth() if device.type == "cpu" else None
    if bandwidth:
        print(f"memory bandwidth measured: {bandwidth / 1e9:.1f} GB/s (sum over 512 MB)")
    for name in args.shapes:
        shape = SHAPES[name]
        sizes = (args.prompt_tokens, args.new_tokens, args.repeats)
        quant = args.quant if device.type == "cpu" else []
        results, same, weights_by_row, agree = bench(name, shape, *sizes, device, dtype, args.compile, quant)
        hf_rate, hf_first, _ = results["Hugging Face"]
        print(f"{name}: {'' if same else 'OUTPUTS DIFFER! '}(ratios: vs Hugging Face, higher is better)")
        for who, (rate, first, decode) in results.items():
            weights = weights_by_row.get(who, weights_by_row["dozero"])
            limit = ""
            if bandwidth:  # the decoding steps alone (the prompt's time taken out) against the limit
                limit = (
                    f"   limit {bandwidth / weights:6.1f} tokens/s ({weights / 1e6:.0f} MB/token), steps alone "
                    f"{decode:6.1f} ({decode * weights / bandwidth:4.0%} of it)"
                )
            same_tokens = f"   first {agree[who]} tokens = HF's" if who in agree else ""
            print(f"  {who:18} {rate:8.1f} tokens/s ({rate / hf_rate:4.2f}x)   "
                  f"first token {first:8.1f} ms ({hf_first / first:4.2f}x){limit}{same_tokens}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
