"""DPO (dozero.align): answer-only log-probs equal transformers' on the HF export, the loss and implicit
rewards equal TRL's DPOTrainer on the same log-probs, pair files checked line by line, and a DPO run on
the trainer's loop (margins grow, exact resume, bad input refused)."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dozero.align.data import collate_pairs, read_pairs, tokenize_pairs
from dozero.align.dpo import DPO_DEFAULTS, DPOConfig, dpo, dpo_loss
from dozero.align.logprobs import sequence_logprobs
from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.finetune.chat import CHATML_TEMPLATE, add_chat_tokens
from dozero.model.checkpoint import save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import gpt2

TINY = ModelConfig(vocab_size=50257, context_length=48, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def chat_model():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    for p in model.parameters():  # larger than init, so log-probs differ clearly between answers
        torch.nn.init.normal_(p, std=0.2)
    tokenizer, model = add_chat_tokens(gpt2(), model)
    return model.eval(), tokenizer


PAIRS = [
    ([{"role": "user", "content": "What is 2+2?"}], "4", "5, I think"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}], "Paris.", "Rome"),
    (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "?"},
        ],
        "Yes.",
        "No, never.",
    ),
]


def test_answer_logprobs_equal_transformers_on_the_hf_export(chat_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = chat_model
    save_model(model, tmp_path / "hf", tokenizer=tokenizer, format="hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    examples, stats = tokenize_pairs(PAIRS, tokenizer, CHATML_TEMPLATE, 49)
    assert stats.pairs == 3 and stats.dropped == 0
    (chosen_ids, chosen_mask), _ = examples[2]
    scored = [i for i, m in zip(chosen_ids, chosen_mask, strict=True) if m]
    assert tokenizer.decode(scored) == "Yes.<|im_end|>"  # the last answer only, not the earlier "hello"
    x, y = collate_pairs(examples, tokenizer.eot_id)
    with torch.no_grad():
        ours = sequence_logprobs(model, x, y)  # (6,)
    expected = []
    for ids, mask in [c for c, _ in examples] + [r for _, r in examples]:
        with torch.no_grad():
            logprobs = theirs(torch.tensor([ids])).logits[0].log_softmax(-1)  # (L, V)
        expected.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]))
    torch.testing.assert_close(ours, torch.tensor(expected), atol=1e-4, rtol=1e-5)


def trl_dpo(loss_type, beta, label_smoothing, chosen, rejected, ref_chosen, ref_rejected, lengths):
    """TRL 1.16's DPOTrainer._compute_loss on given summed log-probs: a model stub returns per-token
    log-probs that sum to them over a completion mask of the given lengths."""
    trl = pytest.importorskip("trl")
    policy = torch.cat([chosen, rejected])  # (2P,) TRL's batch: chosen rows, then rejected rows
    L = int(max(lengths)) + 2
    completion_mask = torch.zeros(len(policy), L, dtype=torch.long)
    per_token = torch.zeros(len(policy), L - 1)
    for b, n in enumerate(lengths):
        completion_mask[b, 2 : 2 + n] = 1
        per_token[b, 1 : 1 + n] = policy[b] / n
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    ids = torch.zeros(len(policy), L, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}  # fmt: skip
    loss = trl.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(
    "loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.2, 0.2), ("ipo", 0.1, 0.0)]
)
def test_dpo_loss_and_rewards_equal_trl(loss_type, beta, smoothing):
    g = torch.Generator().manual_seed(1)
    P = 16
    chosen, rejected, ref_chosen, ref_rejected = (
        -20 * torch.rand(P, generator=g, dtype=torch.float64) for _ in range(4)
    )
    lengths = torch.randint(1, 9, (2 * P,), generator=g)
    loss, metrics = trl_dpo(loss_type, beta, smoothing, chosen, rejected, ref_chosen, ref_rejected, lengths.tolist())
    losses, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, smoothing, *lengths.chunk(2))
    assert abs(float(losses.mean()) - float(loss)) < 1e-6
    assert abs(float(cr.mean()) - metrics["rewards/chosen"]) < 1e-6
    assert abs(float(rr.mean()) - metrics["rewards/rejected"]) < 1e-6
    assert abs(float((cr - rr).mean()) - metrics["rewards/margins"]) < 1e-6
    assert float((cr > rr).float().mean()) == metrics["rewards/accuracies"]


def test_conservative_dpo_is_the_expected_loss_under_flipped_labels():
    c, r = torch.tensor([-3.0]), torch.tensor([-5.0])
    zero = torch.zeros(1)
    clean = dpo_loss(c, r, zero, zero, 0.5)[0]
    flipped = dpo_loss(r, c, zero, zero, 0.5)[0]
    assert torch.allclose(dpo_loss(c, r, zero, zero, 0.5, "sigmoid", 0.1)[0], 0.9 * clean + 0.1 * flipped)


# ----------------------------------------------------------------------------- pair files


def test_every_pair_line_is_checked_with_its_number(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    cases = [
        ([good, "{oops"], "p.jsonl:2: not valid JSON"),
        (
            [good, {"prompt": "q", "chosen": "same", "rejected": "same"}],
            'p.jsonl:2: "chosen" and "rejected" are the same',
        ),
        ([{"prompt": "q", "chosen": "  ", "rejected": "b"}], 'p.jsonl:1: "chosen" is empty'),
        ([{"prompt": "q", "chosen": "a"}], 'p.jsonl:1: "rejected" should be a string'),
        ([{"question": "q", "chosen": "a", "rejected": "b"}], 'p.jsonl:1: needs "prompt"'),
        ([{"messages": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}], "p.jsonl:1: message 0"),
    ]
    for lines, message in cases:
        with pytest.raises(DozeroError, match=message.replace("?", r"\?")):
            read_pairs(write_jsonl(tmp_path / "p.jsonl", lines))
    assert read_pairs(write_jsonl(tmp_path / "p.jsonl", [good]))[0] == ([{"role": "user", "content": "q"}], "a", "b")


def test_pairs_longer_than_the_context_are_dropped_and_counted(chat_model):
    _, tokenizer = chat_model
    pairs = PAIRS + [([{"role": "user", "content": "word " * 60}], "a", "b")]
    examples, stats = tokenize_pairs(pairs, tokenizer, CHATML_TEMPLATE, 49)
    assert (stats.pairs, stats.dropped, len(examples)) == (3, 1, 3)
    with pytest.raises(DozeroError, match="no pair is left"):
        tokenize_pairs(pairs[-1:], tokenizer, CHATML_TEMPLATE, 49)


# ----------------------------------------------------------------------------- runs


@pytest.fixture()
def base_and_pairs(tmp_path):
    torch.manual_seed(0)
    save_model(GPTModel(TINY), tmp_path / "base", tokenizer=gpt2())
    records = [
        {"prompt": f"add {i} and {i}", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1} maybe"} for i in range(12)
    ]
    return tmp_path / "base", write_jsonl(tmp_path / "pairs.jsonl", records)


def settings(tmp_path, **changes):
    base = dict(out_dir=str(tmp_path / "run"), micro_batch_size=4, max_steps=6, eval_interval=3, warmup_steps=1,
                log_interval=1, tensorboard="off", device="cpu", lr=1e-2)  # fmt: skip
    return dataclasses.replace(DPO_DEFAULTS, **{**base, **changes})


def metrics_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_run_raises_the_margin_and_resumes_exactly(tmp_path, base_and_pairs):
    base, data = base_and_pairs
    s = DPOConfig(model=str(base), data=data, lora_rank=4, beta=0.5)
    whole = dpo(s, settings(tmp_path / "a"), quiet=True)
    first = dpo(s, settings(tmp_path / "b", stop_after=3), quiet=True)
    rest = dpo(s, settings(tmp_path / "b"), resume=first.run_dir, quiet=True)
    assert {**first.losses, **rest.losses} == whole.losses  # bit-exact
    assert abs(whole.losses[1] - 0.693147) < 1e-4  # log 2: at step 1 the policy is the reference (LoRA B = 0)
    assert whole.losses[6] < whole.losses[1]
    margins = [r["reward_margin"] for r in metrics_of(whole.run_dir) if "reward_margin" in r]
    assert len(margins) == 6 and margins[0] == 0.0 and margins[-1] > 0
    assert any("val_reward_accuracy" in r for r in metrics_of(whole.run_dir))
    config = json.loads((whole.run_dir / "latest" / "config.json").read_text())
    assert config["align"]["method"] == "dpo" and config["align"]["beta"] == 0.5


@pytest.mark.slow
def test_live_reference_gives_the_same_losses_as_precomputed(tmp_path, base_and_pairs):
    base, data = base_and_pairs
    s = DPOConfig(model=str(base), data=data, lora_rank=4, lora_dropout=0.0)
    pre = dpo(s, settings(tmp_path / "a", max_steps=3), quiet=True)
    live = dpo(dataclasses.replace(s, live_reference=True), settings(tmp_path / "b", max_steps=3), quiet=True)
    for step in pre.losses:
        assert abs(pre.losses[step] - live.losses[step]) < 1e-5


def test_reference_of_another_vocabulary_is_refused(tmp_path, base_and_pairs):
    from dozero.tokenizer import BPETokenizer

    base, data = base_and_pairs
    full = gpt2()
    small = BPETokenizer({k: v for k, v in full.ranks.items() if v < 400}, {"<|endoftext|>": 400}, full.pattern)
    save_model(GPTModel(dataclasses.replace(TINY, vocab_size=401)), tmp_path / "small", tokenizer=small)
    with pytest.raises(DozeroError, match="is not the policy's"):
        dpo(DPOConfig(model=str(base), data=data, reference=str(tmp_path / "small")), settings(tmp_path), quiet=True)
    assert not (tmp_path / "run").exists()


def test_cli_bad_pairs_are_one_line_and_write_nothing(tmp_path, base_and_pairs, capsys):
    from dozero.cli import main

    base, _ = base_and_pairs
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q"}])
    out = tmp_path / "run"
    assert main(["align", "dpo", "--model", str(base), "--data", bad, "--out-dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:2:" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["align", "rl", "--model", str(base), "--data", bad, "--reward", "nope", "--out-dir", str(out)]) == 2
    assert "--reward 'nope'" in capsys.readouterr().err and not out.exists()


def test_cli_second_run_into_the_same_folder_says_where_it_goes(tmp_path, base_and_pairs, capsys):
    """As with `dozero train`, a run is never overwritten: the second goes to OUT-2, and says so before its
    first step (it used to say nothing until the last line)."""
    from dozero.cli import main

    base, data = base_and_pairs
    out = tmp_path / "run"
    argv = ["align", "dpo", "--model", str(base), "--data", data, "--out-dir", str(out), "--device", "cpu",
            "--max-steps", "1", "--eval-interval", "1", "--micro-batch-size", "4", "--tensorboard", "off"]  # fmt: skip
    assert main(argv) == 0
    assert "holds a run already" not in capsys.readouterr().out
    first = (out / "latest" / "model.safetensors").read_bytes()
    assert main(argv) == 0
    said = capsys.readouterr().out
    head, step, _ = said.partition("step 1")
    assert step, said
    assert f"{out} holds a run already and a run is never overwritten: this run writes to {out}-2" in head
    assert f"--resume {out})" in head and f"dozero chat --model {out}-2" in said
    assert (out / "latest" / "model.safetensors").read_bytes() == first  # the first run is as it was
    assert (tmp_path / "run-2" / "latest" / "model.safetensors").is_file()


def test_a_folder_that_is_not_a_run_is_refused_without_force(tmp_path, base_and_pairs, capsys):
    """As `dozero train`: --out-dir holding someone's files is refused, from the command line before the
    model is looked for (it does not exist here) and from Python, unless --force writes the run beside them."""
    from dozero.cli import main

    base, data = base_and_pairs
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    argv = ["align", "dpo", "--data", data, "--out-dir", str(docs), "--device", "cpu", "--max-steps", "1",
            "--eval-interval", "1", "--micro-batch-size", "4", "--tensorboard", "off"]  # fmt: skip
    assert main([*argv, "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {docs} is not empty and is not a dozero run folder") and err.count("\n") == 1
    assert "pass --force" in err
    with pytest.raises(DozeroError, match="is not empty and is not a dozero run folder"):
        dpo(DPOConfig(model=str(base), data=data), settings(tmp_path, out_dir=str(docs), max_steps=1), quiet=True)
    assert [p.name for p in docs.iterdir()] == ["notes.txt"]
    assert main([*argv, "--model", str(base), "--force"]) == 0
    assert (docs / "notes.txt").read_text() == "mine" and (docs / "latest" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["dpo", "reward", "rl"])
@pytest.mark.parametrize("flag", [["--parallel", "fsdp"], ["--tp-size", "2"], ["--activation-checkpointing"]])
def test_cli_refuses_sharding_flags_it_would_ignore(method, flag, capsys):
    """Alignment runs one process or plain DDP: a sharding flag is refused, not silently ignored."""
    from dozero.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["align", method, "--model", "m", "--data", "d.jsonl", *flag])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {flag[0]}" in capsys.readouterr().err


def test_self_made_pairs_take_a_clean_right_answer_and_a_wrong_one():
    """The alignment demo's pair rule on hand-made answers: chosen must be a clean right answer (the
    number alone or a short sentence ending in it), never one that the looser held-out check only
    counts right by luck ("14 is not a multiple of 39."); rejected is a wrong answer when there is one."""
    import importlib.util
    from pathlib import Path

    from dozero.align.data import pick_pair

    spec = importlib.util.spec_from_file_location(
        "make_align_demo", Path(__file__).parents[1] / "scripts/make_align_demo.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    record = {"answer": 39}
    score = lambda prompt, answer, _: demo.clean_answer(prompt, answer, record)  # noqa: E731
    scores = {
        a: score("", a, record)
        for a in ["39", "39.", "The larger number is 39.", "The answer is: 39", "14 is not a multiple of 39.",
                  "14 is 39.", "To compare 14 and 39, note 39", "39\nand more", "14 is 14.", "14", "Big numbers"]
    }  # fmt: skip
    assert list(scores.values()) == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    lucky, wrong, clean = "14 is not a multiple of 39.", "14 is 14.", "The larger number is 39."
    # The old rule (best above worst) made the lucky answer "chosen"; with min_chosen there is no pair.
    assert pick_pair("p", [lucky, wrong], score) == {"prompt": "p", "chosen": lucky, "rejected": wrong}
    assert pick_pair("p", [lucky, wrong], score, min_chosen=1.0) is None
    assert pick_pair("p", [lucky, clean, wrong], score, min_chosen=1.0) == {
        "prompt": "p",
        "chosen": clean,
        "rejected": wrong,
    }
    assert pick_pair("p", [lucky, clean], score, min_chosen=1.0) == {"prompt": "p", "chosen": clean, "rejected": lucky}
    assert pick_pair("p", [lucky, clean], score, min_chosen=1.0, max_rejected=0.0) is None  # rejected must be wrong
    assert pick_pair("p", [clean, clean + " "], score, min_chosen=1.0) is None  # all equal: nothing to learn
    broken = lambda p, a, r: float("nan") if a == wrong else (1 / 0 if a == lucky else 1.0)  # noqa: E731
    assert pick_pair("p", [wrong, lucky, clean], broken) is None  # only one answer could be scored
