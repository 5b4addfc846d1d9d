"""The generation loop: prefill the prompts once, then decode one token at a time from a KV cache.

    prompts --encode--> ids --prefill--> logits of the last position --sample--> next token
                                 ^                                                   |
                                 +--------- decode_one_token (T = 1, cache) <--------+

Several prompts run as one batch: shorter prompts are padded on the LEFT, so every row's last token
sits in the same cache slot; an attention mask hides the padding and `position_ids` restart at 0
where each real prompt starts. Each row stops on its own (end-of-text, a stop string, or
`max_new_tokens`); the loop ends when all rows have.

When a row reaches the model's context length the window slides: GPT-2's position embeddings are
absolute, so cached keys cannot be shifted to new positions; instead the oldest quarter of the
tokens is dropped and the rest are prefilled again from position 0 (one prefill per slide, then
cheap decoding again for another quarter of the context). Every row slides when its own window is
full, so a prompt gives the same tokens alone or in a batch. With RoPE (Llama-style models) only
distances between positions matter, so the same re-read gives exactly what a model started on the
kept window computes; it is also what keeps RoPE's angles within the context it was trained on.

Run it from the shell with `dozero generate --model RUN "prompt"`, or from Python with
`dozero.generate.generate(model, tokenizer, "prompt")`.

Shape legend: B batch (prompts), T tokens in this call, S cache slots, V vocab_size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from dozero.errors import DozeroError
from dozero.generate.config import GenerationConfig
from dozero.generate.layout import is_decoding_layout, one_token_step, transposed_head
from dozero.generate.sampling import sample_next_token


def encode_prompt(tokenizer, prompt: str, context_length: int) -> list[int]:
    """Token ids of one prompt, ready for the model.

    An empty prompt starts from end-of-text (as every training document does); a tokenizer without
    one (a character vocabulary) starts from a newline instead. A prompt longer than the context
    keeps its last `context_length` tokens, with a warning.
    """
    ids = tokenizer.encode(prompt, special="allow") if prompt else []
    if not ids:
        if tokenizer.eot_id is not None:
            ids = [tokenizer.eot_id]
        else:
            try:
                ids = tokenizer.encode("\n")
            except DozeroError:
                ids = []
            if not ids:
                raise DozeroError(
                    "the prompt is empty and this tokenizer has neither an end-of-text token nor a newline to "
                    "start from; give a prompt"
                )
    if len(ids) > context_length:
        warnings.warn(
            f"the prompt has {len(ids)} tokens, more than the model's context of {context_length}; "
            f"keeping its last {context_length} tokens",
            stacklevel=3,
        )
        ids = ids[-context_length:]
    return ids


class BatchState:
    """Where a batch stands in its KV cache: the cache slot of the next token, padding, masks.

    All per-step tensors are views of tensors made once at prefill, so decoding a token allocates
    nothing and never asks the GPU for a number (no host sync until the token ids are read).
    """

    def __init__(self, model, rows: list[list[int]], cache_len: int, compiled: bool = False):
        device = model.tok_emb.weight.device
        self.model = model
        self.compiled = compiled
        self.length = max(len(r) for r in rows)  # slots filled so far (prompts are left-padded to this)
        pads = torch.tensor([self.length - len(r) for r in rows], device=device)  # (B,)
        self.padded = any(len(r) < self.length for r in rows)
        self.slots = torch.arange(cache_len, device=device)  # (S,)
        self.pads = pads[:, None]  # (B, 1)
        # Row b may look at slot j once j holds a real token: j >= pads[b].
        self.key_valid = (self.slots[None, :] >= self.pads)[:, None, None, :]  # (B, 1, 1, S)
        self.all_valid = torch.ones(1, 1, 1, cache_len, dtype=torch.bool, device=device)  # (1, 1, 1, S)
        model.setup_kv_cache(len(rows), cache_len)
        # One row, eager, on a laid-out CPU model: decode through the planned step (layout.py), else the model.
        self.one_token = None if compiled else one_token_step(model, len(rows), cache_len, self.length)
        self.prompt = torch.tensor([[0] * (self.length - len(r)) + r for r in rows], device=device)  # (B, T)

    def prefill(self) -> torch.Tensor:
        """Run the (padded) prompts through the model, filling the cache. Returns last logits (B, V)."""
        T = self.length
        input_pos = self.slots[:T]
        causal = self.slots[:T, None] >= self.slots[None, :T]  # (T, T): query slot >= key slot
        # Padding queries may see themselves, so no softmax row is empty (which would give NaN keys
        # and values in deeper layers); real queries never look at padding.
        itself = self.slots[:T, None] == self.slots[None, :T]
        mask = causal[None, None] & (self.key_valid[..., :T] | itself)  # (B, 1, T, T)
        position_ids = (input_pos[None, :] - self.pads).clamp(min=0)  # (B, T)
        logits = self.model(self.prompt, input_pos, position_ids, mask, last_only=True)  # (B, 1, V)
        return logits[:, -1]

    def decode_one_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B,) at the next cache slot. Returns its logits (B, V)."""
        s = self.length
        input_pos = self.slots[s : s + 1]  # (1,)
        self.length += 1
        if self.compiled:
            step = compiled_decode_step(self.slots.device.type)
            return step(self.model, tokens[:, None], input_pos, self.pads, self.key_valid, self.slots)
        if self.one_token is not None:
            return self.one_token(tokens, input_pos, s)  # (1, V)
        # Eager: attend to the s + 1 filled slots only (shapes grow by one each step).
        mask = (self.key_valid if self.padded else self.all_valid)[..., : s + 1]  # (B or 1, 1, 1, s + 1)
        position_ids = input_pos[None, :] - self.pads if self.padded else input_pos  # (B, 1) or (1,)
        return self.model(tokens[:, None], input_pos, position_ids, mask)[:, -1]  # (B, V)


