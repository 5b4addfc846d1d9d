"""Rollouts: sample k answers per prompt with dozero's batched KV-cache engine (generate/engine.py).

    ids = prompt_ids(tokenizer, template, "What is 2+2?")             # the chat prompt, generation turn open
    completions = rollout(model, [ids], k=4, config=GenerationConfig(temperature=1.0, max_new_tokens=16), end_id=end)

All k x prompts rows go through the engine as ONE batch (left-padded; one prefill, then one decode
step per token for every row), which is what makes sampling the RL bottleneck cheap: the cost of a
decode step hardly grows with the batch on a CPU until the matrix products stop being memory-bound.
A completion keeps its end-of-turn token when the model wrote one, so the policy is also trained
on when to stop.
"""

from __future__ import annotations

import dataclasses

from dozero.finetune.chat import end_of_turn, render
from dozero.generate.config import GenerationConfig
from dozero.generate.engine import generate_ids


def prompt_ids(tokenizer, template: str, prompt: str | list[dict]) -> list[int]:
    """The prompt (a user message, or a list of messages) rendered with the assistant's turn open."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render(tokenizer, messages, template, add_generation_prompt=True)[0]


def end_id(tokenizer, template: str) -> int | None:
    """The id that closes an answer: ChatML's <|im_end|>, else the end-of-text token."""
    text = end_of_turn(template, tokenizer)
    ids = tokenizer.encode(text, special="allow") if text else []
    return ids[0] if len(ids) == 1 else tokenizer.eot_id


def rollout(model, prompts: list[list[int]], k: int, config: GenerationConfig, end: int | None) -> list[list[int]]:
    """k completions (token ids, the end token included when written) of each prompt, prompt-major:
    rows [p*k, (p+1)*k) belong to prompt p. Sampled with `config` (its seed makes it reproducible)."""
    from dozero.generate.layout import _TRANSPOSED_HEADS

    # A model in training mode never reuses the engine's transposed copy of its output head, but the
    # held-out evaluation samples in eval mode, where the copy is reused while weight._version is
    # unchanged, and fused AdamW steps in place WITHOUT bumping _version (torch 2.13): with full
    # fine-tuning every evaluation would sample from the first one's head. Forget the copy (tested:
    # test_held_out_rollouts_after_a_fused_adamw_step_use_the_new_head).
    _TRANSPOSED_HEADS.pop(model.out_head, None)
    rows = [ids for ids in prompts for _ in range(k)]
    config = dataclasses.replace(config, stop=(), stop_at_eot=True)
    out = generate_ids(model, rows, config, eot_id=end)
    return [ids + [end] if end is not None and len(ids) < config.max_new_tokens else ids for ids in out]


def sample_answers(model, tokenizer, template: str, prompts: list[str], k: int, seed: int = 0, **sampling):
    """k answer texts per prompt (a list of k strings for each prompt)."""
    config = GenerationConfig(**{"temperature": 1.0, "max_new_tokens": 64, **sampling, "seed": seed})
    end = end_id(tokenizer, template)
    completions = rollout(model, [prompt_ids(tokenizer, template, p) for p in prompts], k, config, end)
    texts = [tokenizer.decode([t for t in ids if t != end]) for ids in completions]
    return [texts[p * k : (p + 1) * k] for p in range(len(prompts))]
