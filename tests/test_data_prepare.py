"""End to end: a corpus with planted duplicates, personal data and junk comes out exactly cleaned, tokenized
like tiktoken, split reproducibly; bad inputs give clear errors or reported behaviour."""

from __future__ import annotations

import errno
import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from dozero.cli import main
from dozero.data.clean import CleanConfig
from dozero.data.loader import RandomWindowLoader
from dozero.data.prepare import PrepareConfig, prepare
from dozero.data.shards import load_data_tokenizer, load_split, read_manifest
from dozero.errors import DozeroError
from dozero.tokenizer import has_tokenizer

EOT = 50256


def _doc(seed: int, n_words: int = 200) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n_words)]


def _text(words: list[str], per_line: int = 20) -> str:
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, len(words), per_line))


def planted_corpus() -> tuple[list[str], list[str], dict]:
    """(raw documents, the cleaned documents that must come out, expected counts)."""
    raw, expected = [], []
    for seed in range(30):  # ordinary unique documents
        raw.append(_text(_doc(seed)))
        expected.append(raw[-1])
    pii = [
        ("Write to ana.silva@example.com or bob@mail.example.org.", "Write to <EMAIL> or <EMAIL>."),
        ("Phones: +1 415 555 0132, (415) 555-0132 and (11) 91234-5678.", "Phones: <PHONE>, <PHONE> and <PHONE>."),
        ("Hosts 10.0.0.12 and 2001:db8::ff00:42:8329 answer.", "Hosts <IP_ADDRESS> and <IP_ADDRESS> answer."),
        ("Card 4111 1111 1111 1111, not 4111 1111 1111 1112.", "Card <CARD_NUMBER>, not 4111 1111 1111 1112."),
    ]
    for i, (plain, scrubbed) in enumerate(pii):
        body = _text(_doc(100 + i))
        raw.append(f"{body}\n{plain}")
        expected.append(f"{body}\n{scrubbed}")
    for i in range(2):  # junk lines (a base64-like blob) inside good documents
        body = _text(_doc(200 + i))
        raw.append(f"{body}\n{'QUJD' * 80}\nthe end of it")
        expected.append(f"{body}\nthe end of it")
    decomposed = "Cafe\u0301 cre\u0300me " + _text(_doc(300))
    raw.append(decomposed)
    expected.append("Café crème " + _text(_doc(300)))
    # Planted removals.
    raw += [expected[0], expected[1], "  " + expected[2].upper() + "  "]  # 3 exact duplicates
    for seed in (3, 4):  # 2 near duplicates: two words changed out of 200 (Jaccard of 5-grams ~0.9)
        words = _doc(seed)
        words[40], words[160] = "altered", "tokens"
        raw.append(_text(words))
    raw += [
        "too short",
        "#### 1234 5678 %%%% 9999 ---- **** 0000 //// 4321 #### ++++ 7777 ---- ==== 8888 ::::",
        "buy now\n" * 12 + "a single other line that is long enough to pass the minimum length",
    ]
    counts = {"exact": 3, "near": 2, "too_short": 1, "low_alpha_ratio": 1, "duplicated_lines": 1}
    return raw, expected, counts


def _write_jsonl(path: Path, texts, field="text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def _documents(data_dir: Path) -> list[list[int]]:
    """Every document's ids, split on the end-of-text token, from both splits."""
    docs = []
    for split in ("train", "val"):
        ids = load_split(data_dir, split)[:].tolist()
        assert ids[-1] == EOT
        cut = [-1] + [i for i, t in enumerate(ids) if t == EOT]
        docs += [ids[a + 1 : b] for a, b in zip(cut, cut[1:], strict=False)]
    return docs


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiktoken_gpt2):
    tmp = tmp_path_factory.mktemp("planted")
    raw, expected, counts = planted_corpus()
    _write_jsonl(tmp / "corpus.jsonl", raw)
    out = tmp / "out"
    manifest = prepare([str(tmp / "corpus.jsonl")], out, PrepareConfig(workers=1, val_fraction=0.2), progress=False)
    return tmp, out, manifest, raw, expected, counts