def decode_step_full_cache(model, tokens, input_pos, pads, key_valid, slots):
    """One decode step with shapes that never change (the whole cache, empty slots masked), the form
    `torch.compile` turns into one kernel sequence without recompiling at every new length.
    tokens (B, 1), input_pos (1,), pads (B, 1), key_valid (B, 1, 1, S), slots (S,) -> logits (B, V)."""
    mask = key_valid & (slots <= input_pos)  # (B, 1, 1, S): real tokens up to this one
    position_ids = input_pos[None, :] - pads  # (B, 1)
    return model(tokens, input_pos, position_ids, mask)[:, -1]


# Compiled decoding rounds the cache up to a multiple of this many slots, so calls of different lengths
# (chat turns, prompts) share one compiled step instead of compiling for each (10-150 s each at 135M).
COMPILED_CACHE_STEP = 512


@cache
def compiled_decode_step(device_type: str):
    """`decode_step_full_cache` compiled once per process: the first call of each shape takes 10-30 s
    on a CPU; later steps and later generations reuse it. On CPU the C++ wrapper calls the kernels
    without Python in between: 0.52 instead of 0.66 ms per token on the shakespeare-char shape
    (1 thread; eager: 1.1 ms). Inductor's `freezing` was 50x slower here (it recompiled), so it is off."""
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(decode_step_full_cache, dynamic=False, options=options)


