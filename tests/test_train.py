"""Training: the loss starts at ln(vocab) and falls, resume is exact, NaN never reaches a checkpoint,
schedules and AdamW groups are right, and the CLI goes train -> checkpoint -> generate."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil

import pytest
import torch

from dozero.cli import main
from dozero.config import get_model_config
from dozero.errors import DozeroError
from dozero.model.gpt import GPTModel
from dozero.train.config import TrainConfig, get_train_preset
from dozero.train.loop import train
from dozero.train.optim import lr_at, make_optimizer, param_groups

TINY_SHAPE = {"n_layers": 2, "emb_dim": 32, "n_heads": 2, "context_length": 16}


def tiny_config(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig(
        out_dir=str(tmp_path / "run"),
        micro_batch_size=4,
        max_steps=8,
        warmup_steps=2,
        eval_interval=4,
        eval_iters=2,
        log_interval=2,
        sample_tokens=0,
        threads=1,
        lr=3e-3,
        min_lr=3e-4,
        tensorboard="off",
    )
    return dataclasses.replace(base, **changes)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_loss_is_ln_vocab_then_falls(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=40, eval_interval=40, lr=1e-2, min_lr=1e-3, warmup_steps=5)
    result = train(cfg, TINY_SHAPE, quiet=True)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 40
    # A fresh model's logits are ~0, so every one of the 65 characters is equally likely: ln(65) = 4.17.
    assert losses[0] == pytest.approx(math.log(65), abs=0.1)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8  # it learned character frequencies at least
    assert result.val_loss is not None and result.val_loss < losses[0] - 0.8


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # Dropout and gradient accumulation on, so RNG state and loader position both matter.
    shape = {**TINY_SHAPE, "drop_rate": 0.1}
    cfg = tiny_config(tmp_path, max_steps=10, global_batch_tokens=2 * 4 * 16, eval_interval=5, keep_last=1)
    straight = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "straight")), shape, quiet=True)

    first = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "cut"), stop_after=3), shape, quiet=True)
    assert first.stopped == "stop_after" and first.step == 3
    assert sorted(first.losses) == [1, 2, 3]
    state = json.loads((tmp_path / "cut" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["loader"]["step"] == 6  # 2 micro-batches per step

    resumed = train(cfg, resume=tmp_path / "cut", quiet=True)
    assert resumed.step == 10 and sorted(resumed.losses) == list(range(4, 11))
    for s in range(1, 11):  # bit-for-bit, not approximately
        expected = straight.losses[s]
        got = first.losses[s] if s <= 3 else resumed.losses[s]
        assert got == expected, f"step {s}: {got} != {expected}"
    assert resumed.val_loss == straight.val_loss
    # metrics.jsonl of the resumed run reads as one run: each step once.
    steps = [r["step"] for r in read_metrics(tmp_path / "cut") if "loss" in r]
    assert steps == list(range(1, 11))
    # keep_last=1: only the newest numbered checkpoint remains; latest/ and best/ are there.
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_000010"]
    assert (tmp_path / "cut" / "best" / "model.safetensors").is_file()


def test_tensorboard_events_match_metrics_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    # Event files are named by second, then by a per-process counter compared as text: from 9 to 10,
    # a resume made in the run's second sorted first (seen in the full suite). dozero waits a second.
    monkeypatch.setattr(event_file_writer._global_uid, "_value", 9)
    cfg = tiny_config(tmp_path, max_steps=8, eval_interval=4, log_interval=1, tensorboard="on", keep_last=2)
    run = tmp_path / "run"
    train(dataclasses.replace(cfg, stop_after=6), TINY_SHAPE, quiet=True)  # checkpoints at steps 4 and 6
    # As after a crash at step 6 with the last checkpoint at step 4: steps 5-6 are redone on resume.
    shutil.rmtree(run / "latest")
    shutil.copytree(run / "checkpoints" / "step_000004", run / "latest")
    train(cfg, resume=run, quiet=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8]
    for name in ("loss", "lr", "val_loss", "val_perplexity", "tokens_per_second"):
        expected = [(r["step"], r[name]) for r in metrics if name in r]
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in expected], name  # each step once, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), name


def test_tensorboard_on_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(DozeroError, match="pip install tensorboard"):
        train(tiny_config(tmp_path, tensorboard="on"), TINY_SHAPE, quiet=True)
    result = train(tiny_config(tmp_path, tensorboard="auto", out_dir=str(tmp_path / "auto")), TINY_SHAPE, quiet=True)
    assert result.step == 8 and not (tmp_path / "auto" / "tensorboard").exists()


def inject_nan_at(monkeypatch, step: int) -> None:
    """Make the training loss of optimizer step `step` NaN (one micro-batch per step): the step
    module's cross-entropy is replaced; evaluation's is not."""
    import types

    import torch.nn.functional as F

    import dozero.train.step

    calls = [0]

    def cross_entropy(*args, **kwargs):
        calls[0] += 1
        loss = F.cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls[0] == step else loss

    monkeypatch.setattr(dozero.train.step, "F", types.SimpleNamespace(cross_entropy=cross_entropy))


def test_nan_loss_stops_before_any_checkpoint(tmp_path, monkeypatch):
    # Losses are read every 10 steps, the checkpoint is due at step 8, the NaN comes at step 6:
    # the loop must read the losses before it writes, and refuse.
    inject_nan_at(monkeypatch, 6)
    cfg = tiny_config(tmp_path, max_steps=12, eval_interval=8, log_interval=10)
    with pytest.raises(DozeroError, match=r"at step 6; stopped without writing a checkpoint"):
        train(cfg, TINY_SHAPE, quiet=True)
    run = tmp_path / "run"
    assert not (run / "latest").exists() and not (run / "checkpoints").exists()


def test_nan_after_a_good_checkpoint_keeps_the_good_one(tmp_path, monkeypatch):
    inject_nan_at(monkeypatch, 6)
    cfg = tiny_config(tmp_path, max_steps=12, eval_interval=4, log_interval=1)
    with pytest.raises(DozeroError, match="at step 6"):
        train(cfg, TINY_SHAPE, quiet=True)
    state = json.loads((tmp_path / "run" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000004"]


def test_on_nan_skip_skips_the_step_and_goes_on(tmp_path, monkeypatch):
    from dozero.model.checkpoint import load_model

    inject_nan_at(monkeypatch, 3)
    cfg = tiny_config(tmp_path, max_steps=6, eval_interval=6, on_nan="skip")
    result = train(cfg, TINY_SHAPE, quiet=True)
    assert result.step == 6 and 3 not in result.losses and len(result.losses) == 5
    skipped = [r for r in read_metrics(tmp_path / "run") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]
    model = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_schedules():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)  # linear warmup: (step + 1) / warmup
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    constant = dataclasses.replace(cfg, schedule="constant")
    assert lr_at(5, constant) == pytest.approx(0.6) and lr_at(100, constant) == 1.0
    wsd = dataclasses.replace(cfg, schedule="wsd", decay_fraction=0.2)  # decay over steps 88..110
    assert lr_at(87, wsd) == 1.0
    assert lr_at(99, wsd) == pytest.approx(1.0 + (11 / 22) * (0.1 - 1.0))
    assert lr_at(110, wsd) == pytest.approx(0.1)


def test_adamw_groups_decay_matrices_only():
    model = GPTModel(get_model_config("shakespeare-char"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # Every parameter is in exactly one group; the tied embedding/head matrix appears once.
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_parameters()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.99)


def test_presets_follow_their_sources():
    char = get_train_preset("shakespeare-char")  # nanoGPT's CPU run of train_shakespeare_char.py
    assert (char.micro_batch_size, char.max_steps, char.warmup_steps) == (12, 2000, 100)
    assert (char.lr, char.min_lr) == (1e-3, 1e-4)
    assert (char.schedule, char.decay_fraction) == ("wsd", 0.2)  # our one change: measured lower final loss
    assert (char.beta2, char.weight_decay, char.grad_clip, char.eval_iters) == (0.99, 0.1, 1.0, 20)
    shape = get_model_config(char.model)
    assert (shape.n_layers, shape.n_heads, shape.emb_dim, shape.context_length, shape.drop_rate) == (4, 4, 128, 64, 0.0)
    gpt2 = get_train_preset("gpt2-124m")  # GPT-3 paper table 2.1, "GPT-3 Small"
    assert gpt2.global_batch_tokens == 524_288 and gpt2.lr == 6e-4 and gpt2.beta2 == 0.95
    assert gpt2.schedule == get_train_preset("shakespeare-bpe").schedule == "cosine"
    assert gpt2.max_steps * gpt2.global_batch_tokens == pytest.approx(300e9, rel=1e-3)
    with pytest.raises(DozeroError, match="did you mean 'gpt2-124m'"):
        get_train_preset("gpt2-124")


def test_cli_train_then_generate(tmp_path, capsys):
    run = tmp_path / "cli-run"
    argv = ["train", "--out-dir", str(run), "--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2"]
    argv += ["--n-layers", "1", "--emb-dim", "32", "--n-heads", "2", "--context-length", "16"]
    argv += ["--micro-batch-size", "4", "--warmup-steps", "1", "--sample-tokens", "5", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "done: 6 steps" in out and "a sample from" in out
    for name in ("metrics.jsonl", "loss.png", "report.md", "train_config.json", "best/config.json"):
        assert (run / name).is_file(), name
    assert "validation loss" in (run / "report.md").read_text()
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model"]["n_layers"] == 1 and saved["model"]["vocab_size"] == 65
    assert main(["generate", "--model", str(run), "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert len(text.strip()) > len("ROMEO:")

    # Flags given with --resume hold for the next resume too: 6 -> 8 steps, then resume again to 8 = done.
    assert main(["train", "--resume", str(run), "--max-steps", "8", "--sample-tokens", "0"]) == 0
    assert json.loads((run / "train_config.json").read_text())["train"]["max_steps"] == 8
    assert main(["train", "--resume", str(run)]) == 2  # nothing left to do: one-line error
    assert "already ran 8 of 8 steps" in capsys.readouterr().err

    # A second run into the same --out-dir never overwrites the first.
    assert main(argv + ["--max-steps", "1", "--eval-interval", "1"]) == 0
    assert (tmp_path / "cli-run-2" / "latest" / "model.safetensors").is_file()


def test_a_folder_that_is_not_a_run_is_refused_without_force(tmp_path, capsys):
    """--out-dir naming someone's documents was written into; now it is refused (one line, nothing
    touched) unless --force, which writes the run beside the files. An empty folder is fine."""
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("three years of work")
    argv = ["train", "--max-steps", "1", "--eval-interval", "1", "--eval-iters", "1", "--sample-tokens", "0"]
    argv += ["--n-layers", "1", "--emb-dim", "16", "--n-heads", "2", "--context-length", "8", "--threads", "1"]
    argv += ["--micro-batch-size", "2", "--warmup-steps", "0", "--tensorboard", "off"]
    assert main([*argv, "--out-dir", str(docs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {docs} is not empty and is not a dozero run folder") and err.count("\n") == 1
    assert "choose another output folder, or pass --force" in err
    assert [p.name for p in docs.iterdir()] == ["thesis.txt"] and not (tmp_path / "documents-2").exists()

    assert main([*argv, "--out-dir", str(docs), "--force"]) == 0
    capsys.readouterr()
    assert (docs / "thesis.txt").read_text() == "three years of work"
    assert (docs / "train_config.json").is_file() and (docs / "latest" / "model.safetensors").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv, "--out-dir", str(empty)]) == 0
    assert (empty / "train_config.json").is_file() and not (tmp_path / "empty-2").exists()

    # A run in OUT sends the next run to OUT-2; an OUT-2 holding other files is refused the same way.
    (tmp_path / "empty-2").mkdir()
    (tmp_path / "empty-2" / "photo.jpg").write_bytes(b"\xff\xd8")
    assert main([*argv, "--out-dir", str(empty)]) == 2
    assert f"{tmp_path / 'empty-2'} is not empty and is not a dozero run folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "empty-2").iterdir()) == ["photo.jpg"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--schedule", "cosin"], "did you mean 'cosine'"),
        (["--global-batch-tokens", "1000"], "is not a multiple of micro_batch_size x context_length"),
        (["--data", "/nonexistent/corpus.txt"], "no such file or folder"),
        (["--resume", "/nonexistent/run"], "no train_config.json"),
        (["--model", "gpt3"], "is not a model shape"),
        # Accepted before: a negative global batch gave -1 accumulation steps and a "successful" run.
        (["--global-batch-tokens", "-768"], "--global-batch-tokens must be >= 0, got -768"),
        (["--lr", "-0.001"], "--lr must be > 0, got -0.001"),
        (["--lr", "nan"], "--lr must be > 0, got nan"),
        (["--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5"),
        (["--decay-fraction", "5"], "--decay-fraction must be between 0 and 1, got 5.0"),
        (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
        (["--threads", "-1"], "--threads must be >= 0, got -1"),
        (["--device", "tpu"], "--device 'tpu' is not known"),
        (["--resume", "/nonexistent/run/checkpoints/step_000002"], "no train_config.json"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, flags, message):
    assert main(["train", "--out-dir", str(tmp_path / "r"), "--max-steps", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_config_is_validated_from_python_and_refuses_unknown_keys():
    with pytest.raises(DozeroError, match="--micro-batch-size should be int, got '12'"):
        TrainConfig(micro_batch_size="12").validate()
    with pytest.raises(DozeroError, match="--compile should be bool, got 1"):
        TrainConfig(compile=1).validate()
    with pytest.raises(DozeroError, match=r"unknown keys \['learning_rate'\]; known keys are \[.*'lr'"):
        TrainConfig.from_dict({"learning_rate": 0.1})  # as ModelConfig.from_dict: refused, not ignored
    with pytest.raises(DozeroError, match="--warmup-steps must be >= 0"):
        TrainConfig.from_dict({"warmup_steps": -5})
    assert TrainConfig.from_dict(TrainConfig(lr=0.5).to_dict()) == TrainConfig(lr=0.5)


def test_a_step_too_big_for_memory_is_warned_before_it_starts(tmp_path, monkeypatch, capsys):
    from dozero import runtime

    monkeypatch.setattr(runtime, "free_memory", lambda device: 1000)
    train(tiny_config(tmp_path, max_steps=1, eval_interval=1), TINY_SHAPE, quiet=True)
    err = capsys.readouterr().err
    assert "warning: one training step needs about" in err and "has 1000 B free" in err, err
    assert err.count("warning:") == 1


def test_the_memory_warning_is_a_line_of_its_own_beside_the_progress_bar(tmp_path, monkeypatch, capsys):
    from dozero import runtime
    from dozero.cli import main

    monkeypatch.setattr(runtime, "free_memory", lambda device: 1000)
    shape = ["--n-layers", "1", "--emb-dim", "32", "--n-heads", "2", "--context-length", "16", "--threads", "1"]
    main(["train", "--out-dir", str(tmp_path / "run"), "--max-steps", "1", "--sample-tokens", "0", *shape])
    pieces = capsys.readouterr().err.replace("\r", "\n").split("\n")  # the bar redraws itself after \r
    assert any(p.startswith("warning: one training step needs about") for p in pieces), pieces
    assert not any("warning:" in p and not p.startswith("warning:") for p in pieces), pieces


def test_text_files_with_a_bpe_tokenizer(tmp_path):
    corpus = tmp_path / "plays"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be, that is the question. " * 40)
    (corpus / "b.txt").write_text("All the world's a stage, and all the men and women merely players. " * 40)
    cfg = tiny_config(tmp_path, data=str(corpus), tokenizer="gpt2", max_steps=2, eval_interval=2, micro_batch_size=2)
    result = train(cfg, TINY_SHAPE, quiet=True)
    assert result.step == 2
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["model"]["vocab_size"] == 50257
    assert result.losses[1] == pytest.approx(math.log(50257), abs=0.1)


def test_prepared_data_folder(tmp_path, capsys):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Now is the winter of our discontent made glorious summer. " * 60)
    (corpus / "b.txt").write_text("Friends, Romans, countrymen, lend me your ears. " * 60)
    prepared = tmp_path / "prepared"
    argv = ["data", "prepare", str(corpus), "--out", str(prepared), "--tokenizer", "gpt2", "--quiet"]
    assert main(argv + ["--val-fraction", "0.5", "--workers", "1"]) == 0
    cfg = tiny_config(tmp_path, data=str(prepared), max_steps=2, eval_interval=2, micro_batch_size=2)
    result = train(cfg, TINY_SHAPE, quiet=True)
    assert result.step == 2 and result.val_loss is not None
    from dozero.tokenizer import load_tokenizer

    assert load_tokenizer(tmp_path / "run" / "best").fingerprint() == load_tokenizer("gpt2").fingerprint()


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import dozero.model.checkpoint as model_checkpoint

    cfg = tiny_config(tmp_path, max_steps=8, eval_interval=4)
    train(dataclasses.replace(cfg, stop_after=4), TINY_SHAPE, quiet=True)
    run = tmp_path / "run"
    before = (run / "latest" / "model.safetensors").read_bytes()
    real_save = model_checkpoint.save_model

    def crash_after_weights(model, folder, tokenizer=None, metadata=None):
        real_save(model, folder, tokenizer, metadata)
        raise OSError(errno.ENOSPC, "No space left on device")  # as root, chmod cannot make a disk refuse

    monkeypatch.setattr(model_checkpoint, "save_model", crash_after_weights)
    # One line naming the folder and the cause, not an OSError traceback.
    with pytest.raises(DozeroError, match=r"cannot write .*run/checkpoints: No space left on device; the previous"):
        train(cfg, resume=run, quiet=True)
    # latest/ is still the step-4 checkpoint, whole; no half-written folder is left behind.
    assert json.loads((run / "latest" / "trainer_state.json").read_text())["step"] == 4
    assert (run / "latest" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004"]
    monkeypatch.setattr(model_checkpoint, "save_model", real_save)
    assert train(cfg, resume=run, quiet=True).step == 8  # and the run goes on from there


def test_runtime_precision_and_peak_flops(monkeypatch):
    from dozero import runtime

    cpu = torch.device("cpu")
    assert runtime.resolve_dtype("auto", cpu) == torch.float32
    assert runtime.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(DozeroError, match="float16 needs a GPU"):
        runtime.resolve_dtype("float16", cpu)
    with pytest.raises(DozeroError, match="not known"):
        runtime.resolve_dtype("fp8", cpu)
    assert runtime.grad_scaler(cpu, torch.bfloat16) is None  # bf16 has float32's range: no scaling
    assert (runtime.rank(), runtime.world_size(), runtime.is_main()) == (0, 1, True)
    assert runtime.peak_flops(cpu) is None
    for name, flops in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert runtime.peak_flops(torch.device("cuda", 0)) == flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA L4")
    assert runtime.peak_flops(torch.device("cuda", 0)) == 121e12
    state = runtime.rng_state()
    a = torch.rand(3)
    runtime.set_rng_state(json.loads(json.dumps(state)))  # survives JSON
    assert torch.equal(torch.rand(3), a)


def test_muon_is_torchs_muon_for_the_blocks_matrices_and_adamw_for_the_rest():
    import copy

    from dozero.train.optim import MuonAdamW, orthogonalize

    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(get_model_config("shakespeare-char"), **TINY_SHAPE))
    reference = copy.deepcopy(model)
    decay, no_decay, matrices = param_groups(model, 0.1, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].rsplit(".", 2)[-2] for p in matrices["params"]) == sorted(
        ["qkv", "out_proj", "fc", "proj"] * 2
    )
    assert [names[id(p)] for p in decay["params"]] == ["tok_emb.weight", "pos_emb.weight"]  # (the tied head)
    mine = MuonAdamW([decay, no_decay, matrices], lr=0.01, betas=(0.9, 0.99), fused=True)
    groups = param_groups(reference, 0.1, muon=True)
    adamw = torch.optim.AdamW(groups[:2], lr=0.01, betas=(0.9, 0.99), eps=1e-8, fused=True)
    muon = torch.optim.Muon(groups[2]["params"], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    x = torch.randint(0, 65, (3, 16))
    for _ in range(3):
        for m in (model, reference):
            torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        for opt in (mine, adamw, muon):
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name  # bit for bit
    # Every parameter carries AdamW's three state tensors (the layout checkpoints check).
    assert {frozenset(s) for s in mine.state.values()} == {frozenset({"step", "exp_avg", "exp_avg_sq"})}
    # The update is near-orthogonal: singular values pulled from a spread of ~30x to about 1.
    g = torch.randn(96, 32) * torch.logspace(0, 1.5, 32)
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 20
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert 0.6 < s.min() and s.max() < 1.25


def test_muon_runs_resume_exactly(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="muon", max_steps=8, eval_interval=4)
    straight = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "straight")), TINY_SHAPE, quiet=True)
    assert straight.losses[1] == pytest.approx(math.log(65), abs=0.1) and straight.losses[8] < straight.losses[1] - 0.3
    first = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "cut"), stop_after=3), TINY_SHAPE, quiet=True)
    resumed = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "cut")), resume=tmp_path / "cut", quiet=True)
    assert [first.losses[s] for s in (1, 2, 3)] + [resumed.losses[s] for s in range(4, 9)] == [
        straight.losses[s] for s in range(1, 9)
    ]
    assert resumed.val_loss == straight.val_loss
    with pytest.raises(DozeroError, match="--optimizer muon orthogonalizes whole matrices"):
        dataclasses.replace(cfg, parallel="fsdp").validate()
    with pytest.raises(DozeroError, match="did you mean 'adamw'"):
        dataclasses.replace(cfg, optimizer="adam").validate()


def test_the_fast_preset_trains_the_course_model_with_muon():
    fast, char = get_train_preset("shakespeare-char-fast"), get_train_preset("shakespeare-char")
    assert fast.model == char.model and fast.micro_batch_size == char.micro_batch_size == 12  # same model, batch
    assert (fast.optimizer, fast.max_steps, fast.lr, fast.warmup_steps) == ("muon", 600, 6e-3, 30)
    assert (fast.schedule, fast.decay_fraction, fast.eval_iters) == ("wsd", 0.4, 20)
    assert make_optimizer(GPTModel(get_model_config(fast.model)), fast, torch.device("cpu")).__class__.__name__ == (
        "MuonAdamW"
    )


def test_a_resume_takes_its_own_betas_and_weight_decay(tmp_path):
    """`dozero train --resume RUN --beta2 0.5 --weight-decay 0.3`: the optimizer continues from the saved
    moments with the new settings (train_config.json records them); the checkpoint's own groups used to
    put back the old ones (0.99 and 0.1) silently."""
    from dozero.model.checkpoint import load_model
    from dozero.train.checkpoint import load_trainer_state
    from dozero.train.optimizer_files import optimizer_to_files

    cfg = tiny_config(tmp_path, stop_after=3)
    train(cfg, TINY_SHAPE, quiet=True)
    latest = tmp_path / "run" / "latest"
    model = load_model(latest).train()
    changed = dataclasses.replace(cfg, beta2=0.5, weight_decay=0.3)
    optimizer = make_optimizer(model, changed, torch.device("cpu"))
    load_trainer_state(latest, optimizer, model)
    assert [tuple(g["betas"]) for g in optimizer.param_groups] == [(cfg.beta1, 0.5)] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
    moments, _ = optimizer_to_files(optimizer)  # the saved moments (a fresh optimizer has none)
    assert moments and all(v.abs().sum() > 0 for k, v in moments.items() if k.endswith("exp_avg"))
