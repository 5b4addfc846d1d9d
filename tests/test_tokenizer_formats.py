"""Tokenizer files: dozero's vocabularies reproduce their ids in tiktoken and Hugging Face, and back; saving
beside a model and loading again; the `dozero tokenizer` command line."""

from __future__ import annotations

import re

import pytest

from dozero.cli import main
from dozero.errors import DozeroError
from dozero.tokenizer import CharTokenizer, export_tokenizer, has_tokenizer, load_tokenizer
from dozero.tokenizer.train import train_bpe

SAMPLES = [
    "Olá, coração! 🎉 日本語  <|endoftext|>\n\n\n   x",
    "It's we'll 12345 \t\r\n  def f(x):\n        return x  ",
]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def trained(shared_data):
    return train_bpe([shared_data / "tinyshakespeare.txt"], vocab_size=2000, progress=False)[0]


@pytest.fixture(scope="module")
def sample_texts(shared_data):
    return [(shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000], *SAMPLES]


def test_gpt2_export_is_byte_identical_to_openai_files(gpt2, shared_data, tmp_path):
    export_tokenizer(gpt2, tmp_path, "gpt2")
    assert (tmp_path / "vocab.json").read_bytes() == (shared_data / "gpt2" / "encoder.json").read_bytes()
    assert (tmp_path / "merges.txt").read_bytes() == (shared_data / "gpt2" / "vocab.bpe").read_bytes()


def test_gpt2_import_from_openai_files(gpt2, shared_data):
    tok = load_tokenizer(shared_data / "gpt2" / "encoder.json")
    assert tok.fingerprint() == gpt2.fingerprint() and tok.eot_id == 50256
    assert load_tokenizer(shared_data / "gpt2").fingerprint() == gpt2.fingerprint()  # folder with encoder.json
    assert load_tokenizer(shared_data / "gpt2" / "gpt2.tiktoken").fingerprint() == gpt2.fingerprint()


