"""The server under load and abuse, on 127.0.0.1: 32 concurrent streaming clients, some leaving
mid-stream, some sending junk; every stream is whole and its own, the server keeps serving, every KV
block comes back. And SIGTERM: in-flight streams finish, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from tests.serve_helpers import ServerThread, free_port, small_model, wait_until_idle

from dozero.generate import generate
from dozero.model.checkpoint import save_model
from dozero.serve.app import create_app
from dozero.serve.config import ServeConfig
from dozero.serve.engine import Engine
from dozero.tokenizer import load_tokenizer

WORDS = "the a cat dog sun moon river stone light dark old new red blue king queen".split()


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int, leave_after: int | None = None):
    """('ok', text) for a whole stream, ('left', n) when we hang up after n chunks, (status, error) else."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            return r.status_code, r.json()["error"]["code"]
        text, ids, events = "", set(), []
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            events.append(line[6:])
            if events[-1] == "[DONE]":
                break
            chunk = json.loads(events[-1])
            ids.add(chunk["id"])
            text += chunk["choices"][0]["text"]
            if leave_after is not None and len(events) >= leave_after:
                return "left", len(events)
        assert events[-1] == "[DONE]" and len(ids) == 1, events[-3:]  # not cut, not mixed with another stream
        return "ok", text


async def junk(client: httpx.AsyncClient) -> list[int]:
    statuses = []
    for content in (b"{not json", b"[" * 5000, b"x" * 40_000):
        r = await client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        statuses.append(r.status_code)
    r = await client.post("/v1/completions", json={"prompt": "hi", "temperature": -1})
    return [*statuses, r.status_code]


def test_32_concurrent_streams_with_hangups_and_junk():
    torch.set_num_threads(1)
    tokenizer, model = load_tokenizer("gpt2"), small_model()
    prompts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 9)) for i in range(32)]
    lengths = [8 + i % 17 for i in range(32)]
    expected = [
        generate(model, tokenizer, p, temperature=0, max_new_tokens=n) for p, n in zip(prompts, lengths, strict=True)
    ]
    engine = Engine(model, tokenizer, ServeConfig(kv_cache_mb=4, max_batch=12, max_queue=16, max_body_kb=32))
    server = ServerThread(create_app(engine, "tiny"))

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            tasks = [stream_one(client, p, n, leave_after=3 if i % 5 == 4 else None)
                     for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]  # fmt: skip
            results = await asyncio.gather(*tasks, junk(client), junk(client))
            # The server still answers after all that, and every request that was refused can come back.
            again = await asyncio.gather(*(stream_one(client, p, n) for p, n in zip(prompts, lengths, strict=True)))
            return results, again

    try:
        (results, again) = asyncio.run(asyncio.wait_for(main(), timeout=240))
        *streams, junk1, junk2 = results
        assert junk1 == junk2 == [400, 400, 413, 400]
        kinds = [r[0] for r in streams]
        assert all(k in (("left", 429) if i % 5 == 4 else ("ok", 429)) for i, k in enumerate(kinds)), kinds
        assert kinds.count("left") >= 3 and kinds.count("ok") >= 12, kinds
        for i, (kind, value) in enumerate(streams):
            if kind == "ok":
                assert value == expected[i], i
        wait_until_idle(engine)
        assert all(kind in ("ok", 429) for kind, _ in again)
        assert [v for k, v in again if k == "ok"] == [e for (k, _), e in zip(again, expected, strict=True) if k == "ok"]
        assert sum(k == "ok" for k, _ in again) >= 12  # at least a batch's worth got through at once
        wait_until_idle(engine)
        assert engine.metrics.finished.get("error", 0) == 0
        assert engine.metrics.finished["cancelled"] >= 1  # the clients that hung up
    finally:
        server.stop()
        engine.close()


def start_serve(folder, *flags) -> tuple[subprocess.Popen, str]:
    """A `dozero serve` process on a free port of 127.0.0.1, once it answers /health (bounded wait)."""
    port = free_port()
    cmd = [sys.executable, "-m", "dozero", "serve", "--model", str(folder), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen([*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def stream_then_sigterm(proc, url: str, max_tokens: int) -> list[str]:
    """Start a streaming request, send SIGTERM once its first event arrived; the stream's lines."""
    events, started = [], threading.Event()

    def client():
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=client)
    reader.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)
    reader.join(timeout=60)
    return events


@pytest.mark.slow
def test_sigterm_lets_in_flight_streams_finish_and_exits_0(tmp_path):
    torch.manual_seed(0)
    folder = save_model(small_model(context_length=256), tmp_path / "tiny", tokenizer=load_tokenizer("gpt2"))
    proc, url = start_serve(folder, "--grace-seconds", "30")
    try:
        events = stream_then_sigterm(proc, url, 200)
        assert proc.wait(timeout=60) == 0
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_sigterm_cancels_what_outlasts_the_grace_period_and_exits_0(tmp_path):
    """A 2,000-token answer cannot finish in a 1 s grace period: it is cancelled just before the end,
    so its stream closes properly (an error event, then [DONE]) instead of being cut mid-body."""
    torch.manual_seed(0)
    folder = save_model(small_model(context_length=2048), tmp_path / "tiny", tokenizer=load_tokenizer("gpt2"))
    proc, url = start_serve(folder, "--grace-seconds", "1", "--max-tokens", "2000")
    try:
        events = stream_then_sigterm(proc, url, 2000)
        assert proc.wait(timeout=60) == 0
        assert events[-1] == "data: [DONE]"
        assert "cancelled" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
