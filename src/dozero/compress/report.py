"""One table for every compression setting: size, memory, quality and decode speed, measured on one model.

    dozero compress report --model smollm2-135m-instruct --text tinyshakespeare --out out/report
    rows = compression_report(model, tokenizer, "tinyshakespeare", calibration_ids)

For each setting (fp32, int8, int4 in groups of 32 and 64 by round-to-nearest and by GPTQ, int8 through
FBGEMM with and without SmoothQuant's rescaling, magnitude and Wanda pruning to 50%, 25% of the feed-forward
neurons removed, a third of the attention heads removed) it applies the method to a fresh copy of the model,
saves it to a temporary folder, and measures that folder in a fresh process, as `dozero generate` / `dozero eval`
would use it:
  * weights (MB): the bytes of the stored tensors (a tied head once), about what one token reads; and
    the folder's size on disk;
  * peak memory (MB): the process's peak resident memory from loading the folder to the end of the
    measurements, less what it held before loading (Python, torch and dozero themselves);
  * perplexity and bits per byte on a held-out text (evaluate/perplexity.py, every token predicted once);
  * accuracy on a few `dozero eval` tasks (default arc_easy and piqa, the first --limit questions);
  * decode tokens/s: greedy, batch 1, as `dozero generate` runs the model (the CPU layout applied).
It writes report.md (the table), report.json and quality_vs_size.png (perplexity against weights).
Pruned models are not fine-tuned here, which is the pruning papers' worst case.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
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
    "int4-g32-gptq": QuantizeConfig(bits=4, group_size=32, method="gptq"),
    "int4-g64-gptq": QuantizeConfig(bits=4, group_size=64, method="gptq"),
    "int8-fbgemm": QuantizeConfig(bits=8, kernel="fbgemm"),
    "int8-fbgemm-smooth": QuantizeConfig(bits=8, kernel="fbgemm", smooth=0.7),
    "magnitude-50%": PruneConfig(method="magnitude", sparsity=0.5),
    "wanda-50%": PruneConfig(method="wanda", sparsity=0.5),
    "neurons-25%": PruneConfig(method="neurons", sparsity=0.25),
    "heads-33%": PruneConfig(method="heads", sparsity=1 / 3),
}


def apply_setting(model, setting, calibration: torch.Tensor | None):
    """A compressed copy of `model` (the original is left as it is)."""
    model = copy.deepcopy(model)
    if isinstance(setting, QuantizeConfig):
        return quantize(model, setting, calibration)
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


def save_setting(model, tokenizer, folder: Path) -> None:
    from dozero.compress.quantize import save_quantized
    from dozero.model.checkpoint import save_model

    if getattr(model, "quantization", None) is not None:
        save_quantized(model, folder, tokenizer)
    else:
        save_model(model, folder, tokenizer=tokenizer)


def measure_folder(folder: str, params: dict) -> dict:
    """Run in a fresh process (`python -m dozero.compress.report FOLDER PARAMS`): load the folder as the CLI
    does, then perplexity, eval tasks and decode speed, and the peak memory all of that took."""
    from dozero.evaluate.harness import EvalConfig, evaluate_model
    from dozero.model.checkpoint import load_model
    from dozero.runtime import resident_bytes
    from dozero.tokenizer import load_tokenizer

    before = resident_bytes("VmRSS")
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    config = EvalConfig(tasks=params["tasks"], limit=params["limit"], samples=False)
    card = evaluate_model(model, tokenizer, config, text=params["text"], max_text_tokens=params["max_tokens"])
    text, *tasks = card["results"]
    row = {
        "perplexity": text["metrics"]["perplexity"]["score"],
        "bits_per_byte": text["metrics"]["bits_per_byte"]["score"],
        "tasks": {t["task"]: t["metrics"]["acc"]["score"] for t in tasks},
        "tokens_per_second": decode_speed(model, params["new_tokens"]) if params["new_tokens"] else None,
    }
    peak = resident_bytes("VmHWM")
    return {**row, "peak_memory_mb": (peak - before) / 2**20 if before and peak else None}  # MiB, as before


def measure_in_child(folder: Path, params: dict) -> dict:
    command = [sys.executable, "-m", "dozero.compress.report", str(folder), json.dumps(params)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        from dozero.errors import DozeroError

        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DozeroError(f"compress report: measuring {folder.name} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compression_report(
    model, tokenizer, text, calibration=None, names=None, max_tokens: int = 1024, new_tokens: int = 32, log=print,
    tasks: str = "arc_easy,piqa", limit: int = 100,
) -> list[dict]:  # fmt: skip
    """One row per setting in `names` (default: all of SETTINGS), each measured in a fresh process."""
    params = {"text": str(text), "max_tokens": max_tokens, "new_tokens": new_tokens, "tasks": tasks, "limit": limit}
    rows = []
    for name in names or list(SETTINGS):
        compressed = apply_setting(model, SETTINGS[name], calibration)
        with tempfile.TemporaryDirectory(prefix="dozero-report-") as tmp:
            folder = Path(tmp) / name
            save_setting(compressed, tokenizer, folder)
            row = {"setting": name, "weights_mb": weight_bytes(compressed) / 1e6}
            row["disk_mb"] = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            del compressed
            row.update(measure_in_child(folder, params))
        rows.append(row)
        log(format_row(row, rows[0]))
    return rows


def format_row(row: dict, base: dict) -> str:
    speed = "-" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:.1f}"
    memory = "-" if row.get("peak_memory_mb") is None else f"{row['peak_memory_mb']:.0f}"
    change = 100 * (row["perplexity"] / base["perplexity"] - 1)
    tasks = "".join(f" {100 * acc:.1f} |" for acc in row.get("tasks", {}).values())
    return (
        f"| {row['setting']} | {row['weights_mb']:.1f} | {base['weights_mb'] / row['weights_mb']:.2f}x | "
        f"{row.get('disk_mb', row['weights_mb']):.1f} | {memory} | {row['perplexity']:.3f} | {change:+.1f}% | "
        f"{row['bits_per_byte']:.4f} |{tasks} {speed} |"
    )


def header(tasks: list[str]) -> str:
    names = "".join(f" {t} acc (%) |" for t in tasks)
    return (
        "| setting | weights (MB) | smaller | on disk (MB) | peak memory (MB) | perplexity | vs fp32 | bits/byte |"
        f"{names} decode tokens/s |\n|---|" + "---:|" * (8 + len(tasks))
    )


def write_report(rows: list[dict], folder: str | Path, title: str) -> Path:
    """report.md, report.json and quality_vs_size.png in `folder`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from dozero.files import atomic_path, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = "\n".join([header(list(rows[0].get("tasks", {})))] + [format_row(r, rows[0]) for r in rows])
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
    from dozero.compress.calibrate import calibration_tokens

    names = args.settings or list(SETTINGS)
    calibration = None
    if any(isinstance(SETTINGS[n], PruneConfig) and SETTINGS[n].method in ("wanda", "heads") for n in names) or any(
        isinstance(SETTINGS[n], QuantizeConfig) and (SETTINGS[n].smooth or SETTINGS[n].method == "gptq") for n in names
    ):
        calibration = calibration_tokens(args.calibration, tokenizer, 2048)
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks:  # unknown names and bad limits are one line now, not after the first setting's minutes
        from dozero.evaluate.harness import EvalConfig, task_plan

        task_plan(EvalConfig(tasks=args.tasks, limit=args.limit).tasks, args.limit)
    print(header([Path(t).stem if t.endswith(".jsonl") else t for t in tasks]))  # as the results name them
    rows = compression_report(
        model, tokenizer, args.text, calibration, names, args.max_tokens, args.new_tokens, print, args.tasks, args.limit
    )
    title = f"{args.model}: {args.max_tokens} tokens of {Path(str(args.text)).name}"
    if tasks:
        title += f"; first {args.limit} questions of {', '.join(tasks)}"
    write_report(rows, args.out, title)
    print(json.dumps({"wrote": str(args.out)}))
    return rows


if __name__ == "__main__":  # the fresh process of measure_in_child: one JSON line on stdout
    result = measure_folder(sys.argv[1], json.loads(sys.argv[2]))
    print(json.dumps(result))
