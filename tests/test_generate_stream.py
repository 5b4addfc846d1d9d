"""Streaming (dozero.generate.stream): pieces join to the full text, multi-byte characters split across
GPT-2 tokens included, and text that may start a stop string is held back."""

from __future__ import annotations

import pytest
import torch

from dozero.config import ModelConfig
from dozero.generate import generate, stream
from dozero.generate.engine import GenerationConfig, generate_ids
from dozero.generate.stream import TextSink
from dozero.model.gpt import GPTModel

# Every character here takes one to three GPT-2 tokens, and most tokens hold part of a character.
CYCLE_TEXT = "😀世界é日本語"


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from dozero.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


def replay_model(tokenizer, text: str) -> GPTModel:
    """A GPT-2-vocabulary model whose greedy continuation of any token of `text` is the next token of
    `text` (cyclically): embeddings are one-hot, the blocks add nothing, and the output head maps each
    token's normalized embedding to its successor. Its tokens must be distinct."""
    ids = tokenizer.encode(text)
    assert len(set(ids)) == len(ids)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, emb_dim=32, n_heads=2, n_layers=1)
    cfg.tie_weights = False
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for p in (model.final_norm.scale, model.trf_blocks[0].norm1.scale, model.trf_blocks[0].norm2.scale):
            p.fill_(1.0)
        for i, token in enumerate(ids):
            model.tok_emb.weight[token, i] = 1.0
        normalized = model.final_norm(model.tok_emb.weight[ids])  # (n, C)
        for i in range(len(ids)):
            model.out_head.weight[ids[(i + 1) % len(ids)]] = normalized[i]
    return model


def test_stream_joins_to_the_text_with_multibyte_characters(gpt2_tokenizer):
    model = replay_model(gpt2_tokenizer, CYCLE_TEXT)
    n_tokens = len(gpt2_tokenizer.encode(CYCLE_TEXT))
    settings = {"temperature": 0.0, "max_new_tokens": 2 * n_tokens, "stop_at_eot": False}
    pieces = list(stream(model, gpt2_tokenizer, "😀", **settings))
    expected = (CYCLE_TEXT[1:] + CYCLE_TEXT)[: len(CYCLE_TEXT) * 2 - 1] + "😀"  # continues the cycle after 😀
    assert "".join(pieces) == expected
    assert "".join(pieces) == generate(model, gpt2_tokenizer, "😀", **settings)
    ids = generate_ids(model, [gpt2_tokenizer.encode("😀")], GenerationConfig(**settings))[0]
    assert "".join(pieces) == gpt2_tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces)  # no half character was ever shown
    assert len(pieces) < len(ids)  # tokens that end inside a character yield nothing until it completes


def test_text_sink_equals_decode_on_any_token_order(gpt2_tokenizer):
    """Random orders of partial-character tokens give invalid UTF-8; streaming still equals `decode`."""
    pool = gpt2_tokenizer.encode("😀世界🤖🎉é 日本語のテキスト 🦙 hello")
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = [pool[i] for i in torch.randint(0, len(pool), (20,), generator=g).tolist()]
        sink = TextSink(gpt2_tokenizer)
        streamed = "".join(sink.add(t) for t in ids) + sink.close()
        assert streamed == gpt2_tokenizer.decode(ids)


def test_text_sink_holds_back_a_possible_stop_string(gpt2_tokenizer):
    text = "Hello wor, hello world! Done."
    ids = gpt2_tokenizer.encode(text)
    sink = TextSink(gpt2_tokenizer, stop=("world",))
    pieces = [sink.add(t) for t in ids]
    assert "".join(pieces) + sink.close() == "Hello wor, hello "
    assert sink.stopped
    # " wor" was held while it could still become " world", then released when it could not.
    assert all("world" not in p for p in pieces)
    sink = TextSink(gpt2_tokenizer, stop=("\n\n",))
    assert "".join(sink.add(t) for t in gpt2_tokenizer.encode("a\nb\n")) + sink.close() == "a\nb\n"


def test_stream_with_stop_string_across_multibyte_tokens(gpt2_tokenizer):
    model = replay_model(gpt2_tokenizer, CYCLE_TEXT)
    settings = {"temperature": 0.0, "max_new_tokens": 40, "stop_at_eot": False, "stop": ("日本",)}
    pieces = list(stream(model, gpt2_tokenizer, "😀", **settings))
    assert "".join(pieces) == "世界é"
    assert generate(model, gpt2_tokenizer, ["😀", "世界"], **settings) == ["世界é", "é"]