def generate_tokens(
    model,
    prompts: list[list[int]],
    config: GenerationConfig,
    eot_id: int | None = None,
    finished=None,
    num_tokens: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, step by step, the next token of every row (None for rows that have finished).

    `finished` (a list of B bools, made here if not given) is shared with the caller, who may end a
    row early (a stop string in its text) by setting `finished[row] = True` between steps.
    `num_tokens`: draw only ids below it (the tokenizer's size, when the model has padding rows).
    """
    ctx = model.cfg.context_length
    n = model.cfg.vocab_size if num_tokens is None else min(num_tokens, model.cfg.vocab_size)
    rows = [list(r[-ctx:]) for r in prompts]  # every row: its prompt and generated tokens so far
    finished = [False] * len(rows) if finished is None else finished
    if config.max_new_tokens == 0:
        return
    generator = seeded_generator(model.tok_emb.weight.device, config.seed)
    cache_len = min(ctx, max(len(r) for r in rows) + config.max_new_tokens)
    if config.compile:  # the compiled step is specialized to the cache's length: a few lengths, few compiles
        cache_len = min(ctx, -(-cache_len // COMPILED_CACHE_STEP) * COMPILED_CACHE_STEP)
    starts = [0] * len(rows)  # where each row's window begins in `rows[b]`

    # Inference mode is entered around the tensor work only, never across a `yield`: the caller's
    # code between steps (printing, training) must not run in it.
    with torch.inference_mode():
        counts = token_counts(rows, model.cfg.vocab_size, generator.device) if config.uses_counts else None
        state = BatchState(model, rows, cache_len, config.compile)
        logits = state.prefill()
    for step in range(config.max_new_tokens):
        with torch.inference_mode():
            tokens = sample_next_token(logits[:, :n], config, generator, None if counts is None else counts[:, :n])
            ids = tokens.tolist()  # the one host sync per step: the ids decide stopping and streaming
        out = []
        for b, t in enumerate(ids):
            finished[b] = finished[b] or (config.stop_at_eot and t == eot_id)
            out.append(None if finished[b] else t)
            if not finished[b]:
                rows[b].append(t)
        yield out
        if all(finished) or step == config.max_new_tokens - 1:
            return
        with torch.inference_mode():
            if counts is not None:
                counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=counts.dtype))
            if state.length < ctx:
                logits = state.decode_one_token(tokens)
            else:  # the window is full: re-read the last tokens of each row from position 0
                state = BatchState(model, slide_windows(rows, starts, finished, ctx), ctx, config.compile)
                logits = state.prefill()


def seeded_generator(device, seed: int | None) -> torch.Generator:
    """The random source of sampling: `seed` gives the same draws every time, None a fresh seed."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def token_counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """Occurrences of each token in each row (B, V), for the repetition and frequency penalties."""
    counts = torch.zeros(len(rows), vocab_size, device=device)  # (B, V)
    for b, r in enumerate(rows):
        counts[b].index_add_(0, torch.tensor(r, device=device), torch.ones(len(r), device=device))
    return counts


def slide_windows(rows: list[list[int]], starts: list[int], finished: list[bool], ctx: int) -> list[list[int]]:
    """The tokens to re-read when the cache is full, one window per row; moves `starts` (in place).

    Each row slides when ITS window passes the context, keeping its last three quarters, exactly as it
    would alone; the others are re-read unchanged. A finished row shrinks to one token.
    """
    keep = max(1, ctx - ctx // 4)
    warnings.warn(
        f"generation reached the context length ({ctx} tokens): sliding the window, keeping the last "
        f"{keep} tokens (re-read from position 0)",
        stacklevel=3,  # past generate_tokens: the code that iterates over it (stream_batch, generate_ids)
    )
    for b, r in enumerate(rows):
        if finished[b]:
            starts[b] = len(r) - 1
        elif len(r) - starts[b] > ctx:
            starts[b] = len(r) - keep
    return [r[start:] for r, start in zip(rows, starts, strict=True)]


@contextmanager
def generation_mode(model):
    """Eval mode, a CPU-friendly output head, and no KV cache left behind, so a model in training can
    generate and carry on exactly as it was."""
    was_training, head = model.training, model.out_head
    model.eval()
    # An int8/int4 head (model/quantized.py) has its own kernel and no float weight to lay out; a head
    # spread over processes (a DTensor: dozero.parallel) keeps its own.
    plain = isinstance(head, torch.nn.Linear) and type(head.weight.data) is torch.Tensor
    if plain and head.weight.device.type == "cpu" and not is_decoding_layout(head.weight):
        model.out_head = transposed_head(head, reuse=not was_training)  # a training model changes under us
    try:
        yield model
    finally:
        model.out_head = head  # the original module: weight tying with tok_emb is untouched
        model.clear_kv_cache()
        model.train(was_training)


def generate_ids(model, prompts: list[list[int]], config: GenerationConfig, eot_id=None) -> list[list[int]]:
    """New token ids for each prompt (stop strings need text: see `dozero.generate.stream`)."""
    out = [[] for _ in prompts]
    with generation_mode(model):
        for tokens in generate_tokens(model, prompts, config, eot_id):
            for b, t in enumerate(tokens):
                if t is not None:
                    out[b].append(t)
    return out
