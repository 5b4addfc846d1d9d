"""`dozero chat` (dozero.finetune.talk): commands at the prompt, the history kept within the context,
Ctrl-C stopping an answer without leaving, and SmolLM2-135M-Instruct answering Paris."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.finetune.chat import CHATML_TEMPLATE, add_chat_tokens
from dozero.finetune.talk import ChatSession, repl
from dozero.generate import GenerationConfig
from dozero.model.checkpoint import save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import gpt2


@pytest.fixture(scope="module")
def tiny_chat():
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_layers=1))
    tok, model = add_chat_tokens(gpt2(), model)
    return model.eval(), tok


def run_chat(args: list[str], lines: list[str], cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dozero", "chat", *args],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def test_commands_at_the_prompt(tmp_path, tiny_chat):
    model, tok = tiny_chat
    save_model(model, tmp_path / "m", tokenizer=tok)
    lines = ["hello there", "/save conv.jsonl", "/save conv.jsonl", "/reset", "/bogus", "/save", "/quit", "unread"]
    result = run_chat(["--model", "m", "--max-new-tokens", "3", "--system", "Be brief."], lines, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[saved to conv.jsonl]" in out and "[not saved:" in out and "exists" in out
    assert "[conversation cleared]" in out and "[unknown command /bogus" in out and "[usage: /save FILE]" in out
    saved = [json.loads(line) for line in (tmp_path / "conv.jsonl").read_text().splitlines()]
    assert len(saved) == 1
    roles = [m["role"] for m in saved[0]["messages"]]
    assert roles == ["system", "user", "assistant"] and saved[0]["messages"][1]["content"] == "hello there"


def test_oldest_turns_are_dropped_to_fit_the_context(tiny_chat):
    model, tok = tiny_chat
    session = ChatSession(model, tok, CHATML_TEMPLATE, "Sys.", GenerationConfig(temperature=0.0, max_new_tokens=4))
    for n in range(6):
        "".join(session.reply(f"question number {n} with some words"))
    assert session.dropped >= 2 and session.dropped % 2 == 0
    assert session.conversation()[0] == {"role": "system", "content": "Sys."}
    assert session.messages[-2]["content"] == "question number 5 with some words"
    assert len(tok.encode(session.prompt(), special="allow")) <= 64 - 4
    with pytest.raises(DozeroError, match="does not fit the model's context"):
        session.ask("word " * 100)
    assert session.messages[-1]["role"] == "assistant"  # the refused question did not stay


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_chat):
    model, tok = tiny_chat
    session = ChatSession(model, tok, CHATML_TEMPLATE)

    def interrupted(prompt):
        try:
            yield "Par"
            raise KeyboardInterrupt
        finally:
            session.messages.append({"role": "assistant", "content": "Par"})

    session.answer = interrupted
    inputs = iter(["Capital of France?", KeyboardInterrupt, "/quit"])

    def read(_prompt):
        item = next(inputs)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    out = io.StringIO()
    assert repl(session, read, out) == 0
    assert "Par [stopped]" in out.getvalue() and "Ctrl-D or /quit leaves" in out.getvalue()
    assert session.messages == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Par"},
    ]


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(tmp_path):
    from dozero.model.gguf import resolve_gguf

    try:
        resolve_gguf("smollm2-135m-instruct")
    except DozeroError as e:
        pytest.skip(str(e))
    lines = ["What is the capital of France?", "/save c.jsonl"]
    result = run_chat(["--model", "smollm2-135m-instruct", "--max-new-tokens", "24"], lines, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    answer = json.loads((tmp_path / "c.jsonl").read_text())["messages"][-1]["content"]
    assert "Paris" in answer and "<|im_end|>" not in answer
