"""The serving loop (nano-vllm's `LLMEngine`), in one background thread.

    submit() -> queue -> [admit: blocks from the pool] -> prefill chunks -> decode steps -> finish
                                                  ^                                          |
                                                  +---- blocks back to the pool <------------+

Each step: take new requests, drop cancelled ones (a client that went away), ask the scheduler for
the prefill chunks and the decoding batch, run them, draw each sequence's next token with its own
settings and seeded generator (the same `sample_next_token` as `dozero generate`, so greedy and
seeded outputs match it), and send the new text out. The HTTP layer only calls `submit` and reads
events; it never touches blocks or tensors.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable

import torch

from dozero.errors import DozeroError
from dozero.generate.config import GenerationConfig
from dozero.generate.sampling import sample_next_token
from dozero.generate.stream import TextSink
from dozero.serve.block_manager import BlockPool
from dozero.serve.config import ServeConfig
from dozero.serve.metrics import Metrics
from dozero.serve.runner import ModelRunner, PagedKVCache
from dozero.serve.scheduler import Scheduler
from dozero.serve.sequence import Event, Sequence

log = logging.getLogger("dozero.serve")
DEFAULT_KV_CACHE_MB = 256.0  # without --kv-cache-mb: this much, or one full context if that needs more


class QueueFull(Exception):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class Engine:
    def __init__(self, model, tokenizer, config: ServeConfig | None = None):
        self.config = config = config or ServeConfig()
        tokenizer.check_fits_model(model.cfg.vocab_size)
        self.model, self.tokenizer = model.eval(), tokenizer
        ctx = model.cfg.context_length
        per_block = PagedKVCache.bytes_per_block(model, config.block_size)
        need = -(-ctx // config.block_size) * per_block / 2**20  # MiB for one request of the full context
        budget = config.kv_cache_mb if config.kv_cache_mb is not None else max(DEFAULT_KV_CACHE_MB, need)
        num_blocks = int(budget * 2**20 // per_block)
        if num_blocks * config.block_size < ctx:  # one request must always fit, or it would wait forever
            raise DozeroError(
                f"--kv-cache-mb {config.kv_cache_mb} holds {num_blocks * config.block_size} tokens, less than the "
                f"model's context of {ctx}; give at least --kv-cache-mb {math.ceil(need * 10) / 10}"
            )
        self.pool = BlockPool(num_blocks, config.block_size)
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.scheduler = Scheduler(self.pool, config)
        self.metrics = Metrics(self.gauges)
        self.device = model.tok_emb.weight.device
        self._incoming: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = self._cancel_all = False
        self._thread = threading.Thread(target=self._loop, name="dozero-engine", daemon=True)
        self._thread.start()

    # ----- called from other threads -----

    def submit(self, prompt: list[int], config: GenerationConfig, emit: Callable[[Event], None]) -> Sequence:
        """Queue a request; its events go to `emit` (called from the engine thread). QueueFull when full."""
        if config.uses_counts:
            raise DozeroError("repetition and frequency penalties are not supported by the server")
        if not prompt or len(prompt) + config.max_new_tokens > self.model.cfg.context_length:
            raise DozeroError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({config.max_new_tokens}) must fit the model's "
                f"context of {self.model.cfg.context_length} tokens"
            )
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed) if config.seed is not None else generator.seed()
        seq = Sequence(prompt, config, emit, TextSink(self.tokenizer, config.stop), generator=generator)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._incoming) + len(self.scheduler.waiting) >= self.config.max_queue:
                self.metrics.add("rejected_total")
                raise QueueFull(f"{self.config.max_queue} requests are already waiting")
            self._incoming.append(seq)
            self._wake.notify()
        return seq

    def generate_text(self, prompt: str | list[int], config: GenerationConfig) -> tuple[str, str]:
        """(text, finish_reason) of one request, waiting for it: for Python callers and tests."""
        ids = self.tokenizer.encode(prompt, special="allow") if isinstance(prompt, str) else prompt
        events: queue.Queue[Event] = queue.Queue()
        self.submit(ids, config, events.put)
        text = ""
        while True:
            event = events.get(timeout=600)
            text += event.text
            if event.finish_reason:
                return text, event.finish_reason

    def cancel_all(self) -> None:
        """Cancel every queued and running request (they end as "cancelled" at the next step); the
        engine goes on accepting. The server calls it when its shutdown grace period runs out."""
        with self._wake:
            self._cancel_all = True  # done by the engine thread, which owns the scheduler's lists
            self._wake.notify()

    def close(self) -> None:
        """Stop the loop: queued and running requests end as "cancelled", their blocks go back."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self.runner.close()

    def gauges(self) -> dict[str, tuple[float, str]]:
        return {
            "queue_length": (len(self._incoming) + len(self.scheduler.waiting), "Requests waiting for the batch"),
            "running_sequences": (len(self.scheduler.running), "Sequences in the batch"),
            "kv_cache_blocks_total": (self.pool.num_blocks, "KV-cache blocks in the pool"),
            "kv_cache_blocks_used": (self.pool.num_blocks - self.pool.num_free, "KV-cache blocks held by sequences"),
            "kv_cache_usage_ratio": (1 - self.pool.num_free / self.pool.num_blocks, "Share of the KV pool in use"),
        }

    # ----- the engine thread -----

    def _loop(self) -> None:
        while True:
            with self._wake:
                if not (self._stopping or self._incoming or self.scheduler.has_work()):
                    self._check_blocks()  # idle: every block must be back in the pool
                while not (self._stopping or self._cancel_all or self._incoming or self.scheduler.has_work()):
                    self._wake.wait()
                if self._stopping:
                    break
                for seq in self._incoming:
                    self.scheduler.add(seq)
                self._incoming.clear()
                if self._cancel_all:
                    for seq in (*self.scheduler.waiting, *self.scheduler.running):
                        seq.cancel()
                    self._cancel_all = False
            self.step()
        for seq in (*self._incoming, *self.scheduler.waiting, *self.scheduler.running):
            self._end(seq, "cancelled")
        self._incoming.clear()

    def step(self) -> None:
        """One step: drop cancelled sequences, the prefill chunks, one decode token for the batch."""
        for seq in self.scheduler.cancelled():
            self._end(seq, "cancelled")
        prefill, decode = [], []
        try:
            preempted, cached = self.scheduler.preemptions, self.scheduler.cached_tokens
            prefill, decode = self.scheduler.schedule()
            self.metrics.add("preemptions_total", self.scheduler.preemptions - preempted)
            self.metrics.add("prompt_tokens_cached_total", self.scheduler.cached_tokens - cached)
            if prefill:
                logits = self.runner.run([s for s, _ in prefill], [n for _, n in prefill])
                done = []  # rows whose prompt is now read: they draw their first token
                for b, (seq, n) in enumerate(prefill):
                    seq.num_cached += n
                    self.scheduler.register(seq)
                    if not seq.in_prefill:
                        if seq.num_generated == 0:  # not a preempted sequence read again
                            self.metrics.add("prompt_tokens_total", len(seq.prompt))
                        done.append(b)
                if done:
                    self._sample([prefill[b][0] for b in done], logits[done] if len(done) < len(prefill) else logits)
            if decode:
                logits = self.runner.run(decode, [1] * len(decode))
                for seq in decode:
                    seq.num_cached += 1
                    self.scheduler.register(seq)
                self._sample(decode, logits)
        except Exception:  # a bad step must not take the server down: its sequences end with an error
            log.exception("engine step failed")
            for seq in [*decode, *(s for s, _ in prefill)]:
                self._end(seq, "error")

    def _check_blocks(self) -> None:
        """The pool's accounting against the sequences that hold blocks; a mismatch is logged and
        counted in /metrics (a bug: the server keeps serving, but it should be reported)."""
        try:
            self.pool.check([s.block_table for s in (*self.scheduler.waiting, *self.scheduler.running)])
        except AssertionError:
            log.exception("KV-cache block accounting is off")
            self.metrics.add("kv_accounting_errors_total")

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        n = min(self.tokenizer.vocab_size, logits.shape[-1])  # padded model rows are never drawn
        ids = [0] * len(seqs)
        with torch.inference_mode():
            # Greedy rows in one argmax (the same choice as row by row); sampled rows each with their
            # own settings and generator, as `dozero generate` draws them.
            greedy = [b for b, s in enumerate(seqs) if s.config.is_greedy]
            if greedy:
                rows = logits if len(greedy) == len(seqs) else logits[greedy]  # all greedy: no copy
                for b, t in zip(greedy, rows[:, :n].argmax(dim=-1).tolist(), strict=True):
                    ids[b] = t
            for b, s in enumerate(seqs):
                if not s.config.is_greedy:
                    ids[b] = int(sample_next_token(logits[b : b + 1, :n], s.config, s.generator))
        now = time.monotonic()
        for seq, t in zip(seqs, ids, strict=True):
            first = seq.last_token_at is None
            self.metrics.observe(
                "time_to_first_token_seconds" if first else "inter_token_latency_seconds",
                now - (seq.arrived if first else seq.last_token_at),
            )
            seq.last_token_at = now
            if seq.config.stop_at_eot and t == self.tokenizer.eot_id:
                self._end(seq, "stop")
                continue
            seq.tokens.append(t)
            self.metrics.add("generation_tokens_total")
            text = seq.sink.add(t)
            if text:
                self._emit(seq, Event(text))
            if seq.sink.stopped:
                self._end(seq, "stop")
            elif seq.num_generated >= seq.config.max_new_tokens:
                self._end(seq, "length")

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.emit(event)
        except Exception:  # the reader is gone (its event loop closed): drop the sequence next step
            seq.cancel()

    def _end(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        if not seq.finished:
            self.metrics.request_done(reason)
            self.metrics.observe("request_latency_seconds", time.monotonic() - seq.arrived)
        try:
            seq.finish(reason)
        except Exception:
            pass
