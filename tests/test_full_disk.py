"""A full disk while dozero writes an output (issue #11): one line `error: <the output's path>: No space left
on device; ...`, exit 2, no traceback, and nothing left behind that was not there before.

A real full disk needs root (a small tmpfs); these tests make one the way a full disk behaves instead:
`write()` fails with ENOSPC and *no file name* (the system call has none to give), and safetensors' Rust
writer fails with its own error type and the errno in its text, as it does on a full disk.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest
import torch

from dozero.cli import main
from dozero.config import ModelConfig
from dozero.errors import naming_os_errors, os_error_message
from dozero.files import removed_if_failed
from dozero.model.checkpoint import _as_os_error, save_model
from dozero.model.gpt import GPTModel

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


class _FullDiskFile:
    """A file opened for writing on a full disk: opening works, every write fails as write(2) does."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no filename: write(2) has none

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder standing for a full disk: files opened for writing anywhere below it cannot be written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    real_open = builtins.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        on_disk = isinstance(file, (str, os.PathLike)) and Path(file).absolute().is_relative_to(disk)
        return _FullDiskFile(f) if on_disk and any(c in mode for c in "wax+") else f

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(io, "open", open_on_full_disk)  # pathlib's write_bytes / write_text open with io.open
    return disk


def assert_full_disk_error(capsys, argv, path: Path):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    last = err.splitlines()[-1]  # (after the progress bars)
    assert last.startswith("error: ") and err.count("error") == 1, err  # one line
    assert "Traceback" not in out + err
    assert "No space left on device" in last and "free some space" in last, err
    assert last.startswith(f"error: {path}"), err  # names the output, not "(no path given)" nor a temporary


def leftovers(disk: Path) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(TEXT)
    return path


def test_tokenizer_train_on_a_full_disk(capsys, corpus, full_disk):
    out = full_disk / "tok"
    assert_full_disk_error(capsys, ["tokenizer", "train", corpus, "--vocab-size", "270", "--out", out], out)
    assert leftovers(full_disk) == []  # the folder it created for --out is gone


def test_tokenizer_train_keeps_a_folder_that_was_there(capsys, corpus, full_disk):
    out = full_disk / "tok"
    out.mkdir()
    assert_full_disk_error(capsys, ["tokenizer", "train", corpus, "--vocab-size", "270", "--out", out], out)
    assert leftovers(full_disk) == ["tok"]  # the user's (empty) folder stays, and holds nothing new


def test_data_prepare_on_a_full_disk(capsys, corpus, full_disk):
    out = full_disk / "new" / "data"  # its parent does not exist either
    assert_full_disk_error(capsys, ["data", "prepare", corpus, "--out", out, "--quiet"], out)
    assert leftovers(full_disk) == []


@pytest.fixture
def small_model(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=1)
    return save_model(GPTModel(cfg), tmp_path / "small")


# What safetensors 0.8 raised on a real full disk (a 300 KiB tmpfs): its own error type, the errno in the text.
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture
def safetensors_on_full_disk(monkeypatch):
    """safetensors' writer failing as it does on a full disk. (Not by writing to /dev/full: safetensors writes
    a temporary beside the target and renames it over the target, which would replace the device.)"""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("to", ["hf", "dozero"])
def test_model_convert_on_a_full_disk(capsys, tmp_path, small_model, safetensors_on_full_disk, to):
    dst = tmp_path / "disk" / "converted"
    assert_full_disk_error(capsys, ["model", "convert", small_model, dst, "--to", to], dst / "model.safetensors")
    assert not (tmp_path / "disk").exists()  # both folders it created for DST are gone


def test_model_convert_keeps_a_folder_that_was_there(capsys, tmp_path, small_model, safetensors_on_full_disk):
    dst = tmp_path / "converted"
    dst.mkdir()
    assert_full_disk_error(capsys, ["model", "convert", small_model, dst, "--to", "hf"], dst / "model.safetensors")
    assert dst.is_dir() and list(dst.iterdir()) == []


@pytest.fixture
def char_model(tmp_path):
    from dozero.tokenizer.char import CharTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=1)
    return save_model(GPTModel(cfg), tmp_path / "char", tokenizer=CharTokenizer.from_text(TEXT))


@pytest.mark.parametrize(
    "command", [["quantize", "--to", "int8"], ["prune", "--method", "magnitude", "--sparsity", "0.5"]]
)
def test_compress_on_a_full_disk(capsys, tmp_path, char_model, safetensors_on_full_disk, command):
    """Every model writer (save_model, save_quantized) removes the folders it made when a write fails."""
    dst = tmp_path / "disk" / "out"
    argv = ["compress", command[0], "--model", char_model, "--out", dst, *command[1:]]
    assert_full_disk_error(capsys, argv, dst / "model.safetensors")
    assert not (tmp_path / "disk").exists()


def test_safetensors_own_error_becomes_the_os_error_it_reports(tmp_path):
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    e = _as_os_error(SafetensorError(SAFETENSORS_FULL), tmp_path / "w.safetensors")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename == str(tmp_path / "w.safetensors")
    (tmp_path / "a_file").touch()
    with pytest.raises(SafetensorError) as caught:  # the real library's text for a real OS error
        save_file({"x": torch.zeros(4)}, str(tmp_path / "a_file" / "w.safetensors"))
    e = _as_os_error(caught.value, tmp_path / "a_file" / "w.safetensors")
    assert (
        isinstance(e, OSError) and e.errno == errno.ENOTDIR and e.filename == str(tmp_path / "a_file" / "w.safetensors")
    )
    other = SafetensorError("some other failure")  # no errno in it: a bug, kept as it is
    assert _as_os_error(other, "w") is other


