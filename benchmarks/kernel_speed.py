"""The quantized matrix products of one decoded token, alone: dozero's kernels vs PyTorch's, against the memory.

For each shape (GPT-2 124M, SmolLM2-135M: random weights, quantized as `dozero compress quantize` does, the
tied head included) and format (int8 per row, int4 in groups of 32), one pass calls every quantized layer
once with one input row, as decoding one token does: the weights are read once each, out of cache. Passes
of dozero's kernels (model/gemv.c, fp32 input) and PyTorch's (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`, bfloat16 input) take turns; the script prints the median time of a pass,
the bytes it reads per second, and that as a share of the memory bandwidth measured here (one `sum()` over
512 MB, as in generate_speed.py). What a whole decoded token adds (norms, attention, sampling) is in
generate_speed.py.

    .venv/bin/python benchmarks/kernel_speed.py --threads 2 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dozero.compress.quantize import QuantizeConfig, quantize
from dozero.model.gpt import GPTModel
from dozero.model.native import native_available
from dozero.model.quantized import QuantizedLinear, packed_mm_bf16
from generate_speed import SHAPES, measured_bandwidth

FORMATS = {"int8": QuantizeConfig(bits=8), "int4": QuantizeConfig(bits=4, group_size=32)}


def layers_of(shape: str, fmt: str) -> list[QuantizedLinear]:
    torch.manual_seed(0)
    model = quantize(GPTModel(SHAPES[shape]).eval(), FORMATS[fmt])
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.kernel = "packed"
        layer.packed_weight(), layer.few_rows()  # packed once, untimed
    return layers


def passes(layers: list[QuantizedLinear]) -> dict:
    """{kernel: one pass over the layers}, each pass calling every layer once on one row."""
    rows = {n: torch.randn(1, n) for n in {layer.in_features for layer in layers}}
    rows_bf16 = {n: x.bfloat16() for n, x in rows.items()}

    def ours():
        for layer in layers:
            layer.few_rows()(rows[layer.in_features])

    def pytorch():
        for layer in layers:
            packed_mm_bf16(rows_bf16[layer.in_features], layer.packed_weight(), layer.out_features)

    return {"dozero": ours, "PyTorch": pytorch}


def timed(fn, flush: torch.Tensor) -> float:
    flush.sum()  # larger than the last-level cache: the pass reads its weights from memory
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "smollm2"], choices=["gpt2", "smollm2"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native_available():
        raise SystemExit("dozero's kernels do not run here (they need AVX-512 VNNI and a C compiler)")
    bandwidth = measured_bandwidth()
    flush = torch.ones(128 * 2**20)  # 512 MB
    print(f"torch threads {torch.get_num_threads()}, memory bandwidth measured: {bandwidth / 1e9:.1f} GB/s")
    for shape in args.shapes:
        for fmt in FORMATS:
            layers = layers_of(shape, fmt)
            nbytes = sum(b.numel() * b.element_size() for layer in layers for b in layer.buffers())
            runs = passes(layers)
            with torch.inference_mode():
                for fn in runs.values():  # warm-up
                    fn()
                times = {who: [] for who in runs}
                for r in range(args.repeats):
                    for who in runs if r % 2 == 0 else reversed(list(runs)):
                        times[who].append(timed(runs[who], flush))
            print(f"{shape} {fmt}: {len(layers)} products, {nbytes / 1e6:.0f} MB of weights and scales")
            for who, ts in times.items():
                ms = statistics.median(ts) * 1e3
                rate = nbytes / ms / 1e6
                print(f"  {who:8} {ms:6.2f} ms   {rate:5.1f} GB/s   {rate / (bandwidth / 1e9):4.0%} of the bandwidth")
            speedup = statistics.median(times["PyTorch"]) / statistics.median(times["dozero"])
            print(f"  dozero {speedup:.2f}x PyTorch")


if __name__ == "__main__":
    main()
