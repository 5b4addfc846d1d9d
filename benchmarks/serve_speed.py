"""Serving speed of `dozero serve`: many clients at once vs one at a time vs Hugging Face `generate`.

A `dozero serve` process (a subprocess, so the clients do not share its GIL) serves a model with
random weights; asyncio clients send streaming greedy /v1/completions requests over 127.0.0.1,
each with its own prompt, `max_tokens` new tokens and `ignore_eos` (fixed lengths). For each number
of concurrent clients the script prints:

  tokens/s      all generated tokens / wall time of the whole level (the aggregate throughput)
  TTFT p50/p99  request sent -> first streamed text (ms)
  ITL p50/p99   gap between two streamed pieces of one request (ms)

Concurrency 1 is "the same requests one at a time"; the last line is Hugging Face's
`model.generate` on the same weights, one request after another, in this process (no HTTP).

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/serve_speed.py
    .venv/bin/python benchmarks/serve_speed.py --quick                 (a smoke run: seconds)
    .venv/bin/python benchmarks/serve_speed.py --model path/to/SmolLM2-135M --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from dozero.config import get_model_config
from dozero.model.checkpoint import load_model, save_model
from dozero.model.gpt import GPTModel
from dozero.tokenizer import load_tokenizer

WORDS = "the a cat dog sun moon river stone light dark old new red blue king queen ship sea".split()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def prompts(n: int, length: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length)) for i in range(n)]


async def one_request(client, prompt, max_tokens, ttft, itl) -> int:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    sent, last, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                (ttft if last is None else itl).append(now - (sent if last is None else last))
                last = now
    return tokens


async def level(url, requests, max_tokens, clients) -> dict:
    """`clients` workers share the list of requests; each sends its next one when the last is done."""
    ttft, itl, todo = [], [], list(requests)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as c:

        async def worker():
            total = 0
            while todo:
                total += await one_request(c, todo.pop(), max_tokens, ttft, itl)
            return total

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(worker() for _ in range(clients))))
        wall = time.perf_counter() - start
    return {"tokens/s": tokens / wall, "ttft": ttft, "itl": itl, "tokens": tokens}


def hf_generate(folder: Path, requests, max_tokens, tokenizer) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = 0
    with torch.inference_mode():
        model.generate(torch.tensor([tokenizer.encode(requests[0])]), max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        for prompt in requests:
            ids = torch.tensor([tokenizer.encode(prompt)])
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=0)  # fmt: skip
            tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


def start_server(folder: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dozero", "serve", "--model", str(folder), "--model-name", "bench",
           "--port", str(port), "--device", args.device, "--max-batch", "64",
           "--kv-cache-mb", str(args.kv_cache_mb)]  # fmt: skip
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server did not start:\n{proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not answer /health within 180 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (HF or dozero); default: random 4x128, GPT-2 vocab")
    p.add_argument("--clients", default="1,4,16,32", help="concurrency levels (default: 1,4,16,32)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (default: 32)")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=float, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the server and HF (default: torch's); on a busy machine 1 avoids "
                   "threads spinning against each other")  # fmt: skip
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 clients, 4 requests, 8 tokens")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens = "1,4", 4, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path(tmp) / "bench"
        if args.model is None:
            torch.manual_seed(0)
            cfg = get_model_config("shakespeare-char", vocab_size=50257, context_length=256, qkv_bias=True)
            save_model(GPTModel(cfg), folder, tokenizer, format="hf")
        ctx = load_model(folder).cfg.context_length
        if args.prompt_words * 2 + args.max_tokens > ctx:
            raise SystemExit(f"prompt + max tokens may pass the model's context of {ctx}")
        requests = prompts(args.requests, args.prompt_words)
        port = 18000 + int(time.time()) % 1000
        proc = start_server(folder, port, args)
        print(f"model {folder.name if args.model else 'random 4x128, GPT-2 vocab'}: {args.requests} requests, "
              f"{args.max_tokens} new tokens each, greedy, streamed")  # fmt: skip
        print(f"{'clients':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                r = asyncio.run(level(f"http://127.0.0.1:{port}", requests, args.max_tokens, clients))
                ms = [1000 * percentile(r[k], q) for k in ("ttft", "itl") for q in (50, 99)]
                print(f"{clients:>8} {r['tokens/s']:>9.0f} {ms[0]:>9.1f} {ms[1]:>9.1f} {ms[2]:>8.1f} {ms[3]:>8.1f}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if not args.no_hf:
            print(f"{'HF gen.':>8} {hf_generate(folder, requests, args.max_tokens, tokenizer):>9.0f}  (one at a time)")


if __name__ == "__main__":
    main()
