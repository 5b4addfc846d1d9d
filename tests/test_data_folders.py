"""Where `dozero data prepare` may write and what it reads back: foreign folders are refused without --force,
an --out inside the inputs is never read as input, a damaged manifest is one line, old names keep working."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from dozero.cli import main
from dozero.data.prepare import PrepareConfig, prepare
from dozero.data.shards import load_split, read_manifest
from dozero.errors import DozeroError


def _corpus(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = random.Random(i)
        words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8))) for _ in range(120)]
        (folder / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return folder


def _prepare(inputs, out, **kw):
    cfg = PrepareConfig(tokenizer="char", workers=1, **kw)
    return prepare([str(i) for i in inputs], out, cfg, progress=False)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_out_inside_the_input_folder_is_not_read_back(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    first = _prepare([corpus], corpus / "prepared")
    # The old code read corpus/prepared/clean_report.txt back as a seventh document on the second run.
    second = _prepare([corpus], corpus / "prepared")
    assert first["documents"] == second["documents"] == 6 and second["inputs"]["files"] == 6
    with pytest.raises(DozeroError, match="lies inside --out"):
        _prepare([corpus], corpus.parent)  # --out holding the inputs would replace them
    with pytest.raises(DozeroError, match="lies inside --out"):
        _prepare([corpus], corpus)
    assert sorted(p.name for p in corpus.iterdir())[:2] == ["doc0.txt", "doc1.txt"]


def test_a_model_folder_is_not_overwritten_without_force(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "dozero_tokenizer.json").write_text('{"the model": "tokenizer"}')
    (model / ".gitattributes").write_text("*.safetensors filter=lfs")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    argv = ["data", "prepare", str(corpus), "--out", str(model), "--tokenizer", "char", "--quiet", "--workers", "1"]
    err = _one_line_error(capsys, argv)
    assert "not empty and is not a dozero data folder" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert main([*argv, "--force"]) == 0  # the user's own files stay; dozero's are replaced
    assert (model / "model.safetensors").read_bytes() == b"weights" and (model / "config.json").exists()
    assert (model / ".gitattributes").exists()
    assert read_manifest(model)["documents"] == 6
    assert main(argv) == 0  # a data folder now: a rerun needs no --force, and still keeps the other files
    assert (model / "model.safetensors").read_bytes() == b"weights"
    (tmp_path / "file").write_text("x")
    err = _one_line_error(capsys, [*argv[:3], "--out", str(tmp_path / "file"), *argv[5:]])
    assert "is a file, not a folder" in err


def test_a_rerun_replaces_old_shards_and_keeps_user_files(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    _prepare([corpus], out, shard_tokens=500, val_fraction=0.5)
    assert len(list(out.glob("train_*.bin"))) > 1
    (out / "NOTES.md").write_text("mine")
    _prepare([corpus], out, val_fraction=0.5)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    assert (out / "NOTES.md").read_text() == "mine"


def test_out_holding_the_working_folder_or_a_mount_point_is_refused(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "corpus")
    _prepare([corpus], tmp_path / "out", val_fraction=0.5)
    monkeypatch.chdir(tmp_path / "out")  # the swap would leave the shell in a deleted folder
    with pytest.raises(DozeroError, match="holds the working folder"):
        _prepare([corpus], ".")
    monkeypatch.setattr("os.path.ismount", lambda p: str(p).endswith("out"))
    with pytest.raises(DozeroError, match="is a mount point"):
        _prepare([corpus], tmp_path / "out")
    assert read_manifest(tmp_path / "out")["documents"] == 6


@pytest.fixture
def data(tmp_path):
    return tmp_path, _prepare([_corpus(tmp_path / "corpus")], tmp_path / "d", val_fraction=0.3)


def _damage(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("splits"), "has no 'splits'"),
        (lambda m: m["tokenizer"].pop("fingerprint"), "tokenizer has no 'fingerprint'"),
        (lambda m: m.update(dtype="float64"), "dtype 'float64' is not one of uint16, uint32"),
        (lambda m: m["splits"]["train"].update(tokens="many"), r"splits\['train'\]\['tokens'\] is str, not int"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="../../corpus/doc0.txt"), "is not a shard name"),
        (lambda m: m["splits"]["val"]["shards"].append(7), "shard 1 of 'val' is int, not an object"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="train_000009.bin"), "is missing"),
        (lambda m: m["splits"]["train"]["shards"][0].update(tokens=3), "the manifest says 6:"),
    ],
)
def test_a_damaged_manifest_is_one_line(data, capsys, change, message):
    tmp, _ = data
    _damage(tmp / "d", change)
    assert re.search(message, _one_line_error(capsys, ["data", "inspect", str(tmp / "d")]))
    with pytest.raises(DozeroError, match=message):
        load_split(tmp / "d", "train")


def test_manifest_that_is_not_json_or_cut_short(data, capsys):
    tmp, _ = data
    text = (tmp / "d" / "manifest.json").read_text()
    (tmp / "d" / "manifest.json").write_text(text[: len(text) // 2])
    err = _one_line_error(capsys, ["data", "inspect", str(tmp / "d")])
    assert "manifest.json is not valid JSON" in err and "prepare the data again" in err
    (tmp / "d" / "manifest.json").write_bytes(b"\xff\xfe[1]")
    assert "not valid JSON" in _one_line_error(capsys, ["data", "inspect", str(tmp / "d")])
    (tmp / "d" / "manifest.json").write_text("[1, 2]")
    assert "not a dozero data manifest" in _one_line_error(capsys, ["data", "inspect", str(tmp / "d")])


def test_inspect_without_the_cleaning_report(data, capsys):
    tmp, _ = data
    (tmp / "d" / "clean_report.json").unlink()
    (tmp / "d" / "clean_report.txt").unlink()
    assert main(["data", "inspect", str(tmp / "d")]) == 0
    assert "cleaning report: none" in capsys.readouterr().out


def test_old_names_keep_working(data, tmp_path, capsys):
    tmp, manifest = data
    assert manifest["split"]["val_fraction"] == 0.3
    _damage(tmp / "d", lambda m: m["split"].update(val_ratio=m["split"].pop("val_fraction")))  # an older manifest
    assert read_manifest(tmp / "d")["split"]["val_fraction"] == 0.3
    args = ["data", "prepare", str(tmp / "corpus"), "--tokenizer", "char", "--quiet", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--val-ratio", "0.5"]) == 0  # the flag's old name
    assert main([*args, "--out", str(tmp_path / "b"), "--val-fraction", "0.5"]) == 0
    assert read_manifest(tmp_path / "a")["split"] == read_manifest(tmp_path / "b")["split"]
    assert read_manifest(tmp_path / "a")["split"]["val_fraction"] == 0.5


def test_separator_escapes(tmp_path):
    (tmp_path / "t.txt").write_text("one paragraph here\n\nanother one\\nstill the second")
    assert PrepareConfig(separator="\\n\\n").separator == "\n\n"
    assert PrepareConfig(separator="\\\\n").separator == "\\n"  # an escaped backslash stays a backslash
    from dozero.data.ingest import iter_documents

    docs = [d.text for d in iter_documents([tmp_path / "t.txt"], separator=PrepareConfig(separator="\\n\\n").separator)]
    assert docs == ["one paragraph here", "another one\\nstill the second"]