def test_planted_corpus_comes_out_exactly_cleaned(planted, tiktoken_gpt2):
    _, out, manifest, raw, expected, counts = planted
    report = json.loads((out / "clean_report.json").read_text())["cleaning"]
    steps = report["steps"]
    assert report["documents_in"] == len(raw) and report["documents_kept"] == len(expected) == manifest["documents"]
    assert steps["exact_dedup"]["removed"] == counts["exact"]
    assert steps["near_dedup"]["removed"] == counts["near"]
    removed = steps["quality_filter"]["removed"]
    assert removed == {"empty_after_cleaning": 0, "too_short": 1, "low_alpha_ratio": 1, "duplicated_lines": 1}
    assert steps["pii"]["replaced"] == {"email": 2, "phone": 3, "ip": 2, "card": 1}
    assert steps["junk_lines"]["lines_removed"] == 2 and steps["normalize"]["documents_changed"] == 1
    # Shards decode back to the cleaned text, ids identical to tiktoken's GPT-2 encoding.
    docs = _documents(out)
    assert sorted(docs) == sorted(tiktoken_gpt2.encode_ordinary(t) for t in expected)
    tok = load_data_tokenizer(out)
    assert sorted(tok.decode(d) for d in docs) == sorted(expected)


def test_manifest_split_and_determinism(planted, tmp_path):
    tmp, out, manifest, _, expected, _ = planted
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 50257
    assert has_tokenizer(out)  # the folder carries its tokenizer, like a model folder (what `dozero train` reads)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == len(expected) and 0 < val["documents"] < len(expected)
    assert train["tokens"] == len(load_split(out, "train"))
    # The same input and seed give byte-identical shards, with a pool of 2 workers and small shards too.
    again = prepare([str(tmp / "corpus.jsonl")], tmp_path / "again",
                    PrepareConfig(workers=2, val_fraction=0.2, shard_tokens=1000), progress=False)  # fmt: skip
    assert again["splits"]["val"]["documents"] == val["documents"]
    assert len(again["splits"]["train"]["shards"]) == -(-train["tokens"] // 1000)
    assert np.array_equal(load_split(tmp_path / "again", "train")[:], load_split(out, "train")[:])
    other_seed = prepare([str(tmp / "corpus.jsonl")], tmp_path / "seed", PrepareConfig(workers=1, val_fraction=0.2,
                         seed=7), progress=False)  # fmt: skip
    assert other_seed["splits"]["val"]["tokens"] != val["tokens"]


def test_val_tokens_caps_the_validation_split(planted, tmp_path):
    tmp = planted[0]
    m = prepare([str(tmp / "corpus.jsonl")], tmp_path / "o", PrepareConfig(workers=1, val_fraction=0.5, val_tokens=500),
                CleanConfig(near_dedup=False), progress=False)  # fmt: skip
    val = m["splits"]["val"]
    assert 500 <= val["tokens"] < 500 + 600 and val["documents"] >= 1  # stops at the first document past 500


def test_formats_and_compression_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from dozero.data.ingest import expand_inputs, iter_documents

    texts = [_text(_doc(s, 40)) for s in range(5)]
    (tmp_path / "a").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "a" / f"{i}.{'md' if i % 2 else 'txt'}").write_text(t)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=2)
    (tmp_path / "e.txt").write_text("\n\n".join(texts) + "\n\n")
    for source in ["a", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]:
        got = [d.text for d in iter_documents(expand_inputs([str(tmp_path / source)]))]
        assert got == texts, source
    got = [d.text for d in iter_documents(expand_inputs([str(tmp_path / "e.txt")]), separator="\n\n")]
    assert got == texts
    assert len(expand_inputs([str(tmp_path / "*.jsonl.*")])) == 2


