"""Training checkpoints: verified on load (sha256), latest/ independent of checkpoints/, resume from
any checkpoint exactly, an optimizer state of another shape refused, and every damaged or foreign
file a one-line error instead of a traceback or a NaN later."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from dozero.cli import main
from dozero.errors import DozeroError
from dozero.train.loop import train
from test_train import TINY_SHAPE, read_metrics, tiny_config


def flip_bytes(path, at: float = 0.6) -> None:
    """Invert 8 bytes inside the tensor data (past the header), as a bad disk or copy would."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run stopped at step 4 with checkpoints at steps 2 and 4, and the uninterrupted run's losses."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tmp, max_steps=8, eval_interval=2, keep_last=0, log_interval=1)
    straight = train(dataclasses.replace(cfg, out_dir=str(tmp / "straight")), TINY_SHAPE, quiet=True)
    train(dataclasses.replace(cfg, stop_after=4), TINY_SHAPE, quiet=True)
    return cfg, tmp / "run", straight.losses


def copy_run(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_files_have_sha256_and_latest_is_not_a_hard_link(four_steps):
    _, run, _ = four_steps
    sums = json.loads((run / "latest" / "checksums.json").read_text())
    assert sums["step"] == 4
    assert set(sums["sha256"]) >= {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"}
    for name in sums["sha256"]:
        latest, numbered = run / "latest" / name, run / "checkpoints" / "step_000004" / name
        assert latest.read_bytes() == numbered.read_bytes()
        assert latest.stat().st_ino != numbered.stat().st_ino, name  # separate bytes on disk


def test_damaged_latest_resumes_from_its_intact_copy_exactly(four_steps, tmp_path, capsys):
    cfg, run, straight = four_steps
    run = copy_run(run, tmp_path)
    flip_bytes(run / "latest" / "model.safetensors")
    resumed = train(dataclasses.replace(cfg, out_dir=str(run)), resume=run, quiet=True)
    err = capsys.readouterr().err
    assert f"{run / 'latest'} is damaged: model.safetensors does not match its sha256" in err
    assert "resuming from its intact copy" in err and "step_000004" in err
    assert [resumed.losses[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]


def test_damaged_checkpoints_are_one_line_errors_naming_the_older_ones(four_steps, tmp_path, capsys):
    from dozero.model.checkpoint import load_model

    _, run, _ = four_steps
    run = copy_run(run, tmp_path)
    flip_bytes(run / "latest" / "model.safetensors")
    flip_bytes(run / "checkpoints" / "step_000004" / "model.safetensors")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {run / 'latest'} is damaged: model.safetensors does not match its sha256" in err
    assert (
        f"older checkpoints: step_000002; resume from one with --resume {run}/checkpoints/step_000002" in err
    )  # not step_000004: latest/'s own step, damaged too
    # Loading the model for generation is checked too: an error, not NaN logits.
    with pytest.raises(DozeroError, match="latest is damaged: model.safetensors"):
        load_model(run / "latest")
    # Asking for the damaged numbered one names the older one.
    with pytest.raises(DozeroError, match=r"step_000004 is damaged.*older checkpoints: step_000002"):
        train(tiny_config(tmp_path), resume=run / "checkpoints" / "step_000004", quiet=True)


def test_resume_from_an_older_checkpoint_repeats_the_run_from_there(four_steps, tmp_path, capsys):
    cfg, run, straight = four_steps
    run = copy_run(run, tmp_path)
    assert main(["train", "--resume", str(run), "--sample-tokens", "0"]) == 0  # to step 8
    capsys.readouterr()
    # Back to step 2: the losses of steps 3-8 come again, bit for bit.
    # (The run was cut with stop_after=4: that stopped its first session only, not this resume.)
    assert main(["train", "--resume", str(run / "checkpoints" / "step_000002"), "--sample-tokens", "0"]) == 0
    err = capsys.readouterr().err
    assert "later checkpoints renamed abandoned_step_000004, abandoned_step_000006, abandoned_step_000008" in err
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(losses) == list(range(1, 9))  # each step once: the abandoned lines were dropped
    assert [losses[s] for s in range(3, 9)] == [straight[s] for s in range(3, 9)]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["abandoned_step_000004", "abandoned_step_000006", "abandoned_step_000008"] + [
        "step_000002",
        "step_000004",
        "step_000006",
        "step_000008",
    ]
    assert "--resume PATH" in _train_help() and "checkpoints/step_" in _train_help()


def _train_help() -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["train", "--help"])
    return " ".join(out.getvalue().split())


def _optimizer_for(emb_dim: int):
    from dozero.config import ModelConfig
    from dozero.model.gpt import GPTModel
    from dozero.train.config import TrainConfig
    from dozero.train.optim import make_optimizer

    cfg = ModelConfig(**{**TINY_SHAPE, "emb_dim": emb_dim, "vocab_size": 65})
    return make_optimizer(GPTModel(cfg), TrainConfig(), torch.device("cpu"))


@pytest.mark.parametrize("emb_dim", [48, 16])  # a larger state trained on silently; a smaller one crashed
def test_optimizer_state_of_another_shape_is_refused(four_steps, emb_dim):
    from dozero.train.checkpoint import load_trainer_state

    _, run, _ = four_steps
    with pytest.raises(DozeroError, match=r"optimizer.safetensors: '0.exp_avg' is \(65, 32\).*another model shape"):
        load_trainer_state(run / "latest", _optimizer_for(emb_dim))
    optimizer = _optimizer_for(32)
    load_trainer_state(run / "latest", optimizer)  # the right shape loads
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].shape == (65, 32)


def test_optimizer_groups_of_another_count_are_refused(four_steps, tmp_path):
    from dozero.train.checkpoint import TRAINER_STATE, load_trainer_state

    _, run, _ = four_steps
    run = copy_run(run, tmp_path)
    path = run / "latest" / TRAINER_STATE
    state = json.loads(path.read_text())
    state["optimizer_param_groups"] = state["optimizer_param_groups"][:1]
    path.write_text(json.dumps(state))
    with pytest.raises(DozeroError, match=r"parameter groups of sizes \[\d+\], but this model's optimizer has"):
        load_trainer_state(run / "latest", _optimizer_for(32))


def test_bad_optimizer_header_is_one_line(four_steps, tmp_path, capsys):
    _, run, _ = four_steps
    run = copy_run(run, tmp_path)
    for folder in (run / "latest", run / "checkpoints" / "step_000004"):
        (folder / "optimizer.safetensors").write_bytes(b"\xff" * 64)
        (folder / "checksums.json").unlink()  # as a checkpoint written before checksums were kept
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "optimizer.safetensors is truncated or corrupt" in err and "Traceback" not in err


def test_nan_in_a_checkpoint_is_reported_at_resume(four_steps, tmp_path):
    from safetensors.torch import load_file, save_file

    _, run, _ = four_steps
    run = copy_run(run, tmp_path)
    path = run / "checkpoints" / "step_000004" / "optimizer.safetensors"
    tensors = load_file(str(path))
    tensors["0.exp_avg"][0, 0] = float("nan")  # written that way: the checksums cannot tell
    save_file(tensors, str(path))
    (path.parent / "checksums.json").unlink()
    with pytest.raises(DozeroError, match=r"step_000004: optimizer 0.exp_avg holds NaN or inf values"):
        train(tiny_config(tmp_path), resume=path.parent, quiet=True)


def test_run_folder_with_another_model_shape_is_one_line(four_steps, tmp_path):
    _, run, _ = four_steps
    run = copy_run(run, tmp_path)
    path = run / "train_config.json"
    saved = json.loads(path.read_text())
    saved["model"]["n_layers"] = 3
    path.write_text(json.dumps(saved))
    with pytest.raises(DozeroError, match=r"holds another model shape than .*train_config.json \(n_layers differ\)"):
        train(tiny_config(tmp_path), resume=run, quiet=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text[:-20], "is not valid JSON"),
        (lambda text: text.replace('"lr": 0.003', '"lr": "fast"'), "--lr should be float, got 'fast'"),
        (lambda text: text.replace('"lr": 0.003', '"lr": -1'), "--lr must be > 0, got -1"),
        (lambda text: text.replace('"lr": 0.003', '"speed": 3'), "unknown keys ['speed']; known keys are"),
        (lambda text: text.replace('"train"', '"training"'), "no 'train' object"),
        (lambda text: text.replace('"n_layers": 2', '"n_layers": "two"'), "'n_layers' should be int"),
    ],
)
def test_broken_train_config_json_is_one_line(four_steps, tmp_path, capsys, edit, message):
    _, run, _ = four_steps
    run = copy_run(run, tmp_path)
    path = run / "train_config.json"
    path.write_text(edit(path.read_text()))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1, err


