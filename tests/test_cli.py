"""`dozero.cli.main`: user errors and the disk's and paths' errors print one line and exit 2;
--debug shows the traceback; unexpected errors stay tracebacks."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from dozero.cli import main
from dozero.config import ModelConfig
from dozero.model.checkpoint import save_model
from dozero.model.gpt import GPTModel


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    return err


def failing_with(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc, fragments",
    [
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/out"), ["/mnt/ro/out", "read-only", "writable disk"]),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/model.safetensors"),
         ["runs/x/model.safetensors", "No space left", "free some space"]),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/etc/x"), ["/etc/x", "Permission denied"]),
        (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "out/"), ["out/", "path of a file"]),
        (NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "a.txt/b"), ["a.txt/b", "another path"]),
        # os.replace(tmp, target): the target is what the user named
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "out/.config.json.x.tmp", None, "out/config.json"),
         ["out/config.json"]),
    ],
)  # fmt: skip
def test_expected_os_errors_are_one_line(monkeypatch, capsys, exc, fragments):
    monkeypatch.setattr("dozero.model.commands.run_info", failing_with(exc))
    err = one_line_error(capsys, ["model", "info", "gpt2"])
    for fragment in fragments:
        assert fragment.lower() in err.lower(), err
    assert ".tmp" not in err


def test_debug_shows_the_os_error_traceback(monkeypatch):
    exc = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/out")
    monkeypatch.setattr("dozero.model.commands.run_info", failing_with(exc))
    with pytest.raises(OSError, match="Read-only"):
        main(["model", "info", "gpt2", "--debug"])


def test_unexpected_os_error_stays_a_traceback(monkeypatch):
    """An I/O error of the device is not something a message can advise on: the traceback stays."""
    monkeypatch.setattr("dozero.model.commands.run_info", failing_with(OSError(errno.EIO, "I/O error", "/x")))
    with pytest.raises(OSError, match="I/O error"):
        main(["model", "info", "gpt2"])


def test_output_path_under_an_existing_file(tmp_path, capsys):
    """A real case: `model convert` told to write its folder inside what is a file (the system's
    NotADirectoryError, deep inside mkdir)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, context_length=8, emb_dim=8, n_heads=2, n_layers=1)
    src = save_model(GPTModel(cfg), tmp_path / "src")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    dst = notes / "hf"
    err = one_line_error(capsys, ["model", "convert", str(src), str(dst), "--to", "hf"])
    assert str(dst) in err and "Not a directory" in err and "a folder is needed" in err
    assert notes.read_text() == "my notes"  # nothing lost
