"""One table for every compression setting: size, quality and decode speed, measured on one model.

    dozero compress report --model smollm2-135m-instruct --text tinyshakespeare --out out/report
    rows = compression_report(model, tokenizer, "tinyshakespeare", calibration_ids)

For each setting (fp32, int8, int4 in groups of 32 and 64, int8 through FBGEMM, magnitude and Wanda
pruning to 50%, 25% of the feed-forward neurons removed) it applies the method to a fresh copy of the
model and measures
  * weights (MB): the bytes of the stored tensors (a tied head once): the file's size, and about what
    decoding one token reads;
  * perplexity and bits per byte on a held-out text (evaluate/perplexity.py, every token predicted once);
  * decode tokens/s: greedy, batch 1, as `dozero generate` runs the model (the CPU layout applied).
It writes report.md (the table), report.json and quality_vs_size.png (perplexity against weights).
Pruned models are not fine-tuned here, which is the pruning papers' worst case.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from dozero.compress.prune import PruneConfig, prune
from dozero.compress.quantize import QuantizeConfig, quantize, weight_bytes

SETTINGS: dict[str, QuantizeConfig | PruneConfig | None] = {
    "fp32": None,
    "int8": QuantizeConfig(bits=8),
    "int4-g32": QuantizeConfig(bits=4, group_size=32),
    "int4-g64": QuantizeConfig(bits=4, group_size=64),
    "int8-fbgemm": QuantizeConfig(bits=8, kernel="fbgemm"),
    "magnitude-50%": PruneConfig(method="magnitude", sparsity=0.5),
    "wanda-50%": PruneConfig(method="wanda", sparsity=0.5),
    "neurons-25%": PruneConfig(method="neurons", sparsity=0.25),
}


def apply_setting(model, setting, calibration: torch.Tensor | None):
    """A compressed copy of `model` (the original is left as it is)."""
    model = copy.deepcopy(model)
    if isinstance(setting, QuantizeConfig):
        return quantize(model, setting)
    if isinstance(setting, PruneConfig):
        return prune(model, setting, calibration)
    return model


def decode_speed(model, new_tokens: int) -> float:
    """Greedy tokens/s at batch 1 from a one-token prompt, as `dozero generate` runs (median of 3 runs)."""
    from dozero.generate.engine import GenerationConfig, generate_ids
    from dozero.generate.layout import use_decoding_layout

    use_decoding_layout(model)
    config = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens, stop_at_eot=False)
    generate_ids(model, [[0]], GenerationConfig(temperature=0.0, max_new_tokens=2, stop_at_eot=False))  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate_ids(model, [[0]], config)
        times.append(time.perf_counter() - start)
    return new_tokens / sorted(times)[1]


def compression_report(
    model, tokenizer, text, calibration=None, names=None, max_tokens: int = 1024, new_tokens: int = 32, log=print
) -> list[dict]:
    """One row per setting in `names` (default: all of SETTINGS)."""
    from dozero.evaluate.perplexity import evaluate_text

    rows = []
    for name in names or list(SETTINGS):
        compressed = apply_setting(model, SETTINGS[name], calibration)
        metrics = evaluate_text(compressed, tokenizer, text, max_tokens=max_tokens)["metrics"]
        row = {
            "setting": name,
            "weights_mb": weight_bytes(compressed) / 1e6,
            "perplexity": metrics["perplexity"]["score"],
            "bits_per_byte": metrics["bits_per_byte"]["score"],
            "tokens_per_second": decode_speed(compressed, new_tokens) if new_tokens else None,
        }
        rows.append(row)
        log(format_row(row, rows[0]))
        del compressed
    return rows


def format_row(row: dict, base: dict) -> str:
    speed = "-" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:.1f}"
    change = 100 * (row["perplexity"] / base["perplexity"] - 1)
    return (
        f"| {row['setting']} | {row['weights_mb']:.1f} | {base['weights_mb'] / row['weights_mb']:.2f}x | "
        f"{row['perplexity']:.3f} | {change:+.1f}% | {row['bits_per_byte']:.4f} | {speed} |"
    )


HEADER = (
    "| setting | weights (MB) | smaller | perplexity | vs fp32 | bits/byte | decode tokens/s |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def write_report(rows: list[dict], folder: str | Path, title: str) -> Path:
    """report.md, report.json and quality_vs_size.png in `folder`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from dozero.files import atomic_path, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = "\n".join([HEADER] + [format_row(r, rows[0]) for r in rows])
    with atomic_path(folder / "report.md") as tmp:
        Path(tmp).write_text(f"# {title}\n\n{table}\n", encoding="utf-8")
    write_json(folder / "report.json", {"title": title, "rows": rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["weights_mb"], r["perplexity"])
        ax.annotate(
            r["setting"], (r["weights_mb"], r["perplexity"]), fontsize=8, xytext=(4, 2), textcoords="offset points"
        )
    ax.set_xlabel("weights (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(folder / "quality_vs_size.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return folder


def main_report(model, tokenizer, args) -> list[dict]:
    """The CLI's body (commands.py): calibration tokens, the rows, the files."""
    from dozero.compress.prune import calibration_tokens

    names = args.settings or list(SETTINGS)
    calibration = None
    if any(isinstance(SETTINGS[n], PruneConfig) and SETTINGS[n].method == "wanda" for n in names):
        calibration = calibration_tokens(args.calibration, tokenizer, 2048)
    print(HEADER)
    rows = compression_report(model, tokenizer, args.text, calibration, names, args.max_tokens, args.new_tokens)
    title = f"{args.model}: {args.max_tokens} tokens of {Path(str(args.text)).name}"
    write_report(rows, args.out, title)
    print(json.dumps({"wrote": str(args.out)}))
    return rows
