"""Sharded checkpoints (torch.distributed.checkpoint): written by every rank, resumed on another number
of ranks, read as a model folder; bad input is one line.

The torchrun runs use the gloo backend on CPU, tiny models, a few steps."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dozero.model.sharded import SHARDS_DIR, _join_segments

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel import TINY, _env, _losses, _run  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# Measured: the losses of 6 steps moved 4 -> 2 -> 1 processes agree with an unmoved run within 5e-7
# (float32; FSDP's reduce-scatter sums in another order than one process's backward).
TOLERANCE = 1e-5


def _torchrun(n: int, port: int, args: list[str]) -> str:
    import subprocess

    cmd = [*TORCHRUN, f"--nproc_per_node={n}", f"--master_port={port}", "-m", "dozero", "train", *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / SHARDS_DIR).iterdir())


@pytest.mark.slow  # ~90 s on 2 cores: 4 + 2 + 1 + 1 processes
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_run_saved_on_4_ranks_resumes_on_2_then_1_as_if_it_had_not_moved(tmp_path, capsys):
    """GPT-2 blocks: 4 FSDP ranks x 2 sequences -> 2 tensor-parallel ranks (both read the same 8) -> 1
    process x 8 take the same steps as 1 process x 8 from the start."""
    from dozero.cli import main

    common = [*TINY, "--eval-interval", "2", "--max-steps", "6"]
    moved = tmp_path / "moved"
    _torchrun(
        4,
        29631,
        ["--out-dir", str(moved), "--micro-batch-size", "2", "--parallel", "fsdp", "--stop-after", "2", *common],
    )
    tp = ["--micro-batch-size", "8", "--parallel", "tp", "--stop-after", "4", "--sample-tokens", "8"]
    _torchrun(2, 29632, ["--resume", str(moved), *tp])
    step2, step4 = (moved / "checkpoints" / f"step_00000{s}" for s in (2, 4))
    assert len(_shards(step2)) == 4 and len(_shards(step4)) == 2  # one file per rank, no model.safetensors
    assert not (step4 / "model.safetensors").exists() and _shards(moved / "latest") == _shards(step4)
    _run(["--resume", str(moved), "--micro-batch-size", "8", "--parallel", "auto"])
    _run(["--out-dir", str(tmp_path / "one"), "--micro-batch-size", "8", *common])
    one, after = _losses(tmp_path / "one"), _losses(moved)
    assert sorted(one) == sorted(after) == list(range(1, 7))
    for s in one:
        assert after[s] == pytest.approx(one[s], abs=TOLERANCE), f"step {s}"
    assert one[6] < one[1] - 0.1

    # dozero reads the shards with safetensors alone; torch's own DCP reader gives the same tensors.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    from dozero.model.checkpoint import load_model

    reader = HuggingFaceStorageReader(str(step4 / SHARDS_DIR))
    meta = reader.read_metadata().state_dict_metadata
    theirs = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(theirs, storage_reader=HuggingFaceStorageReader(str(step4 / SHARDS_DIR)), no_dist=True)
    ours = load_model(step4).state_dict()
    assert any(k.startswith("optimizer/") for k in theirs)
    # Tensor parallelism kept qkv's rows rank-major; the shards hold it as q, k, v in the model's order.
    assert "model/trf_blocks.0.att.qkv.weight#2" in theirs
    theirs = _join_segments(theirs)
    for name, tensor in theirs.items():
        if name.startswith("model/"):
            assert torch.equal(ours[name.removeprefix("model/")], tensor), name

    # convert makes an ordinary model folder of it, with the same weights.
    plain = tmp_path / "plain"
    assert main(["model", "convert", str(step4), str(plain), "--to", "dozero"]) == 0
    assert (plain / "model.safetensors").is_file() and not (plain / SHARDS_DIR).exists()
    for name, tensor in load_model(plain).state_dict().items():
        assert torch.equal(tensor, ours[name]), name
    capsys.readouterr()
    _bad_sharded_checkpoints_are_one_line_errors(step4, tmp_path, capsys)


def _bad_sharded_checkpoints_are_one_line_errors(step: Path, tmp_path: Path, capsys) -> None:
    from dozero.cli import main

    def error(args) -> str:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err

    broken = tmp_path / "broken"  # a copy of the run, one shard file of step_4 gone
    shutil.copytree(step.parent.parent, broken)
    missing = broken / "checkpoints" / step.name
    (missing / SHARDS_DIR / _shards(step)[1]).unlink()
    err = error(["model", "convert", str(missing), str(tmp_path / "out1"), "--to", "dozero"])
    assert f"shard file {SHARDS_DIR}/{_shards(step)[1]} is missing" in err
    err = error(["train", "--resume", str(missing)])
    assert (
        f"damaged: {SHARDS_DIR}/{_shards(step)[1]} is missing" in err
        and "no older checkpoint; later ones: step_000006;" in err
    )

    other = tmp_path / "other"  # config.json says emb_dim 48; the shards hold a 32-wide model
    shutil.copytree(step, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["emb_dim"] = 48
    (other / "config.json").write_text(json.dumps(config))
    (other / "checksums.json").unlink()  # (with the checksums, the edit itself is the error)
    err = error(["model", "convert", str(other), str(tmp_path / "out2"), "--to", "dozero"])
    assert "has shape (65, 32) but the config needs (65, 48)" in err


# ----------------------------------------------------------------------------- reading shards, in one process


def _sharded_folder(root: Path, files: dict[str, dict[str, tuple[list[int], torch.Tensor]]]) -> Path:
    """A checkpoint folder as DCP and rank 0 write it: per shard file, key -> (offsets, piece)."""
    from safetensors.torch import save_file

    from dozero.model.checkpoint import write_checksums
    from dozero.model.sharded import SHARDING_INFO
    from dozero.train.sharded_checkpoint import add_checksums

    folder = root / "run" / "step"
    (folder / SHARDS_DIR).mkdir(parents=True)
    for name, pieces in files.items():
        info = json.dumps({key: {"saved_offsets": offsets} for key, (offsets, _) in pieces.items()})
        tensors = {key: t for key, (_, t) in pieces.items()}
        save_file(tensors, str(folder / SHARDS_DIR / name), metadata={SHARDING_INFO: info})
    config = {"format": "dozero", "format_version": 1, "model": {}, "sharded": {"files": sorted(files)}}
    (folder / "config.json").write_text(json.dumps(config))
    write_checksums(folder)
    add_checksums(folder, [f"{SHARDS_DIR}/{name}" for name in files])
    return folder


def _rows(*rows: int) -> torch.Tensor:
    return torch.tensor([[float(r)] * 3 for r in rows])


def test_pieces_are_put_together_whatever_their_order(tmp_path):
    from dozero.model.sharded import read_sharded

    folder = _sharded_folder(
        tmp_path,
        {"b.safetensors": {"model/w": ([2, 0], _rows(2, 3))}, "a.safetensors": {"model/w": ([0, 0], _rows(0, 1))}},
    )
    assert torch.equal(read_sharded(folder, "model/")["w"], _rows(0, 1, 2, 3))


@pytest.mark.parametrize(
    "pieces, message",
    [
        # rows 0-1, row 1 again, row 3: the sizes add up to the 4 rows, row 2 is never written
        ([([0, 0], _rows(0, 1)), ([1, 0], _rows(1)), ([3, 0], _rows(3))], "two pieces of 'w' overlap at [1, 0]"),
        ([([-2, 0], _rows(0, 1)), ([0, 0], _rows(0, 1))], "sit at [-2, 0]"),
        ([([10**12, 0], _rows(0))], "the shards hold 3 of the 3000000000003 values of 'w'"),  # not allocated
    ],
)
def test_pieces_that_overlap_or_sit_outside_are_one_line_errors(tmp_path, pieces, message):
    from dozero.errors import DozeroError
    from dozero.model.sharded import read_sharded

    folder = _sharded_folder(tmp_path, {f"{i}.safetensors": {"model/w": piece} for i, piece in enumerate(pieces)})
    with pytest.raises(DozeroError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        read_sharded(folder, "model/")
    assert "\n" not in str(e.value)


def test_a_bad_segment_number_is_a_one_line_error():
    from dozero.errors import DozeroError

    with pytest.raises(DozeroError, match="'w#x' is not a segment name"):
        _join_segments({"w#x": _rows(0)}, "shards")
    with pytest.raises(DozeroError, match="segments of 'w' are not #0 to #1"):
        _join_segments({"w#0": _rows(0), "w#2": _rows(1)}, "shards")
    assert torch.equal(_join_segments({"w#1": _rows(1), "w#0": _rows(0)})["w"], _rows(0, 1))


def test_shard_names_outside_the_folder_or_without_a_checksum_are_refused(tmp_path):
    """config.json names the shard files: a name with a folder in it would read any file, and a file
    checksums.json does not record was not saved with the checkpoint."""
    from dozero.data.shards import file_sha256
    from dozero.errors import DozeroError
    from dozero.model.sharded import read_sharded

    folder = _sharded_folder(tmp_path, {"a.safetensors": {"model/w": ([0, 0], _rows(0))}})
    shutil.copy(folder / SHARDS_DIR / "a.safetensors", tmp_path / "secret.safetensors")
    config = json.loads((folder / "config.json").read_text())
    for name in ["../../../secret.safetensors", "/etc/passwd", "config.json"]:
        config["sharded"]["files"] = [name]
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(DozeroError, match=f"'{name}' is not a shard file name"):
            read_sharded(folder, "model/")
    config["sharded"]["files"] = ["a.safetensors", "b.safetensors"]  # b added after the save
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / SHARDS_DIR / "a.safetensors", folder / SHARDS_DIR / "b.safetensors")
    sums = json.loads((folder / "checksums.json").read_text())
    sums["sha256"]["config.json"] = file_sha256(folder / "config.json")
    (folder / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(DozeroError, match="checksums.json has no sha256 of shards/b.safetensors"):
        read_sharded(folder, "model/")


def test_a_sharded_checkpoint_without_its_shard_folder_or_model_is_one_line(tmp_path):
    """Whether a checkpoint is sharded is config.json's word, on resume as on load: a deleted shards/ is
    reported as such (not as a missing optimizer.safetensors), and its moments need the model's names."""
    from dozero.errors import DozeroError
    from dozero.train.checkpoint import TRAINER_STATE, load_trainer_state, verify_checkpoint

    folder = _sharded_folder(tmp_path, {"a.safetensors": {"optimizer/w/exp_avg": ([0, 0], _rows(0))}})
    state = {"optimizer_param_groups": [{"lr": 0.1, "params": []}], "step": 1, "loader": {}, "rng": {}}
    (folder / TRAINER_STATE).write_text(json.dumps(state))
    with pytest.raises(DozeroError, match="is a sharded checkpoint of a --parallel run; resume it with dozero train"):
        load_trainer_state(folder, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, 3))]))
    shutil.rmtree(folder / SHARDS_DIR)
    with pytest.raises(DozeroError, match="its shard folder shards/ is missing"):
        verify_checkpoint(folder)


def test_metadata_may_not_mark_a_model_folder_as_sharded(tmp_path):
    """save_model and a sharded checkpoint's config.json share one assembly, reserving "sharded" (a folder
    saved with it would be read as shards it does not have)."""
    from dozero.config import get_model_config
    from dozero.model.checkpoint import save_model
    from dozero.model.gpt import GPTModel

    model = GPTModel(get_model_config("shakespeare-char"))
    with pytest.raises(ValueError, match=r"reserved keys \['sharded'\]"):
        save_model(model, tmp_path / "m", metadata={"sharded": {"files": ["a.safetensors"]}})