def test_retired_test_hook_in_an_old_train_config_is_dropped():
    from dozero.train.config import TrainConfig

    assert TrainConfig.from_dict({"lr": 0.01, "inject_nan_at": 0}).lr == 0.01


def test_torn_last_line_of_metrics_is_dropped_on_resume(four_steps, tmp_path):
    cfg, run, straight = four_steps
    run = copy_run(run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.')  # kill -9 in the middle of a line
    resumed = train(dataclasses.replace(cfg, out_dir=str(run)), resume=run, quiet=True)
    assert resumed.step == 8
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 9))
    # A damaged line before the last cannot be redone: an error naming the line.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-3]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DozeroError, match=r"metrics.jsonl, line 3, is not JSON"):
        train(dataclasses.replace(cfg, out_dir=str(run), max_steps=9), resume=run / "checkpoints/step_000004")


def test_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    import errno

    import dozero.train.observe as observe

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(observe, "open", full_disk, raising=False)  # as root, chmod does not stop writes
    with pytest.raises(DozeroError, match=r"cannot write .*run/metrics.jsonl: No space left on device"):
        train(tiny_config(tmp_path), TINY_SHAPE, quiet=True)


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/hostname"])
def test_checksums_naming_a_file_outside_the_folder_are_refused(tmp_path, name):
    """checksums.json is read from the folder like any file: a name outside it is damage, never hashed."""
    from dozero.model.checkpoint import verify_checksums

    (tmp_path / "secret.txt").write_text("x")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checksums.json").write_text(json.dumps({"sha256": {name: "0" * 64}}))
    with pytest.raises(DozeroError, match=f"names '{name}', outside the folder"):
        verify_checksums(tmp_path / "ckpt")


