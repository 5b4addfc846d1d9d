"""Watching a run: progress bar, metrics.jsonl, loss.png and report.md in the run folder.

Only rank 0 writes (the others get a `RunObserver(enabled=False)` that does nothing).
`metrics.jsonl` has one JSON object per line: {"step", "loss", "lr"} for every optimizer step,
{"step", "val_loss", "val_perplexity"} at every evaluation, {"step", "tokens_per_second", ...} at
log points. Plot it yourself with pandas: `pd.read_json("runs/x/metrics.jsonl", lines=True)`.
When the tensorboard package is installed, the same numbers also go to RUN/tensorboard, under the
same names (`tensorboard --logdir runs` compares runs side by side).
"""

from __future__ import annotations

import errno
import json
import math
import platform
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from dozero.errors import DozeroError
from dozero.files import atomic_path, atomic_write


def flops_per_token(n_params: int, n_layers: int, emb_dim: int, context_length: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
    12 * L * C * T (PaLM paper, appendix B; nanoGPT's estimate_mfu)."""
    return 6 * n_params + 12 * n_layers * emb_dim * context_length


def tensorboard_writer(run_dir: Path, mode: str, start_step: int):
    """A TensorBoard SummaryWriter for RUN/tensorboard, or None (mode 'off', or 'auto' without the
    package). `purge_step`: on resume, events after the checkpoint's step are dropped, as they are from
    metrics.jsonl, because the resumed run writes them again."""
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is missing
        if mode == "on":
            raise DozeroError("--tensorboard on needs the tensorboard package: pip install tensorboard") from None
        return None
    if start_step:
        _wait_for_a_later_second(run_dir / "tensorboard")
    return SummaryWriter(run_dir / "tensorboard", purge_step=start_step + 1 if start_step else None)


def _wait_for_a_later_second(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order. A name starts with the second it was
    made, then host, pid and a per-process counter compared as text ("10" < "9"): a resume's file made
    in the same second as the last run's could be read first, its steps before the older ones. Wait
    for the next second (only a resume from Python right after a run ever waits)."""
    now = int(time.time())
    if any(f.name.split(".")[3:4] == [str(now)] for f in folder.glob("events.out.tfevents.*")):
        time.sleep(max(0.0, now + 1 - time.time()))


def disk_error(e: OSError, path: Path, note: str = "", run_dir: Path | None = None) -> DozeroError:
    """A failed write as one line: where, why (no space, read-only...), and what is still safe. With the
    `run_dir`, "--resume the run" is said only when it holds a checkpoint to resume from."""
    why = e.strerror or str(e)
    note = f"; {note}" if note else ""
    if run_dir is None or has_checkpoint(run_dir):
        then = "--resume the run"
    else:  # a new run never writes into a run folder: the same command would start RUN-2 beside this one
        then = f"run the same command again (remove {run_dir} first to keep its name)"
    return DozeroError(f"cannot write {path}: {why}{note}; {_REMEDY.get(e.errno, _REMEDY[None])}, then {then}")


_REMEDY = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (a disk quota is full)",
    errno.EROFS: "choose a folder on a disk that is not read-only",
    errno.EACCES: "fix the permissions",
    errno.EPERM: "fix the permissions",
    None: "free space or fix the permissions",
}
"""What to do about a failed write, by its errno."""


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run folder holds a checkpoint (latest/, checkpoints/step_N) that --resume continues from."""
    return (run_dir / "latest").is_dir() or any((run_dir / "checkpoints").glob("step_*"))


@contextmanager
def _disk_errors(path: Path):
    try:
        yield
    except OSError as e:
        raise disk_error(e, path, run_dir=path.parent) from None  # the observer's files lie in the run folder


class RunObserver:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        show: bool = True,
        tensorboard: str = "off",
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled  # writes files
        self.show = enabled and show  # prints the bar and messages
        self.records: list[dict] = []
        self.tensorboard = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._load_metrics(start_step)
            self.tensorboard = tensorboard_writer(self.run_dir, tensorboard, start_step)
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not self.show, unit="step", dynamic_ncols=True, leave=True
        )

    def _load_metrics(self, start_step: int) -> None:
        """On resume keep the lines up to the checkpoint's step; later ones are about to be redone.
        A torn last line (the process was killed mid-write) is dropped; a damaged line before it is
        an error, since dropping it would lose a record that cannot be redone."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise DozeroError(f"{path}, line {number}, is not JSON; fix or delete that line") from None
        self.records = [r for r in records if isinstance(r, dict) and r.get("step", 0) <= start_step]
        with _disk_errors(path):
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        self.records += records
        path = self.run_dir / "metrics.jsonl"
        with _disk_errors(path), open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        if self.tensorboard is not None:
            for record in records:
                for name, value in record.items():
                    if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tensorboard.add_scalar(name, value, record["step"])

    def progress(self, step: int, **postfix) -> None:
        if self.show:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)

    def write(self, text: str) -> None:
        if self.show:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def plot(self) -> None:
        """loss.png: the train loss of every step and the validation loss at each evaluation."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.6, label="train (per step)")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", lw=1.5, label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with _disk_errors(self.run_dir / "loss.png"), atomic_path(self.run_dir / "loss.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)

    def write_report(self, *, cfg, model_cfg, n_params, hardware, source, steps, tokens, seconds, summary) -> None:
        """report.md: what was trained, on what, for how long, and how well."""
        if not self.enabled:
            return
        val = summary.get("val_loss")
        lines = [
            f"# Training run `{self.run_dir.name}`",
            "",
            f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S %Z')} ({summary.get('stopped', 'done')})",
            f"- hardware: {hardware}; Python {platform.python_version()}",
            f"- data: {source}",
            f"- model: {n_params:,} parameters, {model_cfg.n_layers} layers x {model_cfg.n_heads} heads x "
            f"{model_cfg.emb_dim} wide, context {model_cfg.context_length}, vocabulary {model_cfg.vocab_size:,}",
            f"- steps: {steps:,} of {cfg.max_steps:,}; tokens seen: {tokens:,}",
            f"- time in this session: {seconds:.1f} s; throughput {summary.get('tokens_per_second', 0):,.0f} tokens/s",
            f"- final train loss (mean of the last {summary.get('train_window', 0)} steps): "
            f"{summary.get('train_loss', math.nan):.4f}",
        ]
        if val is not None:
            lines.append(f"- final validation loss: {val:.4f} (perplexity {math.exp(val):.2f})")
        if summary.get("best_val_loss") is not None:
            lines.append(f"- best validation loss: {summary['best_val_loss']:.4f} (kept in best/)")
        for name, value in summary.get("benchmarks", {}).items():  # --eval-tasks, at the last evaluation
            lines.append(f"- {name}: {value:.4f} (first {cfg.eval_limit} questions)")
        lines += ["", "## Loss curve", "", "![loss](loss.png)", "", "## Configuration", "", "```json"]
        lines += [json.dumps({"train": cfg.to_dict(), "model": model_cfg.to_dict()}, indent=2), "```", ""]
        with _disk_errors(self.run_dir / "report.md"):
            atomic_write(self.run_dir / "report.md", "\n".join(lines))
