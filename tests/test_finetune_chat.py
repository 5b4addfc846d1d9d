"""Chat templates and loss masks (dozero.finetune.chat): SmolLM2's template equals transformers'
apply_chat_template, the mask is checked by hand, ChatML tokens grow a dozero vocabulary."""

from __future__ import annotations

import pytest
import torch

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.finetune.chat import CHATML_TEMPLATE, IM_END, IM_START, add_chat_tokens, chat_template, render
from dozero.model.gpt import GPTModel
from dozero.tokenizer import gpt2

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


def need(module: str):
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def smollm2():
    from dozero.model.gguf import resolve_gguf
    from dozero.tokenizer.gguf import read_gguf_tokenizer

    try:
        path = resolve_gguf("smollm2-135m-instruct")
    except DozeroError as e:
        pytest.skip(str(e))
    return path, read_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def chatml_gpt2():
    """GPT-2's tokenizer with ChatML's two tokens appended, and a tiny model grown to match."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_layers=1))
    return add_chat_tokens(gpt2(), model)


def scored(tok, ids, mask) -> list[str]:
    return [tok.decode([i]) for i, m in zip(ids, mask, strict=True) if m]


def test_smollm2_mask_by_hand(smollm2):
    _, tok = smollm2
    ids, mask = render(tok, CONVERSATION, chat_template(tok))
    # Only the two answers and their <|im_end|>; no system/user turn, no "<|im_start|>assistant\n", no "\n" after.
    assert scored(tok, ids, mask) == ["Paris", ".", IM_END, "Rome", ",", " of", " course", ".", IM_END]
    first = ids.index(tok.special_id(IM_END), ids.index(tok.encode("Paris")[0]))
    assert mask[first] == 1 and mask[first + 1] == 0 and tok.decode([ids[first + 1]]) == "\n"
    assert sum(mask) == 9 and len(ids) == 47


@pytest.mark.slow
def test_smollm2_rendering_equals_transformers(smollm2):
    transformers = need("transformers")
    path, tok = smollm2
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    no_system = CONVERSATION[1:]  # SmolLM2's template then inserts its own system prompt
    for messages in (CONVERSATION, no_system, CONVERSATION[:2]):
        for prompt in (False, True):
            expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
            expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
            ids, mask = render(tok, messages, chat_template(tok), add_generation_prompt=prompt)
            assert ids == expected, (messages, prompt)
            assert (sum(mask) == 0) == (prompt or len(messages) == 2)


def test_chatml_tokens_grow_a_dozero_vocabulary(chatml_gpt2):
    tok, model = chatml_gpt2
    assert (tok.special_id(IM_START), tok.special_id(IM_END)) == (50257, 50258)
    assert model.cfg.vocab_size == 50259 and model.tok_emb.weight.shape == (50259, 16)
    assert model.out_head.weight is model.tok_emb.weight  # still tied
    mean = model.tok_emb.weight[:50257].mean(dim=0)
    assert torch.equal(model.tok_emb.weight[50257], mean) and torch.equal(model.tok_emb.weight[50258], mean)
    logits = model(torch.tensor([[tok.special_id(IM_START), 15496]]))
    assert logits.shape == (1, 2, 50259)
    again, same = add_chat_tokens(tok, model)  # already has them: nothing changes
    assert again is tok and same.cfg.vocab_size == 50259


def test_untied_head_grows_too():
    model = GPTModel(
        ModelConfig(vocab_size=50304, context_length=16, emb_dim=8, n_heads=2, n_layers=1, tie_weights=False)
    )
    tok, model = add_chat_tokens(gpt2(), model)  # a padded vocabulary: rows 50257, 50258 exist, reset to the mean
    assert model.cfg.vocab_size == 50304 and model.out_head.weight.shape == (50304, 8)
    assert torch.equal(model.out_head.weight[50258], model.out_head.weight[:50257].mean(dim=0))


def test_chatml_mask_by_hand(chatml_gpt2):
    tok, _ = chatml_gpt2
    ids, mask = render(tok, CONVERSATION[1:3], CHATML_TEMPLATE)
    text = [tok.decode([i]) for i in ids]
    assert text == [IM_START, "user", "\n", "Capital", " of", " France", "?", IM_END, "\n",
                    IM_START, "ass", "istant", "\n", "Paris", ".", IM_END, "\n"]  # fmt: skip
    assert mask == [0] * 13 + [1, 1, 1, 0]


def test_bad_messages_are_refused(chatml_gpt2):
    tok, _ = chatml_gpt2
    with pytest.raises(DozeroError, match="message 1 has role 'robot'"):
        render(tok, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    with pytest.raises(DozeroError, match="non-empty list"):
        render(tok, [])
    with pytest.raises(DozeroError, match="chat template failed"):
        render(tok, CONVERSATION, "{{ raise_exception('no system messages') }}")


def test_character_tokenizer_cannot_take_chat_tokens():
    from dozero.tokenizer import CharTokenizer

    model = GPTModel(ModelConfig(vocab_size=3, context_length=8, emb_dim=8, n_heads=2, n_layers=1))
    with pytest.raises(DozeroError, match="char tokenizer cannot take special tokens"):
        add_chat_tokens(CharTokenizer.from_text("abc"), model)
