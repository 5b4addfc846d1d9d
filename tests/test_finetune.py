"""Supervised fine-tuning (dozero.finetune.data, .sft): JSONL validation with line numbers, masked targets
(padding equal to the end token), exact resume of LoRA and full runs, bad input refused with nothing written."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.finetune.chat import CHATML_TEMPLATE, IM_END, add_chat_tokens
from dozero.finetune.data import IGNORE, SFTLoader, collate, read_jsonl, split, tokenize
from dozero.finetune.sft import FINETUNE_DEFAULTS, FinetuneConfig, finetune
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import gpt2

TINY = ModelConfig(vocab_size=50257, context_length=48, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True)


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def chatml():
    model = GPTModel(TINY)
    return add_chat_tokens(gpt2(), model)[0]


@pytest.fixture()
def base_and_data(tmp_path):
    torch.manual_seed(0)
    save_model(GPTModel(TINY), tmp_path / "base", tokenizer=gpt2())
    records = [chat(f"add {i} and {i}", f"{2 * i}") for i in range(12)] + [
        {"instruction": "Say hi", "input": "", "output": "hi"}
    ]
    return tmp_path / "base", write_jsonl(tmp_path / "d.jsonl", records)


# ----------------------------------------------------------------------------- data


def test_every_line_is_checked_with_its_number(tmp_path):
    good = chat("q", "a")
    robot = json.dumps({"messages": [{"role": "robot", "content": "x"}]})
    question_only = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    cases = [
        (["", json.dumps(good), "{not json"], "d.jsonl:3: not valid JSON"),
        ([json.dumps(good), robot], "d.jsonl:2: message 0 has role 'robot'"),
        ([question_only], "d.jsonl:1: no assistant message"),
        ([json.dumps({"prompt": "x", "completion": "y"})], "d.jsonl:1: neither a chat record"),
        (["[1, 2]"], "d.jsonl:1: expected a JSON object"),
        (["", "  "], "holds no records"),
    ]  # fmt: skip
    for lines, message in cases:
        path = write_jsonl(tmp_path / "d.jsonl", lines)
        with pytest.raises(DozeroError, match=message):
            read_jsonl(path)
    with pytest.raises(DozeroError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_alpaca_records_become_two_turns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "cat", "output": "gato"}])
    assert read_jsonl(path) == [
        [{"role": "user", "content": "Translate.\n\ncat"}, {"role": "assistant", "content": "gato"}]
    ]


def test_too_long_conversations_are_truncated_or_dropped_and_counted(chatml):
    long_answer = [chat("q", "word " * 60)[("messages")]]
    long_question = [chat("word " * 60, "a")["messages"]]
    short = [chat("q", "a")["messages"]]
    examples, stats = tokenize(long_answer + long_question + short, chatml, CHATML_TEMPLATE, 30)
    assert (stats.truncated, stats.dropped, len(examples)) == (1, 1, 2)  # the question alone has no answer left
    assert all(len(ids) <= 30 and sum(mask[1:]) > 0 for ids, mask in examples)
    _, stats = tokenize(long_answer + short, chatml, CHATML_TEMPLATE, 30, too_long="drop")
    assert (stats.truncated, stats.dropped) == (0, 1)
    with pytest.raises(DozeroError, match="no conversation is left"):
        tokenize(long_question, chatml, CHATML_TEMPLATE, 30)
    with pytest.raises(DozeroError, match="at least 2"):
        split(examples[:1], 0.1, 0)


def test_targets_keep_the_end_token_when_padding_shares_its_id(chatml):
    end = chatml.special_id(IM_END)
    a = tokenize([chat("Hi", "Yo")["messages"]], chatml, CHATML_TEMPLATE, 99)[0][0]
    b = tokenize([chat("A longer question here", "ok")["messages"]], chatml, CHATML_TEMPLATE, 99)[0][0]
    x, y = collate([a, b], pad_id=end)
    n = len(a[0]) - 1
    assert x.shape == y.shape == (2, len(b[0]) - 1)
    scored = [chatml.decode([t]) for t in y[0].tolist() if t != IGNORE]
    assert scored == ["Yo", IM_END]  # the answer and its end; the template's "\n" after it is not scored
    assert (x[0, n:] == end).all() and (y[0, n:] == IGNORE).all()  # padding: end's id, never a target
    assert math.isnan(F.cross_entropy(torch.zeros(2, 5), torch.full((2,), IGNORE)).item())  # all-masked: NaN, not 0


def test_loader_position_resumes_the_same_batches(chatml):
    examples, _ = tokenize([chat(f"q{i}", f"a{i}")["messages"] for i in range(7)], chatml, CHATML_TEMPLATE, 99)
    loader = SFTLoader(examples, 3, seed=1, pad_id=0)
    for _ in range(4):  # into the second epoch
        loader.next_batch()
    again = SFTLoader(examples, 3, seed=1, pad_id=0)
    again.load_state_dict(loader.state_dict())
    for _ in range(3):
        (x1, y1), (x2, y2) = loader.next_batch(), again.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert (y1 != IGNORE).any(dim=1).all()  # every row has answer tokens


# ----------------------------------------------------------------------------- runs


def settings(tmp_path, **changes):
    fields = dict(out_dir=str(tmp_path / "run"), micro_batch_size=4, max_steps=6, eval_interval=3, warmup_steps=2,
                  log_interval=1, tensorboard="off", device="cpu")  # fmt: skip
    return dataclasses.replace(FINETUNE_DEFAULTS, **{**fields, **changes})


@pytest.mark.parametrize("rank", [4, pytest.param(0, marks=pytest.mark.slow)], ids=["lora", "full"])
def test_interrupted_run_resumes_exactly(tmp_path, base_and_data, rank):
    base, data = base_and_data
    ft = FinetuneConfig(model=str(base), data=data, lora_rank=rank, lora_dropout=0.1 if rank else 0.0)
    whole = finetune(ft, settings(tmp_path / "a", lr=1e-2), quiet=True)
    first = finetune(ft, settings(tmp_path / "b", lr=1e-2, stop_after=3), quiet=True)
    assert first.stopped == "stop_after" and first.step == 3
    rest = finetune(ft, settings(tmp_path / "b", lr=1e-2), resume=first.run_dir, quiet=True)
    assert rest.step == 6
    assert {**first.losses, **rest.losses} == whole.losses  # bit-exact, dropout included
    assert whole.losses[6] < whole.losses[1]
    assert rest.best_val_loss == whole.best_val_loss
    merged = load_model(whole.run_dir)  # every checkpoint is a plain model, LoRA merged in
    assert merged.cfg.vocab_size == 50259  # <|im_start|>, <|im_end|> added
    assert (whole.run_dir / "latest" / "adapter_config.json").is_file() == bool(rank)
    config = json.loads((whole.run_dir / "latest" / "config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE and config["finetune"]["lora_rank"] == rank


def test_packed_run_trains_as_the_padded_run(tmp_path, base_and_data):
    """--batching pack computes fewer positions but the same mean loss over the same answers each step."""
    base, data = base_and_data
    losses = {}
    for batching in ("pad", "pack"):
        ft = FinetuneConfig(model=str(base), data=data, lora_rank=4, batching=batching)
        losses[batching] = finetune(ft, settings(tmp_path / batching, lr=1e-2, max_steps=4), quiet=True).losses
    assert losses["pack"].keys() == losses["pad"].keys() == {1, 2, 3, 4}
    for step, loss in losses["pad"].items():
        assert abs(losses["pack"][step] - loss) < 1e-4, (step, losses)
    assert losses["pack"][4] < losses["pack"][1]


def test_bad_settings_fail_before_anything_is_written(tmp_path, base_and_data, capsys):
    from dozero.cli import main

    base, data = base_and_data
    common = ["finetune", "--model", str(base), "--data", data, "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    for extra, message in [
        (["--lora-rank", "33"], "larger than the layer"),
        (["--lora-targets", "q_proj"], "matches no layer"),
        (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--max-length", "999"], "longer than the model's context"),
        (["--batching", "stuff"], "--batching must be 'pad' or 'pack'"),
    ]:
        assert main(common + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run_is_refused_before_the_model_loads(tmp_path, base_and_data, capsys):
    """As `dozero train`: --out-dir holding someone's files is refused (before the model is even looked
    for: the model named here does not exist) unless --force, which writes the run beside them."""
    from dozero.cli import main

    base, data = base_and_data
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    argv = ["finetune", "--data", data, "--out-dir", str(docs), "--device", "cpu", "--max-steps", "1",
            "--eval-interval", "1", "--micro-batch-size", "4", "--tensorboard", "off"]  # fmt: skip
    assert main([*argv, "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {docs} is not empty and is not a dozero run folder") and err.count("\n") == 1
    assert "pass --force" in err and [p.name for p in docs.iterdir()] == ["notes.txt"]
    assert main([*argv, "--model", str(base), "--force"]) == 0
    assert (docs / "notes.txt").read_text() == "mine" and (docs / "latest" / "model.safetensors").is_file()
