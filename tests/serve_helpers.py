"""A small random-weight model with GPT-2's tokenizer, and a real server on 127.0.0.1 for the serve tests."""

from __future__ import annotations

import socket
import threading
import time

import torch

from dozero.config import ModelConfig
from dozero.model.gpt import GPTModel


def small_model(context_length: int = 128, **llama) -> GPTModel:
    """Random weights, scaled up so greedy choices have no near-ties (GPT-2's vocabulary)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, context_length=context_length, emb_dim=64, n_heads=4, n_layers=2, **llama)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until_idle(engine, timeout: float = 30) -> None:
    """Bounded wait for the engine to drop what clients left behind; every KV block must be back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine._wake:
            idle = not engine._incoming and not engine.scheduler.has_work()
        if idle and engine.pool.num_free == engine.pool.num_blocks:
            engine.pool.check([])  # no sequence left: every block free, no users counted
            assert engine.metrics.counters["kv_accounting_errors_total"] == 0
            return
        time.sleep(0.02)
    raise AssertionError(f"KV blocks not returned: {engine.pool.num_free} of {engine.pool.num_blocks} free")