def test_undecodable_bytes_and_empty_files_are_counted_not_fatal(tmp_path):
    good = _text(_doc(1))
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"\ncaf\xe9 ok \xff\xfe end of the line")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.md").write_bytes(b"  \n\n ")
    m = prepare([str(tmp_path)], tmp_path / "out", PrepareConfig(workers=1, val_fraction=0), progress=False)
    report = json.loads((tmp_path / "out" / "clean_report.json").read_text())["input"]
    assert report["undecodable_bytes_replaced"] == 3 and report["files_with_undecodable_bytes"] == 1
    assert report["empty_files"] == 2 and m["documents"] == 1
    text = load_data_tokenizer(tmp_path / "out").decode(load_split(tmp_path / "out", "train")[:-1].tolist())
    assert text.endswith("caf\ufffd ok \ufffd\ufffd end of the line")
    with pytest.raises(DozeroError, match="no documents left"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out2", progress=False)


def test_prepare_says_which_json_lines_it_skipped(tmp_path, capsys):
    good = json.dumps({"text": _text(_doc(2))})
    (tmp_path / "docs.jsonl").write_text(f'{good}\n{{"text": "cut short\n{good}\n')
    argv = ["data", "prepare", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out"), "--val-fraction", "0"]
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "input: 0 undecodable bytes replaced by U+FFFD, 0 empty files skipped, 1 bad JSON lines skipped" in out
    assert f"  bad JSON line {tmp_path / 'docs.jsonl'}:2: " in out


def test_missing_field_names_the_file_and_its_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "x.jsonl", ["hello"], field="content")
    with pytest.raises(
        DozeroError, match=r"x\.jsonl:1: the JSON record has no field 'text' \(it has: \['content', 'id'\]"
    ):
        prepare([str(tmp_path / "x.jsonl")], tmp_path / "o", PrepareConfig(workers=1), progress=False)
    pq.write_table(pa.table({"body": ["hello"], "url": ["u"]}), tmp_path / "y.parquet")
    with pytest.raises(DozeroError, match=r"y\.parquet: no column 'text' \(it has: \['body', 'url'\]\)"):
        prepare([str(tmp_path / "y.parquet")], tmp_path / "o", PrepareConfig(workers=1), progress=False)
    with pytest.raises(DozeroError, match="matches no files"):
        prepare([str(tmp_path / "nothing*.txt")], tmp_path / "o", progress=False)


def test_checksum_and_tokenizer_mismatch(planted, tmp_path):
    import shutil

    from dozero.tokenizer import CharTokenizer

    data = tmp_path / "copy"
    shutil.copytree(planted[1], data)
    with pytest.raises(DozeroError, match=r"tokenized with gpt2 \(vocab 50257.*this run's tokenizer has vocab 3"):
        load_split(data, "train", tokenizer=CharTokenizer("abc"))
    load_split(data, "train", tokenizer=load_data_tokenizer(data))  # the right one passes
    shard = data / "train_000000.bin"
    b = bytearray(shard.read_bytes())
    b[100] ^= 1
    shard.write_bytes(bytes(b))
    with pytest.raises(DozeroError, match="does not match its checksum"):
        load_split(data, "train")
    assert len(load_split(data, "train", verify=False)) == len(b) // 2  # documented fast path
    shard.write_bytes(bytes(b[:-2]))
    with pytest.raises(DozeroError, match="cut short"):
        load_split(data, "train", verify=False)


def test_context_longer_than_val_split(planted):
    val = load_split(planted[1], "val")
    with pytest.raises(DozeroError, match=rf"needs at least {len(val) + 1:,} tokens, but split 'val' of .* has only"):
        RandomWindowLoader(val, 1, len(val), seed=0)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_prepare_leaves_the_old_dataset_byte_identical(planted, tmp_path, monkeypatch):
    import shutil

    from dozero.data import shards

    data = tmp_path / "d"
    shutil.copytree(planted[1], data)
    before = _snapshot(data)
    # An input error: found while reading, after the old code had already deleted the old manifest and shards.
    _write_jsonl(tmp_path / "bad.jsonl", ["fine " * 20], field="content")
    with pytest.raises(DozeroError, match="has no field 'text'"):
        prepare([str(planted[0] / "corpus.jsonl"), str(tmp_path / "bad.jsonl")], data, progress=False)
    assert _snapshot(data) == before
    # Ctrl-C halfway through the shards.
    calls = {"n": 0}
    original = shards.ShardWriter.add_document

    def crash_after_a_few(self, ids):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        original(self, ids)

    monkeypatch.setattr(shards.ShardWriter, "add_document", crash_after_a_few)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(planted[0] / "corpus.jsonl")], data, PrepareConfig(workers=1, shard_tokens=300), progress=False)
    assert _snapshot(data) == before and len(load_split(data, "train")) == planted[2]["splits"]["train"]["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d"]  # the half-built folder is gone
    monkeypatch.undo()
    prepare([str(planted[0] / "corpus.jsonl")], data, PrepareConfig(workers=1, shard_tokens=300), progress=False)
    assert len(list(data.glob("train_*.bin"))) > 1 and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_is_one_line_and_loses_nothing(planted, tmp_path, monkeypatch, capsys, code):
    import shutil

    from dozero.data import shards

    data = tmp_path / "d"
    shutil.copytree(planted[1], data)
    before = _snapshot(data)

    def fail(self):
        raise OSError(code, os.strerror(code), str(self.out_dir / "train_000000.bin"))

    monkeypatch.setattr(shards.ShardWriter, "_open", fail)
    assert main(["data", "prepare", str(planted[0] / "corpus.jsonl"), "--out", str(data), "--quiet",
                 "--workers", "1"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and os.strerror(code) in err
    assert _snapshot(data) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_char_tokenizer_matches_nanogpt(shared_data, tmp_path):
    m = prepare([str(shared_data / "tinyshakespeare.txt")], tmp_path / "c",
                PrepareConfig(tokenizer="char", separator="\\n\\n", workers=1), CleanConfig(clean=False),
                progress=False)  # fmt: skip
    assert m["tokenizer"]["vocab_size"] == 65 and m["tokenizer"]["eot_id"] is None and "'\\n\\n'" in m[
        "document_separator"]  # fmt: skip
    text = (shared_data / "tinyshakespeare.txt").read_text()
    chars = sorted(set(text))
    train = load_split(tmp_path / "c", "train")
    # The first document is the play's first speech, ids as nanoGPT's shakespeare_char computes them.
    assert train[:20].tolist() == [chars.index(c) for c in text[:20]]
    # Each split joins its speeches with "\n\n": two splits hold one separator (2 characters) fewer than the file.
    assert m["documents"] == text.count("\n\n") + 1 and m["tokens"] == len(text) - 2


def test_cli_prepare_inspect_and_errors(planted, tmp_path, capsys):
    src = str(planted[0] / "corpus.jsonl")
    assert main(["data", "prepare", src, "--out", str(tmp_path / "o"), "--quiet", "--no-near-dedup",
                 "--val-fraction", "0.2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "near duplicates removed: 0" in out and "exact duplicates removed: 3" in out
    assert main(["data", "inspect", str(tmp_path / "o"), "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "all shards verified" in out and "sample of train" in out and "personal data replaced" in out
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a prepared data folder" in err


KILLED_CHILD = """
import os, signal, sys
from dozero.data import shards
from dozero.data.prepare import PrepareConfig, prepare
original = shards.ShardWriter.add_document
def add_then_die(self, ids, calls=[0]):
    original(self, ids)
    calls[0] += 1
    if calls[0] == 8:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: like a power cut or the OOM killer
shards.ShardWriter.add_document = add_then_die
prepare([sys.argv[1]], sys.argv[2], PrepareConfig(workers=1, shard_tokens=2000), progress=False)
"""


def test_killed_prepare_leaves_the_old_dataset_and_its_debris_is_swept(planted, tmp_path):
    import shutil
    import subprocess
    import sys

    data = tmp_path / "d"
    shutil.copytree(planted[1], data)  # a good earlier result in the same folder
    before = _snapshot(data)
    run = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(planted[0] / "corpus.jsonl"), str(data)])
    assert run.returncode == -9
    assert _snapshot(data) == before and len(load_split(data, "val")) == planted[2]["splits"]["val"]["tokens"]
    debris = [p.name for p in tmp_path.iterdir() if p.name != "d"]
    assert len(debris) == 1 and debris[0].startswith(".d.") and debris[0].endswith(".tmp")  # the half-built folder
    prepare([str(planted[0] / "corpus.jsonl")], data, PrepareConfig(workers=1, val_fraction=0.2), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # the next run in that place removed it
    assert read_manifest(data)["splits"] == planted[2]["splits"]