def test_a_save_killed_half_way_is_swept_by_the_next_save(four_steps, tmp_path):
    """kill -9 in the middle of writing a checkpoint leaves its temporary folder; the next save in that
    folder removes it (before: a hidden .step_N.* folder per kill, as large as a checkpoint, forever)."""
    import os
    import subprocess
    import sys

    from dozero.files import FILE_MODE, FOLDER_MODE

    cfg, run, _ = four_steps
    run = copy_run(run, tmp_path)
    die_while_writing = (
        "import os, signal, sys; from pathlib import Path; from dozero.train.checkpoint import _write_folder; "
        "_write_folder(Path(sys.argv[1]), lambda tmp: ((tmp / 'model.safetensors').write_bytes(b'half'), "
        "os.kill(os.getpid(), signal.SIGKILL)))"
    )
    done = subprocess.run([sys.executable, "-c", die_while_writing, str(run / "checkpoints" / "step_000005")])
    assert done.returncode == -9
    hidden = lambda: [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # noqa: E731
    assert len(hidden()) == 1  # the killed save's temporary folder

    train(dataclasses.replace(cfg, max_steps=6), TINY_SHAPE, resume=run, quiet=True)
    assert hidden() == []
    assert (run / "checkpoints" / "step_000006").is_dir()
    # Shared like any folder and file a user makes, not private to the writer.
    assert (run / "checkpoints" / "step_000006").stat().st_mode & 0o777 == FOLDER_MODE
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        assert (run / "latest" / name).stat().st_mode & 0o777 == FILE_MODE, name
    assert os.listdir(run / "latest")


def test_a_damaged_checkpoint_names_only_older_ones_as_older(tmp_path):
    """Issue 11: a damaged step_000133 listed step_000135, step_000134 as its "older checkpoints"."""
    from dozero.train.checkpoint import TRAINER_STATE, find_resume_point

    for step in (2, 4, 6, 8):  # a trainer state alone: listed as checkpoints, each one not whole (damaged)
        folder = tmp_path / "run" / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / TRAINER_STATE).write_text("{}")
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(DozeroError) as caught:
        find_resume_point(checkpoints / "step_000006")
    assert str(caught.value).endswith(
        f"older checkpoints: step_000004, step_000002; resume from one with --resume {checkpoints / 'step_000004'}"
    )
    with pytest.raises(DozeroError) as caught:  # the oldest: none older, so the later ones (the nearest to resume from)
        find_resume_point(checkpoints / "step_000002")
    assert str(caught.value).endswith(
        "no older checkpoint; later ones: step_000008, step_000006, step_000004; "
        f"resume from one with --resume {checkpoints / 'step_000004'}"
    )
