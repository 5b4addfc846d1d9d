"""Log-likelihood scoring (dozero.evaluate.scoring) against Hugging Face transformers on the same model."""

from __future__ import annotations

import pytest
import torch

from dozero.config import ModelConfig
from dozero.evaluate.scoring import encode_pair, pack_lines, pack_row, plan_rows, score_requests
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import gpt2

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random-weight GPT-2-shaped model (GPT-2's vocabulary, small body), saved by dozero's HF export
    and read back by transformers: the same weights in both."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    model = GPTModel(cfg)
    for p in model.parameters():  # bigger weights than init so choices differ clearly
        torch.nn.init.normal_(p, std=0.2)
    folder = tmp_path_factory.mktemp("hf")
    save_model(model, folder, tokenizer=gpt2(), format="hf")
    theirs = GPT2LMHeadModel.from_pretrained(folder).eval()
    return load_model(folder), theirs, gpt2()


def hf_loglikelihood(theirs, context: list[int], continuation: list[int], ctx_len: int) -> float:
    """lm-eval's HFLM._loglikelihood_tokens for one request, written out."""
    whole = (context + continuation)[-(ctx_len + 1) :]
    inp = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logprobs = theirs(inp).logits[0].float().log_softmax(-1)  # (T, V)
    n = len(continuation)
    picked = logprobs[-n:].gather(1, torch.tensor(whole[-n:])[:, None])
    return float(picked.sum())


PAIRS = [
    ("Question: Which is a fruit?\nAnswer:", " apple"),
    ("Question: Which is a fruit?\nAnswer:", " a red brick"),
    ("Question: Which is a fruit?\nAnswer:", " the moon"),
    ("The cat sat on the ", "mat."),  # trailing space moves to the continuation
    ("", " Hello there"),  # empty context: end-of-text starts it
    ("Sarah was a better surgeon than Maria so Sarah", " always got the easier cases."),
    ("Sarah was a better surgeon than Maria so Maria", " always got the easier cases."),
    ("word " * 80, " end of a long context"),  # longer than the model: cut from the left
]


def test_loglikelihoods_equal_transformers(models):
    ours, theirs, tok = models
    requests = [encode_pair(tok, c, x) for c, x in PAIRS]
    scores = score_requests(ours, requests, batch_tokens=96)  # small batches: several rows, padding
    expected = [hf_loglikelihood(theirs, c, x, 64) for c, x in requests]
    assert scores.logprobs == pytest.approx(expected, abs=1e-4, rel=1e-5)
    assert scores.truncated == 1
    assert len(set(scores.logprobs[:3])) == 3  # the three choices really differ


def test_batch_size_does_not_change_scores(models):
    ours, _, tok = models
    requests = [encode_pair(tok, c, x) for c, x in PAIRS]
    one = score_requests(ours, requests, batch_tokens=1).logprobs
    many = score_requests(ours, requests, batch_tokens=100_000).logprobs
    assert one == pytest.approx(many, abs=1e-4)


def test_encode_pair_matches_lm_eval_rules():
    tok = gpt2()
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat.")
    assert ctx == tok.encode("The cat sat on the")
    assert tok.decode(cont) == " mat."
    ctx, cont = encode_pair(tok, "", "Hello")
    assert ctx == [tok.eot_id] and cont == tok.encode("Hello")


def test_shared_context_is_one_row():
    rows, truncated = plan_rows([([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([9], [4])], context_length=10)
    assert list(rows) == [(1, 2, 3), (9,)] and truncated == 0
    ids, pos, seg, where = pack_row((1, 2, 3), [[4, 5], [6, 7, 8]])
    assert ids == [1, 2, 3, 4, 6, 7]
    assert pos == [0, 1, 2, 3, 3, 4]  # each continuation restarts after the context
    assert seg == [0, 0, 0, 1, 2, 2]
    assert where == [[2, 3], [2, 4, 5]]  # the context's last position predicts every first token


def test_short_rows_share_a_line_and_do_not_see_each_other(models):
    items = [(0, [7, 8]), (1, [9])]
    lines = pack_lines([(*pack_row(p, [[7, 8], [9]]), items) for p in [(1, 2, 3, 4, 5, 6), (1, 2), (3,)]])
    assert [len(x[0]) for x in lines] == [7, 5]  # rows of 7, 3 and 2 tokens: the 3 and the 2 share a line
    ids, pos, seg, where, items, qid = lines[1]
    assert ids == [1, 2, 7, 3, 7] and pos == [0, 1, 2, 0, 1] and qid == [0, 0, 0, 1, 1]
    assert where == [[1, 2], [1], [3, 4], [3]]  # the second row's indices moved by the first's length
    # And the scores: packed lines (batch_tokens=100_000 puts every row of PAIRS on few lines) equal
    # one row per batch, where nothing is packed.
    ours, _, tok = models
    requests = [encode_pair(tok, c, x) for c, x in PAIRS]  # the long last one leaves room for the others
    grouped, _ = plan_rows(requests, 64)
    packed = pack_lines([(*pack_row(p, [c for _, c in it]), it) for p, it in grouped.items()])
    assert len(packed) < len(grouped)
    assert score_requests(ours, requests, 100_000).logprobs == pytest.approx(
        score_requests(ours, requests, 1).logprobs, abs=1e-4
    )


def test_llama_shape_loglikelihoods_equal_transformers(tmp_path):
    """RoPE, grouped-query attention and SwiGLU: positions restart per continuation inside a packed row."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    cfg = ModelConfig(
        vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, n_kv_heads=2,
        norm="rmsnorm", pos_emb="rope", ff="swiglu", ff_hidden_dim=64, bias=False,
    )  # fmt: skip
    model = GPTModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_model(model, tmp_path, tokenizer=gpt2(), format="hf")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tok = gpt2()
    requests = [encode_pair(tok, c, x) for c, x in PAIRS]
    ours = score_requests(load_model(tmp_path), requests, batch_tokens=96).logprobs
    assert ours == pytest.approx([hf_loglikelihood(theirs, c, x, 64) for c, x in requests], abs=1e-4, rel=1e-5)