def test_naming_os_errors_keeps_a_path_the_system_gave():
    with pytest.raises(OSError) as caught, naming_os_errors("/out", temporary="/out.tmp"):
        raise OSError(errno.EACCES, "Permission denied", "/input.txt")
    assert os_error_message(caught.value).startswith("/input.txt: ")
    with pytest.raises(OSError) as caught, naming_os_errors("/out", temporary="/out.tmp"):
        raise OSError(errno.ENOSPC, "No space left on device", "/out.tmp/shard_0.bin")
    assert os_error_message(caught.value).startswith("/out: ")


def test_removed_if_failed_removes_only_what_it_created(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(KeyboardInterrupt), removed_if_failed(kept / "a" / "b"):
        (kept / "a" / "b").mkdir(parents=True)
        (kept / "a" / "b" / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert kept.is_dir() and list(kept.iterdir()) == []
    with removed_if_failed(kept / "ok"):  # success: everything stays
        (kept / "ok").mkdir()
    assert (kept / "ok").is_dir()


@pytest.mark.parametrize("failing", ["model", "optimizer"])
def test_train_on_a_full_disk_at_the_first_save_promises_no_checkpoint(tmp_path, monkeypatch, failing):
    """Issue 11: the first save's failure said "the previous checkpoints are intact ... --resume the run",
    with no checkpoint to resume from (--resume then says "no checkpoint found"); and the optimizer's file,
    written with safetensors directly, failed with safetensors' own error: a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    import dozero.model.checkpoint as model_checkpoint
    from dozero.errors import DozeroError
    from dozero.train.loop import train
    from test_train import TINY_SHAPE, tiny_config

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save_file = safetensors.torch.save_file

    def optimizer_on_full_disk(tensors, path, **kwargs):  # the model's weights fit, the optimizer's do not
        if "optimizer.safetensors" in str(path):
            raise SafetensorError(SAFETENSORS_FULL)
        real_save_file(tensors, path, **kwargs)

    if failing == "model":
        monkeypatch.setattr(model_checkpoint, "save_model", full)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", optimizer_on_full_disk)
    with pytest.raises(DozeroError) as caught:
        train(tiny_config(tmp_path, max_steps=2, eval_interval=2), TINY_SHAPE, quiet=True)
    message = str(caught.value)
    assert message.startswith(f"cannot write {tmp_path / 'run' / 'checkpoints'}: No space left on device; "), message
    assert "no checkpoint is saved yet; free some space, then run the same command again" in message, message
    assert message.endswith(f"(remove {tmp_path / 'run'} first to keep its name)"), message
    assert "intact" not in message and "--resume" not in message
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # no half-written checkpoint


def test_model_convert_to_gguf_on_a_full_disk(capsys, tmp_path, monkeypatch):
    """gguf's writer writes with numpy's `tofile`, which reports a full disk as OSError("N requested and 0
    written") with no errno (a traceback before); dozero asks the system why (posix_fallocate: ENOSPC)."""
    import gguf

    from test_gguf import GPT2_SHAPE, perturbed, small_tokenizer

    src = save_model(perturbed(ModelConfig(**GPT2_SHAPE)), tmp_path / "src", tokenizer=small_tokenizer())

    def numpy_short_write(self, *args, **kwargs):
        raise OSError("65536 requested and 0 written")  # numpy's words for a failed fwrite

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", numpy_short_write)
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    dst = tmp_path / "disk" / "m.gguf"
    assert_full_disk_error(capsys, ["model", "convert", src, dst, "--to", "gguf"], dst)
    assert not (tmp_path / "disk").exists()


def test_data_prepare_on_a_read_only_disk_names_out_not_its_temporary(capsys, corpus, tmp_path, monkeypatch):
    import dozero.files

    out = tmp_path / "data"

    def read_only(prefix, suffix, dir):  # what mkdtemp raises there: the temporary's own name
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}abcdefgh{suffix}"))

    monkeypatch.setattr(dozero.files.tempfile, "mkdtemp", read_only)
    assert main(["data", "prepare", str(corpus), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out}: Read-only file system; write to a folder on a writable disk\n"


@pytest.mark.parametrize(
    "code, remedy",
    [
        (errno.ENOSPC, "free some space"),
        (errno.EROFS, "choose a folder on a disk that is not read-only"),
        (errno.EACCES, "fix the permissions"),
    ],
)
def test_a_failed_training_write_says_what_to_do_about_its_cause(tmp_path, code, remedy):
    from dozero.train.observe import disk_error

    (tmp_path / "run" / "latest").mkdir(parents=True)
    e = disk_error(OSError(code, os.strerror(code)), tmp_path / "run" / "metrics.jsonl", run_dir=tmp_path / "run")
    assert (
        str(e)
        == f"cannot write {tmp_path / 'run' / 'metrics.jsonl'}: {os.strerror(code)}; {remedy}, then --resume the run"
    )
