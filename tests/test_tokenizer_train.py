"""A BPE vocabulary trained here: first merges checked by hand, deterministic, round-trips, bad input refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dozero.errors import DozeroError
from dozero.tokenizer import ENDOFTEXT, BPETokenizer, load_tokenizer
from dozero.tokenizer.train import corpus_files, count_chunks, learn_merges, train_bpe

# Sennrich et al. (2016)'s example corpus, as text. GPT-2's regex cuts it into the chunks
#   "low" x1, " low" x4, " lower" x2, " newest" x6, " widest" x3
SENNRICH = "low" + " low" * 4 + " lower" * 2 + " newest" * 6 + " widest" * 3
# Pair counts (weighted by chunk counts): e-s 9, s-t 9, w-e 8 (lower 2 + newest 6), l-o 7, o-w 7, " "-l 6,
# " "-n 6, n-e 6, e-w 6, " "-w 3, w-i 3, i-d 3, d-e 3, e-r 2.
#  1. e-s and s-t tie at 9; (b"e", b"s") sorts first                              -> "es"
#  2. es-t 9 (newest 6 + widest 3); w-e fell to 2 because newest is now n,e,w,es  -> "est"
#  3. l-o and o-w tie at 7; (b"l", b"o") sorts first                              -> "lo"
#  4. lo-w 7                                                                      -> "low"
#  5. ties at 6: " "-low, " "-n, n-e, e-w, w-est; (b" ", b"low") sorts first      -> " low"
#  6. (b" ", b"n") is now the smallest of the 6s                                  -> " n"
#  7-9. " n"-e, then " ne"-w, then " new"-est, each 6                             -> " ne", " new", " newest"
# 10. ties at 3 (widest): " "-w, w-i, i-d, d-est; (b" ", b"w") first              -> " w"
SENNRICH_MERGES = [b"es", b"est", b"lo", b"low", b" low", b" n", b" ne", b" new", b" newest", b" w"]


def test_first_merges_are_the_hand_checked_ones(tmp_path):
    (tmp_path / "corpus.txt").write_text(SENNRICH)
    tok, report = train_bpe([tmp_path], vocab_size=256 + 10 + 1, progress=False)
    assert [tok.token_bytes(i) for i in range(256, 266)] == SENNRICH_MERGES
    assert tok.special_tokens == {ENDOFTEXT: 266} and tok.vocab_size == 267 and tok.eot_id == 266
    assert (report.files, report.bytes, report.chunks, report.distinct_chunks, report.merges) == (1, 94, 16, 5, 10)
    assert tok.encode(" newest lower") == [264, 260, 101, 114]  # " newest", " low", "e", "r"


def test_count_chunks_cuts_out_specials_and_invalid_bytes():
    counts = count_chunks("a b<|endoftext|>a b\udcff", r" ?\w+", [ENDOFTEXT])
    assert counts == {"a": 2, " b": 2, "\udcff": 1}


def test_learn_merges_runs_out_of_pairs():
    tokens = learn_merges({"ab": 3}, n_tokens=300, progress=False)
    assert tokens[256:] == [b"ab"]  # one pair in the whole corpus: one merge, then stop
    # A repeated pair: after "ab" and "abab" no pair is left; pairs whose count fell to 0 are never merged.
    assert learn_merges({"abab": 1}, n_tokens=300, progress=False)[256:] == [b"ab", b"abab"]
    assert learn_merges({"aaaa": 1}, n_tokens=300, progress=False)[256:] == [b"aa", b"aaaa"]


def test_corpus_files_below_a_parent_folder(tmp_path, monkeypatch):
    (tmp_path / "corpus" / ".git").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("a")
    (tmp_path / "corpus" / ".git" / "HEAD").write_text("ref")  # hidden below the folder: left out
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert corpus_files(["../corpus"]) == [Path("../corpus/a.txt")]


@pytest.fixture(scope="module")
def shakespeare_tok(shared_data):
    return train_bpe([shared_data / "tinyshakespeare.txt"], vocab_size=1000, progress=False)


def test_trained_vocab_round_trips_and_matches_reference(shakespeare_tok, shared_data):
    tok, report = shakespeare_tok
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 1000 and report.merges == 743
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_reference(text[:200_000]) == tok.encode(text[:200_000])  # tiktoken == pure Python
    # the vocabulary learned this text: fewer tokens than bytes by a wide margin (measured 2.41 bytes/token)
    assert 2.2 < len(text.encode()) / len(ids) < 2.6
    other = "Olá, coração! 🎉 日本語\n\n  def f(): return 42"
    assert tok.decode(tok.encode(other)) == other  # text unlike the corpus still round-trips (byte fallback)


def test_training_is_deterministic(shakespeare_tok, shared_data):
    tok, _ = shakespeare_tok
    again, _ = train_bpe([str(shared_data / "tinyshakespeare.txt")], vocab_size=1000, progress=False)
    assert again.ranks == tok.ranks and again.fingerprint() == tok.fingerprint()
    assert train_bpe([shared_data / "tinyshakespeare.txt"], 1001, progress=False)[0].fingerprint() != tok.fingerprint()


def test_reading_in_blocks_and_in_parallel_gives_the_chunks_of_the_whole_file(shared_data, monkeypatch):
    # files are cut into blocks for worker processes; no chunk may change (see train._blocks)
    import dozero.tokenizer.train as train

    files = [shared_data / "tinyshakespeare.txt"]
    whole = count_chunks(files[0].read_text(encoding="utf-8"), train.GPT2_PATTERN, [])
    monkeypatch.setattr(train, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(train, "_BLOCK_BYTES", 50_000)
    serial = train._count_all(files, train.TrainReport(), train.GPT2_PATTERN, [], 1, False)
    report = train.TrainReport()
    parallel = train._count_all(files, report, train.GPT2_PATTERN, [], 2, False)
    assert parallel == serial == whole and len(whole) == 15057
    assert (report.files, report.bytes) == (1, 1_115_394)


def test_invalid_utf8_corpus_trains_and_round_trips(tmp_path):
    good = "el café está caliente " * 50
    (tmp_path / "a.txt").write_text(good)
    bad = ("el caf\xe9 est\xe1 caliente " * 50).encode("latin-1") + b"\xff\xfe"  # Latin-1, not UTF-8
    (tmp_path / "b.txt").write_bytes(bad)
    tok, report = train_bpe([tmp_path / "*.txt"], vocab_size=270, special_tokens=[], progress=False)
    assert report.files == 2 and report.invalid_bytes == 102 and report.invalid_files == [str(tmp_path / "b.txt")]
    assert tok.eot_id is None and tok.vocab_size == 270
    assert tok.decode_bytes(tok.encode_bytes(bad)) == bad
    assert tok.decode(tok.encode(good)) == good
    # the Latin-1 bytes are invalid UTF-8 here (valid é/á are c3 a9 / c3 a1): none of them was ever merged
    assert not any(len(t) > 1 and set(t) & {0xE9, 0xE1, 0xFF, 0xFE} for t in tok.ranks)
    assert tok.ranks[b" caliente"] == 265  # the text around them was learned (" caliente" is in both files)


def test_user_special_tokens(tmp_path):
    (tmp_path / "c.txt").write_text("hello world<|endoftext|><|pad|>" * 20)
    tok, _ = train_bpe([tmp_path], vocab_size=263, special_tokens=[ENDOFTEXT, "<|pad|>"], progress=False)
    assert tok.special_tokens == {ENDOFTEXT: 261, "<|pad|>": 262}
    assert tok.encode("hi<|pad|>", special="allow")[-1] == 262
    assert all(b"<|" not in t for t in tok.ranks)  # special-token text in the corpus was not learned as merges
    with pytest.raises(DozeroError, match=r"contains the special token '<\|pad\|>'"):
        tok.encode("x<|pad|>")


def test_bad_training_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DozeroError, match=r"the corpus is empty \(1 file\(s\), 0 bytes\); nothing to train on"):
        train_bpe([tmp_path / "empty.txt"], vocab_size=300, progress=False)
    with pytest.raises(
        DozeroError, match=r"vocab_size 257 is too small: .* 256 byte tokens \+ 2 special token\(s\) = 258"
    ):
        train_bpe([tmp_path], vocab_size=257, special_tokens=["<a>", "<b>"], progress=False)
    with pytest.raises(DozeroError, match="no files found for '.*nothing-here/\\*.txt'; give text files, folders"):
        corpus_files([tmp_path / "nothing-here" / "*.txt"])
    with pytest.raises(DozeroError, match="special tokens must be distinct non-empty strings without newlines"):
        train_bpe([tmp_path], vocab_size=300, special_tokens=["<a>", "<a>"], progress=False)


def _cli_error(capsys, argv) -> str:
    from dozero.cli import main

    capsys.readouterr()  # what earlier runs printed
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [err[-1]] and err[-1].startswith("error: "), err  # one line, after any progress bars
    return err[-1]


def test_train_refuses_a_model_folder_without_force(tmp_path, capsys):
    from dozero.cli import main

    (tmp_path / "corpus.txt").write_text(SENNRICH)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "dozero_tokenizer.json").write_text('{"the model": "tokenizer"}')
    argv = ["tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "270", "--out", str(model)]
    err = _cli_error(capsys, argv)
    assert "is not empty and is not a tokenizer folder" in err and "--force" in err
    assert (model / "dozero_tokenizer.json").read_text() == '{"the model": "tokenizer"}'  # untouched
    assert main([*argv, "--force"]) == 0 and (model / "model.safetensors").read_bytes() == b"weights"
    assert load_tokenizer(model).vocab_size == 270
    tok_dir = tmp_path / "tok"
    assert main([*argv[:-1], str(tok_dir), "--export", "hf"]) == 0
    assert main([*argv[:-1], str(tok_dir)]) == 0  # a tokenizer folder may be retrained in place
    (tmp_path / "a_file").write_text("x")
    assert "is a file, not a folder" in _cli_error(capsys, [*argv[:-1], str(tmp_path / "a_file")])


def test_export_refuses_a_model_folder_without_force(tmp_path, capsys):
    """`tokenizer export` into a model's folder would replace the tokenizer its weights were trained with."""
    from dozero.cli import main

    (tmp_path / "corpus.txt").write_text(SENNRICH)
    assert (
        main(
            ["tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "270", "--out", str(tmp_path / "bpe")]
        )
        == 0
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "dozero_tokenizer.json").write_text('{"the model": "tokenizer"}')
    for fmt in ("dozero", "hf"):
        argv = ["tokenizer", "export", str(tmp_path / "bpe"), str(model), "--format", fmt]
        err = _cli_error(capsys, argv)
        assert "is not empty and is not a tokenizer folder" in err and "--force" in err
        assert sorted(p.name for p in model.iterdir()) == ["dozero_tokenizer.json", "model.safetensors"]
    assert (model / "dozero_tokenizer.json").read_text() == '{"the model": "tokenizer"}'  # untouched
    assert main([*argv, "--force"]) == 0 and (model / "tokenizer.json").exists()
    assert main(["tokenizer", "export", str(tmp_path / "bpe"), str(tmp_path / "new"), "--format", "gpt2"]) == 0
    assert main(["tokenizer", "export", str(tmp_path / "bpe"), str(tmp_path / "new"), "--format", "hf"]) == 0  # ours


@pytest.mark.timeout(30)
def test_train_stops_at_a_symlink_loop(tmp_path, capsys):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "sub" / "a.txt").write_text(SENNRICH)
    (tmp_path / "corpus" / "sub" / "up").symlink_to(tmp_path / "corpus")
    (tmp_path / "corpus" / "sub" / "up2").symlink_to(tmp_path / "corpus" / "sub")
    for item in (tmp_path / "corpus", tmp_path / "corpus" / "**" / "*.txt"):
        err = _cli_error(capsys, ["tokenizer", "train", str(item), "--vocab-size", "270", "--out", str(tmp_path / "t")])
        assert "a loop" in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_train_into_a_full_or_read_only_disk_is_one_line(tmp_path, capsys, monkeypatch, code):
    from dozero import files
    from dozero.cli import main

    (tmp_path / "corpus.txt").write_text(SENNRICH)
    argv = ["tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "262", "--out", str(tmp_path / "tok")]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}

    def fail(*args, dir=None, **kwargs):
        raise OSError(code, os.strerror(code), str(dir))

    monkeypatch.setattr(files.tempfile, "mkstemp", fail)
    err = _cli_error(capsys, [*argv[:4], "270", *argv[5:]])
    assert str(tmp_path / "tok") in err and os.strerror(code) in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before