@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_hf_fast_tokenizer_reproduces_our_ids(which, request, sample_texts, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = request.getfixturevalue(which)
    export_tokenizer(tok, tmp_path, "hf")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert len(hf) == tok.vocab_size
    for text in sample_texts:
        ids = tok.encode(text, special="allow")
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text
    assert load_tokenizer(tmp_path / "tokenizer.json").fingerprint() == tok.fingerprint()  # and back


def test_hf_gpt2_files_reproduce_trained_ids(trained, sample_texts, tmp_path):
    from transformers import GPT2TokenizerFast

    export_tokenizer(trained, tmp_path, "gpt2")
    # positional arguments: the keyword form builds an empty tokenizer in transformers 5.23 (shared/data README)
    hf = GPT2TokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert all(hf.encode(t) == trained.encode(t, special="allow") for t in sample_texts)
    assert load_tokenizer(tmp_path).fingerprint() == trained.fingerprint()


def test_tiktoken_reproduces_trained_ids(trained, sample_texts, tmp_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path, _ = export_tokenizer(trained, tmp_path, "tiktoken")  # the ranks, then tiktoken_config.json
    enc = tiktoken.Encoding("t", pat_str=trained.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                            special_tokens=trained.special_tokens)  # fmt: skip
    assert all(enc.encode(t, allowed_special="all") == trained.encode(t, special="allow") for t in sample_texts)


def test_vocabulary_trained_by_hf_tokenizers_loads_with_the_same_ids(shared_data, sample_texts, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    hf.train([str(shared_data / "tinyshakespeare.txt")], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == hf.get_vocab_size() == 1000 and tok.eot_id == 0  # HF puts specials first
    for text in sample_texts:
        assert tok.encode(text, special="allow") == hf.encode(text).ids


def test_save_and_load_in_a_model_folder(gpt2, trained, tmp_path):
    gpt2.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dozero_tokenizer.json"]  # GPT-2 ships inside
    trained.save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["dozero_tokenizer.json", "dozero_tokenizer.tiktoken"]
    for folder, tok in ((tmp_path / "a", gpt2), (tmp_path / "b", trained)):
        assert has_tokenizer(folder)
        again = load_tokenizer(folder)
        assert again.fingerprint() == tok.fingerprint() and again.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])
    assert not has_tokenizer(tmp_path) and not has_tokenizer(tmp_path / "missing")
    # a changed ranks file (two tokens' ids swapped) is caught by the fingerprint
    ranks_file = tmp_path / "b" / "dozero_tokenizer.tiktoken"
    lines = ranks_file.read_bytes().splitlines()
    (a, ra), (b, rb) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = a + b" " + rb, b + b" " + ra
    ranks_file.write_bytes(b"\n".join(lines))
    with pytest.raises(DozeroError, match="the ranks do not match the recorded fingerprint"):
        load_tokenizer(tmp_path / "b")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DozeroError, match=r"tokenizer 'nope' not found: give 'gpt2', a model folder or a tokenizer"):
        load_tokenizer("nope")
    with pytest.raises(DozeroError, match=r"CharTokenizer.from_text"):
        load_tokenizer("char")
    with pytest.raises(DozeroError, match=r"no tokenizer files in .* \(looked for dozero_tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DozeroError, match="not a tokenizer file dozero knows"):
        load_tokenizer(tmp_path / "x.json")
    with pytest.raises(DozeroError, match="a char tokenizer cannot be written as 'gpt2'"):
        export_tokenizer(CharTokenizer.from_text("ab"), tmp_path, "gpt2")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_encode_decode_stats(capsys, tmp_path, monkeypatch, shared_data):
    (tmp_path / "in.txt").write_text("Hello world")
    assert _run(capsys, "tokenizer", "encode", str(tmp_path / "in.txt")) == (0, "15496 995\n", "")
    assert _run(capsys, "tokenizer", "encode", "--json", str(tmp_path / "in.txt"))[1] == "[15496, 995]\n"
    (tmp_path / "ids.txt").write_text("[15496, 995]")
    code, out, _ = _run(capsys, "tokenizer", "decode", "--text-only", str(tmp_path / "ids.txt"))
    assert (code, out) == (0, "Hello world")
    code, out, _ = _run(capsys, "tokenizer", "stats", "--text", "Hello world", str(shared_data / "tinyshakespeare.txt"))
    assert code == 0 and "vocab_size 50257" in out and "1,115,394 bytes -> 338,025 tokens, 3.30 bytes/token" in out
    assert "'Hello':15496 ' world':995" in out


def test_cli_train_then_use(capsys, tmp_path, shared_data):
    out_dir = tmp_path / "tok"
    code, out, _ = _run(capsys, "tokenizer", "train", str(shared_data / "tinyshakespeare.txt"), "--vocab-size", "400",
                        "--out", str(out_dir), "--export", "hf")  # fmt: skip
    assert code == 0 and "143 merges" in out and "wrote" in out
    assert has_tokenizer(out_dir) and (out_dir / "tokenizer.json").is_file()
    (tmp_path / "in.txt").write_text("First Citizen:")
    code, out, _ = _run(capsys, "tokenizer", "encode", "--tokenizer", str(out_dir), str(tmp_path / "in.txt"))
    assert code == 0 and load_tokenizer(out_dir).decode([int(x) for x in out.split()]) == "First Citizen:"


def test_cli_errors_are_one_line(capsys, tmp_path):
    (tmp_path / "eot.txt").write_text("a<|endoftext|>")
    cases = [
        (("tokenizer", "encode", str(tmp_path / "eot.txt")), "error: the text contains the special token"),
        (("tokenizer", "decode", str(tmp_path / "eot.txt")), "error: decode reads token ids"),
        (("tokenizer", "encode", "--tokenizer", "nope", str(tmp_path / "eot.txt")), "error: tokenizer 'nope' not"),
        (
            ("tokenizer", "train", str(tmp_path), "--vocab-size", "10", "--out", str(tmp_path / "o")),
            "error: vocab_size",
        ),
        (("tokenizer", "encode", str(tmp_path / "missing.txt")), "error: cannot read"),
    ]
    for argv, start in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2 and err.startswith(start) and err.count("\n") == 1, (argv, err)
    assert _run(capsys, "tokenizer", "encode", "--special", "allow", str(tmp_path / "eot.txt"))[1] == "64 50256\n"
    (tmp_path / "ids.txt").write_text("70000")
    code, _, err = _run(capsys, "tokenizer", "decode", str(tmp_path / "ids.txt"))
    assert code == 2 and err.startswith("error: token id 70000 is out of range")


def test_cli_export(capsys, tmp_path, shared_data):
    code, out, _ = _run(capsys, "tokenizer", "export", "gpt2", str(tmp_path), "--format", "tiktoken")
    assert code == 0 and out == f"wrote {tmp_path / 'tokenizer.tiktoken'}\nwrote {tmp_path / 'tiktoken_config.json'}\n"
    assert (tmp_path / "tokenizer.tiktoken").read_bytes() == (shared_data / "gpt2" / "gpt2.tiktoken").read_bytes()


def test_dozero_description_never_reads_outside_its_folder(trained, tmp_path):
    """A dozero_tokenizer.json naming "../x", an absolute path or a link out of its folder as its ranks
    file is refused (before, dozero read that file); a description missing a key is one clear error."""
    import json

    trained.save(tmp_path / "tok")
    meta_path = tmp_path / "tok" / "dozero_tokenizer.json"
    meta = json.loads(meta_path.read_text())
    (tmp_path / "elsewhere.tiktoken").write_bytes((tmp_path / "tok" / meta["ranks"]).read_bytes())
    (tmp_path / "tok" / "link.tiktoken").symlink_to(tmp_path / "elsewhere.tiktoken")
    for name in ["../elsewhere.tiktoken", str(tmp_path / "elsewhere.tiktoken"), "link.tiktoken", ".."]:
        meta_path.write_text(json.dumps({**meta, "ranks": name}))
        with pytest.raises(DozeroError, match=f"the ranks file '{re.escape(name)}' is not in .*reads only that folder"):
            load_tokenizer(tmp_path / "tok")
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "pattern"}))
    with pytest.raises(DozeroError, match="not a complete dozero tokenizer description .KeyError: 'pattern'"):
        load_tokenizer(tmp_path / "tok")


BYTE_LEVEL = {"type": "ByteLevel"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": BYTE_LEVEL}, "KeyError: 'merges'"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "b", "c"]]}, "pre_tokenizer": BYTE_LEVEL},
         "ValueError: too many values to unpack"),
        ({"model": "BPE"}, "not a Hugging Face tokenizer.json .no 'model' object"),
    ],
)  # fmt: skip
def test_broken_tokenizer_json_is_one_clear_error(tmp_path, data, message):
    import json

    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(DozeroError, match=message):
        load_tokenizer(tmp_path)
