"""The report card: a JSON file per evaluation, a Markdown table, and side-by-side comparisons.

    RUN/eval/<name>.json     {"format": "dozero-eval", "config": ..., "results": [{task, n, metrics, random, ...}]}
    RUN/eval/<name>.md       | task | metric | score | ± stderr | random | n |

`dozero eval --compare a.json b.json` prints the reports side by side and draws a bar chart (PNG).
"""

from __future__ import annotations

import math
from pathlib import Path

from dozero.errors import DozeroError
from dozero.files import atomic_write, write_json


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def rows(report: dict) -> list[tuple[str, str, float, float | None, float | None, int]]:
    """(task, metric, score, stderr, random-chance score, n) for every metric of every result."""
    out = []
    for r in report["results"]:
        for metric, value in r["metrics"].items():
            out.append((r["task"], metric, value["score"], value["stderr"], r.get("random", {}).get(metric), r["n"]))
    return out


def markdown(report: dict) -> str:
    lines = ["| task | metric | score | ± stderr | random | n |", "|---|---|---:|---:|---:|---:|"]
    for task, metric, score, stderr, chance, n in rows(report):
        lines.append(f"| {task} | {metric} | {_fmt(score)} | {_fmt(stderr)} | {_fmt(chance)} | {n:,} |")
    notes = [f"{r['task']}: {r['note']}." for r in report["results"] if r.get("note")]
    truncated = sum(r.get("truncated", 0) for r in report["results"])
    if truncated:
        notes.append(f"{truncated} prompts were longer than the model's context and were cut from the left.")
    return "\n".join(lines + [""] + notes).rstrip() + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """`out` (.json) and the Markdown table beside it (.md), each written atomically."""
    out = Path(out)
    if out.suffix != ".json":
        raise DozeroError(f"--out should name a .json file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    md = out.with_suffix(".md")
    atomic_write(md, markdown(report))
    return out, md


def read_report(path: str | Path) -> dict:
    from dozero.model.checkpoint import read_json  # not found / not JSON / not an object: one line each

    report = read_json(Path(path))
    if report.get("format") != "dozero-eval":
        raise DozeroError(f"{path} is not a dozero eval report (written by `dozero eval`)")
    return report


def compare_markdown(names: list[str], reports: list[dict]) -> str:
    """One row per (task, metric), one column per report; '-' where a report lacks that task."""
    tables = [{(t, m): (s, e) for t, m, s, e, _, _ in rows(r)} for r in reports]
    keys = list(dict.fromkeys(k for table in tables for k in table))
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for task, metric in keys:
        cells = []
        for table in tables:
            s, e = table.get((task, metric), (None, None))
            cells.append(_fmt(s) + (f" ± {_fmt(e)}" if e is not None else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_chart(names: list[str], reports: list[dict], out: Path) -> Path:
    """Grouped bars: one group per (task, metric) in [0, 1] (accuracies), one bar per report, with stderr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [{(t, m): (s, e) for t, m, s, e, _, _ in rows(r) if not t.startswith("perplexity:")} for r in reports]
    keys = list(dict.fromkeys(k for table in tables for k in table))
    if not keys:
        raise DozeroError("the reports hold no accuracy to chart (perplexity only)")
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) * len(reports)), 4))
    for i, (name, table) in enumerate(zip(names, tables, strict=True)):
        xs = [k + i * width for k in range(len(keys))]
        heights = [table.get(key, (0.0, None))[0] or 0.0 for key in keys]
        errors = [table.get(key, (None, None))[1] or 0.0 for key in keys]
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], [f"{t}\n{m}" for t, m in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
