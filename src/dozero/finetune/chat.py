"""Chat templates: OpenAI-style messages -> token ids, plus the loss mask that says which ids are scored.

    from dozero.finetune.chat import render, chat_template, add_chat_tokens
    template = chat_template(tokenizer, model_folder)        # the model's own, else ChatML
    ids, mask = render(tokenizer, messages, template)         # mask[i] = 1: token i is an answer token
    ids, _ = render(tokenizer, messages, template, add_generation_prompt=True)   # a prompt to continue

A message is {"role": "system" | "user" | "assistant", "content": str}. ChatML, the default (OpenAI's
and SmolLM2's format), writes each turn as

    <|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant
    Paris.<|im_end|>

A template is Jinja text, as Hugging Face tokenizers and GGUF files carry it (`tokenizer.chat_template`),
rendered as transformers' `apply_chat_template` renders it (a sandbox with trim_blocks, lstrip_blocks,
loop controls, its `tojson` and `raise_exception`), so the ids are the same (tests/test_finetune_chat.py).

The mask (supervised fine-tuning scores only what the model should learn to say): 1 on the assistant's
content and its end-of-turn token, 0 on system and user turns, on the template's own words
("<|im_start|>assistant\\n") and on padding. It is found from text, not ids: the conversation up to turn
i rendered with the generation prompt is a prefix of the conversation through turn i, and the
difference is the assistant's answer; a token is scored when it starts inside that span. Masking by
position, never by id, is what keeps the end token scored when padding uses the same id.
"""

from __future__ import annotations

from dozero.errors import DozeroError

# The rendering is tokenizer metadata and lives below generate, which renders prompts for --chat too;
# re-exported here so `from dozero.finetune.chat import render_text, CHATML_TEMPLATE` keeps working.
from dozero.tokenizer.chat_template import (  # noqa: F401
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    ROLES,
    chat_template,
    end_of_turn,
    render_text,
    special_text,
)


def check_messages(messages, where: str = "conversation") -> list[dict]:
    """`messages` as a list of {"role", "content"} dicts with known roles; DozeroError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise DozeroError(f"{where}: 'messages' should be a non-empty list of {{role, content}} objects")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DozeroError(f"{where}: message {n} should be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise DozeroError(f"{where}: message {n} has role {m.get('role')!r}; known roles: {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def answer_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character spans [start, end) of each assistant answer,
    from the answer's first character through its end-of-turn text (what follows it, "\\n", is not scored)."""
    text = render_text(tokenizer, messages, template)
    end_text = end_of_turn(template, tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_text(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        through = render_text(tokenizer, messages[: i + 1], template)
        if not (text.startswith(through) and through.startswith(before)):
            raise DozeroError(
                "the chat template does not render a conversation as a growing prefix (it rewrites earlier "
                "turns); dozero cannot tell which tokens are the answer"
            )
        cut = through.rfind(end_text, len(before)) if end_text else -1
        stop = cut + len(end_text) if cut >= 0 else len(through.rstrip())
        spans.append((len(before), stop))
    return text, spans


def render(tokenizer, messages: list[dict], template: str | None = None, add_generation_prompt: bool = False):
    """(ids, mask): the conversation's token ids and 1 where a token is part of an assistant answer (its
    content and end-of-turn token), 0 elsewhere. With `add_generation_prompt`, the prompt that asks for
    the next answer (mask all 0)."""
    messages = check_messages(messages)
    template = template or chat_template(tokenizer)
    if add_generation_prompt:
        ids = tokenizer.encode(render_text(tokenizer, messages, template, True), special="allow")
        return ids, [0] * len(ids)
    text, spans = answer_spans(tokenizer, messages, template)
    ids = tokenizer.encode(text, special="allow")
    # Byte offset of each token's start; spans are converted from characters to bytes once.
    starts, at = [], 0
    for i in ids:
        starts.append(at)
        at += len(tokenizer.decode_bytes([i]))
    byte_spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
    mask = [int(any(a <= s < b for a, b in byte_spans)) for s in starts]
    return ids, mask


def add_chat_tokens(tokenizer, model):
    """(tokenizer, model) that know ChatML's <|im_start|> and <|im_end|>: unchanged when the tokenizer has
    them (SmolLM2), else a BPE tokenizer with the two appended as special tokens and the model's
    embedding and output rows grown to match (in place; the model is returned).

    New rows start at the mean of the existing embedding rows (Hewitt 2021, "Initializing New Word
    Embeddings for Pretrained Language Models"): a random row can have a large dot product with the
    hidden states and make the new token the most likely output everywhere before any training; the
    mean starts it as an average token, and the fine-tuning data teaches where it belongs."""
    import dataclasses

    import torch

    from dozero.tokenizer import BPETokenizer

    if all(t in getattr(tokenizer, "special_tokens", {}) for t in (IM_START, IM_END)):
        return tokenizer, model
    if not isinstance(tokenizer, BPETokenizer):
        raise DozeroError(
            f"the {tokenizer.kind} tokenizer cannot take special tokens; chat fine-tuning needs a BPE model "
            "(e.g. one trained with --tokenizer gpt2)"
        )
    V = tokenizer.vocab_size
    new = {**tokenizer.special_tokens, IM_START: V, IM_END: V + 1}
    grown = BPETokenizer(tokenizer.ranks, new, tokenizer.pattern, name=tokenizer.name)
    old_rows = model.cfg.vocab_size
    rows = max(old_rows, V + 2)
    with torch.no_grad():
        emb = model.tok_emb.weight
        mean = emb[:V].mean(dim=0)
        weight = torch.cat([emb, mean.expand(rows - old_rows, -1)]) if rows > old_rows else emb.clone()
        weight[V : V + 2] = mean  # rows the tokenizer never used (a padded vocabulary) are reset too
        model.tok_emb = torch.nn.Embedding.from_pretrained(weight, freeze=False)
        if model.cfg.tie_weights:
            model.out_head = torch.nn.Linear(weight.shape[1], rows, bias=False)
            model.out_head.weight = model.tok_emb.weight
        else:
            head = model.out_head.weight
            head_mean = head[:V].mean(dim=0)
            grown_head = torch.cat([head, head_mean.expand(rows - old_rows, -1)]) if rows > old_rows else head.clone()
            grown_head[V : V + 2] = head_mean
            model.out_head = torch.nn.Linear(weight.shape[1], rows, bias=False)
            model.out_head.weight = torch.nn.Parameter(grown_head)
    model.cfg = dataclasses.replace(model.cfg, vocab_size=rows)
    return grown, model
