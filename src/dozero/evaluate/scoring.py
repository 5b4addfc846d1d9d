"""Log-likelihood of continuations given contexts, batched: the engine under every multiple-choice task.

A request is (context ids, continuation ids); its score is the sum of log p(continuation token |
everything before it), as lm-eval's Hugging Face backend computes it: the model reads
context + continuation[:-1], and the last len(continuation) positions give the probabilities.

Efficiency. The choices of one question share their context, so the context is read ONCE: one row
holds the context followed by every continuation, and an attention mask lets each continuation see
the context and itself only, with positions restarting after the context (a "prefix tree" row):

    row:       c0 c1 c2 | a0 a1 | b0 b1 b2          attention of b1: c0 c1 c2 b0 b1
    positions:  0  1  2 |  3  4 |  3  4  5

Short rows are laid end to end into lines as long as the longest row (the mask keeps them apart, and
positions restart with each row), and lines into batches of at most `batch_tokens` padded tokens, so
almost no work is spent on padding. Each row computes the same function as separate sequences would.

A KV cache is the other way to read a context once (its keys and values in one forward pass, the
continuations reading them in a second): the same arithmetic in two passes, with more padding.
Measured slower, 2.2x (HellaSwag, 50 questions, 2 threads, load ~16, same picks on every question):
GPT-2 124M 1.07 vs 0.49 items/s, SmolLM2-135M 0.68 vs 0.31 (`benchmarks/eval_speed.py --kv-cache`).

Too long: a request longer than the model's context keeps its last context_length + 1 tokens (the
context is cut from the left, as lm-eval does); `Scores.truncated` counts them.

Shape legend: B rows in a batch, T tokens per row, V vocab_size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dozero.errors import DozeroError


def start_token(tokenizer) -> list[int]:
    """What an empty context is: end-of-text (lm-eval's prefix token for GPT-2), else a newline."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    ids = tokenizer.encode("\n")
    if not ids:
        raise DozeroError("this tokenizer has neither end-of-text nor a newline to start an empty context from")
    return ids[-1:]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: spaces ending the context move to the continuation, and the continuation's
    ids are those of context + continuation after the context's ids (so a merge across the seam counts)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return start_token(tokenizer), tokenizer.encode(continuation, special="allow")
    whole = tokenizer.encode(context + continuation, special="allow")
    context_ids = tokenizer.encode(context, special="allow")
    return context_ids, whole[len(context_ids) :]


@dataclass
class Scores:
    logprobs: list[float]
    """Per request: sum of the continuation tokens' log-probabilities (nats)."""
    greedy: list[bool]
    """Per request: every continuation token was the model's most likely one."""
    truncated: int = 0
    """Requests whose context was cut from the left to fit the model."""
    seconds: float = 0.0


def plan_rows(requests: list[tuple[list[int], list[int]]], context_length: int):
    """Group requests by their (truncated) context: {context tuple: [(request index, continuation)]}."""
    rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    truncated = 0
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            raise DozeroError(f"request {i} has an empty continuation: nothing to score")
        seq = (context + continuation)[-(context_length + 1) :]
        truncated += len(context) + len(continuation) > context_length + 1
        n = min(len(continuation), len(seq) - 1)  # a continuation longer than the model: its last tokens
        rows.setdefault(tuple(seq[: len(seq) - n]), []).append((i, seq[len(seq) - n :]))
    return rows, truncated


def pack_row(prefix: tuple[int, ...], conts: list[list[int]]):
    """Token ids, positions, segment ids (0 = context, k = k-th continuation) and, per continuation,
    the row indices whose logits predict its tokens."""
    ids, pos, seg = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    where = []
    for k, cont in enumerate(conts, start=1):
        start = len(ids)
        body = cont[:-1]  # the last token is only predicted, never read
        ids += body
        pos += range(len(prefix), len(prefix) + len(body))
        seg += [k] * len(body)
        where.append([len(prefix) - 1] + list(range(start, start + len(body))))
    return ids, pos, seg, where


def pack_lines(rows: list) -> list:
    """Rows laid end to end into lines no longer than the longest row (first fit, longest first), so a
    batch pads almost nothing: sorting alone left 7-19% of HellaSwag's, ARC's and PIQA's batches padding
    (SmolLM2 tokenizer, 200 questions, 2,048-token batches). Each token keeps its row number (`qid`): the
    mask stops a question from seeing its neighbour, and positions restart with every row."""
    rows = sorted(rows, key=lambda r: -len(r[0]))
    limit = len(rows[0][0]) if rows else 0
    lines: list[list] = []
    for ids, pos, seg, where, items in rows:
        line = next((x for x in lines if len(x[0]) + len(ids) <= limit), None)
        if line is None:
            line = [[], [], [], [], [], []]
            lines.append(line)
        offset, qid = len(line[0]), len(line[5]) and line[5][-1] + 1
        line[0] += ids
        line[1] += pos
        line[2] += seg
        line[3] += [[i + offset for i in w] for w in where]
        line[4] += items
        line[5] += [qid] * len(ids)
    return [tuple(x) for x in lines]


def batches(rows: list, batch_tokens: int):
    """Rows (longest first) cut into batches whose padded size B * T stays within `batch_tokens`."""
    rows = sorted(rows, key=lambda r: -len(r[0]))
    batch: list = []
    for row in rows:
        if batch and (len(batch) + 1) * len(batch[0][0]) > batch_tokens:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def score_batch(model, head, batch, device) -> list[tuple[int, float, bool]]:
    """Run one padded batch; (request index, log-likelihood, greedy) for every continuation in it.

    The model runs without its output head (`head` is applied afterwards to the positions that
    predict a continuation token only): the context's other positions need no logits, which are the
    largest tensor here (tokens x vocab_size)."""
    T = len(batch[0][0])
    pad = lambda xs, v: [x + [v] * (T - len(x)) for x in xs]  # noqa: E731
    ids = torch.tensor(pad([r[0] for r in batch], 0), device=device)  # (B, T)
    pos = torch.tensor(pad([r[1] for r in batch], 0), device=device)  # (B, T)
    seg = torch.tensor(pad([r[2] for r in batch], -1), device=device)  # (B, T); -1 = padding
    qid = torch.tensor(pad([r[5] for r in batch], -1), device=device)  # (B, T): which row of the line
    q = torch.arange(T, device=device)
    causal = q[None, :, None] >= q[None, None, :]  # (1, T, T): query index >= key index
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    own_row = qid[:, :, None] == qid[:, None, :]  # (B, T, T)
    mask = causal & own_row & (same | (seg[:, None, :] == 0))  # see your row's context, and your own segment
    hidden = model(ids, q, pos, mask[:, None])  # (B, T, C): final_norm's output, the head is off
    rows, cols, targets, owner, requests = [], [], [], [], []
    for b, (_, _, _, where, conts, _) in enumerate(batch):
        for positions, (index, cont) in zip(where, conts, strict=True):
            rows += [b] * len(positions)
            cols += positions
            targets += cont
            owner += [len(requests)] * len(cont)
            requests.append(index)
    targets_t = torch.tensor(targets, device=device)  # (N,)
    owner_t = torch.tensor(owner, device=device)  # (N,)
    logits = head(hidden[rows, cols]).float()  # (N, V)
    target_logits = logits.gather(1, targets_t[:, None])[:, 0]  # (N,)
    # log_softmax at the targets only: two reductions over (N, V) instead of writing an (N, V) log_softmax
    # and reading it twice (gather, argmax); 0.4 GB for 500 HellaSwag questions with GPT-2's vocabulary.
    picked = target_logits - logits.logsumexp(-1)  # (N,)
    missed = (target_logits < logits.amax(-1)).float()  # (N,) 1 where the target was not the top token
    sums = torch.zeros(len(requests), device=device).index_add_(0, owner_t, picked).tolist()
    misses = torch.zeros(len(requests), device=device).index_add_(0, owner_t, missed).tolist()
    return [(i, lp, m == 0) for i, lp, m in zip(requests, sums, misses, strict=True)]


def score_requests(model, requests, batch_tokens: int = 4096, progress: str | None = None, share=None) -> Scores:
    """Log-likelihoods of `requests` [(context ids, continuation ids)] under `model` (eval mode, no grad).

    progress: a progress bar with this title; `share[i]` is the part of a question that request i is
    (1 / its number of choices), so the bar counts questions (items/s); default one per request."""
    from tqdm.auto import tqdm

    grouped, truncated = plan_rows(requests, model.cfg.context_length)
    rows = []
    for prefix, items in grouped.items():
        ids, pos, seg, where = pack_row(prefix, [c for _, c in items])
        rows.append((ids, pos, seg, where, items))
    device = model.tok_emb.weight.device
    logprobs, greedy = [0.0] * len(requests), [False] * len(requests)
    start = time.perf_counter()
    share = share or [1.0] * len(requests)
    total = round(sum(share))
    bar = tqdm(
        total=total,
        desc=progress,
        unit="item",
        disable=progress is None,
        leave=False,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
    )
    was_training, head = model.training, model.out_head
    model.eval()
    model.out_head = torch.nn.Identity()  # applied in score_batch to the positions that need it
    try:
        with torch.inference_mode():
            for batch in batches(pack_lines(rows), batch_tokens):
                for index, lp, g in score_batch(model, head, batch, device):
                    logprobs[index], greedy[index] = lp, g
                bar.update(sum(share[i] for r in batch for i, _ in r[4]))
    finally:
        model.out_head = head  # the same module: weight tying with tok_emb is untouched
        model.train(was_training)
        bar.n = total  # float shares may add up to 9.999...
        bar.close()
    return Scores(logprobs, greedy, truncated, time.perf_counter() - start)
