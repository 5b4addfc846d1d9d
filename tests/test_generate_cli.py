"""`dozero generate` end to end on a tiny saved model: same text as the Python API, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dozero.cli import main
from dozero.config import ModelConfig
from dozero.generate import generate
from dozero.model.gpt import GPTModel
from dozero.tokenizer import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny dozero model folder with its character tokenizer, and the two objects themselves."""
    from dozero.model.checkpoint import save_model

    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    model = GPTModel(cfg).eval()
    folder = tmp_path_factory.mktemp("model")
    save_model(model, folder, tokenizer=tokenizer)
    return folder, model, tokenizer


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_prompt_and_the_api_continuation(saved, capsys):
    folder, model, tokenizer = saved
    args = ["--model", folder, "Speak", "--max-new-tokens", 25, "--seed", 3, "--temperature", 1.0, "--top-k", 0]
    code, out, _ = run_cli(capsys, *args, "--no-stream")
    assert code == 0
    expected = generate(model, tokenizer, "Speak", max_new_tokens=25, seed=3, temperature=1.0, top_k=None)
    assert out == "Speak" + expected + "\n"
    code, streamed, _ = run_cli(capsys, *args, "--stream")
    assert (code, streamed) == (0, out)


def test_cli_several_samples_and_stop(saved, capsys):
    folder, model, tokenizer = saved
    code, out, _ = run_cli(capsys, "--model", folder, "", "--num-samples", 3, "--seed", 1, "--max-new-tokens", 20)
    assert code == 0 and out.count("sample ") == 2
    samples = generate(model, tokenizer, [""] * 3, seed=1, max_new_tokens=20)
    assert out == "".join(f"\n{'-' * 40} sample {i + 1}\n" * (i > 0) + s for i, s in enumerate(samples)) + "\n"
    # --stop "\n" typed in a shell is a backslash and an n: it means a newline.
    code, out, _ = run_cli(capsys, "--model", folder, "All", "--seed", 2, "--max-new-tokens", 30, "--stop", "\\n")
    assert out == "All" + generate(model, tokenizer, "All", seed=2, max_new_tokens=30, stop="\n") + "\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "error: temperature must be >= 0"),
        (["--top-p", "0"], "error: top_p must be in (0, 1]"),
        (["--top-k", "-2"], "error: top_k must be >= 1"),
        (["--max-new-tokens", "-1"], "error: max_new_tokens must be >= 0"),
        (["--stop", ""], "error: stop strings must be non-empty"),
        (["--num-samples", "0"], "error: --num-samples must be >= 1"),
        (["--temperature", "nan"], "error: temperature must be a finite number, got nan"),
        (["--top-p", "nan"], "error: top_p must be a finite number"),
        (["--repetition-penalty", "inf"], "error: repetition_penalty must be a finite number, got inf"),
        (["--frequency-penalty", "nan"], "error: frequency_penalty must be a finite number"),
    ],
)
def test_cli_bad_flags_are_one_line_errors(saved, capsys, flags, message):
    code, out, err = run_cli(capsys, "--model", saved[0], "hi", *flags)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1 and out == ""


def test_cli_missing_model_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", tmp_path / "nope", "hi")
    assert code == 2 and "not found" in err


def test_cli_in_a_real_process(saved):
    """The installed entry point, output not a terminal: no streaming, same text."""
    folder, model, tokenizer = saved
    result = subprocess.run(
        [sys.executable, "-m", "dozero", "generate", "--model", str(folder), "All:", "--seed", "4", "--max-new-tokens",
         "15"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "All:" + generate(model, tokenizer, "All:", seed=4, max_new_tokens=15) + "\n"


def test_cli_warns_in_one_line_when_the_window_slides(saved, capsys):
    code, out, err = run_cli(capsys, "--model", saved[0], "All", "--max-new-tokens", 40, "--seed", 0, "--no-stream")
    assert code == 0 and len(out) == len("All") + 40 + 1
    assert err.strip().startswith("[warning: generation reached the context length (32 tokens)")
    assert "UserWarning" not in err


def test_cli_tokenizer_flag_for_a_folder_without_one(saved, tmp_path, capsys):
    """A model folder with weights only (common for Hugging Face downloads): the error advises
    --tokenizer, and --tokenizer gives the same text as the API with that tokenizer."""
    from dozero.model.checkpoint import save_model

    folder, model, tokenizer = saved
    weights_only = save_model(model, tmp_path / "weights-only")
    code, out, err = run_cli(capsys, "--model", weights_only, "All")
    assert code == 2 and err.startswith("error: no tokenizer files in") and "use --tokenizer gpt2" in err
    code, out, _ = run_cli(capsys, "--model", weights_only, "--tokenizer", folder, "All", "--seed", 5,
                           "--max-new-tokens", 12)  # fmt: skip
    assert (code, out) == (0, "All" + generate(model, tokenizer, "All", seed=5, max_new_tokens=12) + "\n")


def test_cli_tokenizer_larger_than_the_model(saved, capsys):
    folder, model, _ = saved
    code, out, err = run_cli(capsys, "--model", folder, "--tokenizer", "gpt2", "Hello")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"tokenizer has 50,257 tokens but the model in {folder} has only {model.cfg.vocab_size} (its vocab" in err


def test_cli_streams_into_a_pipe_before_it_ends(saved):
    """Output into a pipe (`| tee`, a script) arrives while generating, not only at the end: the first
    generated text is read while the process still runs."""
    import os
    import select

    folder, *_ = saved
    command = [sys.executable, "-m", "dozero", "generate", "--model", str(folder), "All:", "--seed", "1",
               "--max-new-tokens", "1000000"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    received = b""
    try:
        for _ in range(240):  # at most 2 minutes: importing torch on a busy machine
            if select.select([proc.stdout], [], [], 0.5)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                received += chunk
                if len(received) > len("All:") + 5:
                    break
        still_running = proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert received.startswith(b"All:") and len(received) > len("All:") + 5, received
    assert still_running  # a million tokens take many minutes: the text came while it ran


def test_cli_into_a_pipe_closed_early(saved):
    """`dozero generate ... | head -c 10`: the reader leaves; dozero ends quietly (no BrokenPipeError
    traceback), with the status a shell gives a process ended by SIGPIPE."""
    folder, *_ = saved
    command = [sys.executable, "-m", "dozero", "generate", "--model", str(folder), "All:", "--seed", "1",
               "--max-new-tokens", "1000000"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(10).startswith(b"All:")
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()
