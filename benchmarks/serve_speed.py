"""Serving speed of `dozero serve`: many clients at once vs one at a time vs Hugging Face `generate`.

A `dozero serve` process (a subprocess, so the clients do not share its GIL) serves a model; asyncio
clients send streaming greedy /v1/completions requests over 127.0.0.1, each with its own prompt,
`max_tokens` new tokens and `ignore_eos` (fixed lengths). A level of c clients sends max(--requests, c)
requests, c at a time. For each level the script reports:

  tokens/s      all generated tokens / wall time of the whole level (the aggregate throughput)
  vs 1          tokens/s / the same round's tokens/s at 1 client ("the same requests one at a time")
  TTFT p50/p99  request sent -> first streamed text (ms)
  ITL p50/p99   gap between two streamed pieces of one request (ms)

and Hugging Face's `model.generate` on the same weights, one request after another, in this process
(no HTTP; the server idles meanwhile), with the 16-client level's tokens/s over it. The machine may
be busy with other work: every round measures every level and HF back to back (in reversed order
every other round, so a drift in the load hits both sides), and the summary gives medians and the
range of the ratios over rounds.

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/serve_speed.py           # random 4x128 model
    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/serve_speed.py --model smollm2-135m-instruct \
        --requests 8 --max-tokens 32 --rounds 2
    .venv/bin/python benchmarks/serve_speed.py --quick                 (a smoke run: seconds)

--model takes what `dozero serve --model` takes (a model or run folder, a GGUF file or its short name);
Hugging Face reads a GGUF file with `from_pretrained(folder, gguf_file=name)`, as benchmarks/smollm2_speed.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from dozero.config import get_model_config
from dozero.model import gguf
from dozero.model.checkpoint import load_model, resolve_model_dir, save_model
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


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    if gguf.is_gguf(folder):  # dequantized to fp32, as dozero loads it
        return AutoModelForCausalLM.from_pretrained(str(folder.parent), gguf_file=folder.name).eval()
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_generate(model, requests, max_tokens, tokenizer) -> float:
    """Tokens/s of Hugging Face `generate`, greedy, one request after another (warmed up once)."""
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
           "--tokenizer", args.tokenizer,
           "--port", str(port), "--device", args.device, "--max-batch", "64"]  # fmt: skip
    if args.kv_cache_mb is not None:
        cmd += ["--kv-cache-mb", str(args.kv_cache_mb)]
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


def spread(values: list[float]) -> str:
    """Median and range, e.g. '4.1x (3.6-4.4)'."""
    return f"{statistics.median(values):.1f}x ({min(values):.1f}-{max(values):.1f})"


def measure_round(url, requests, args, levels, hf, tokenizer, reverse: bool) -> dict:
    """Every level and HF back to back: {clients: level result, "hf": tokens/s}."""
    order = [*levels, "hf"] if not reverse else ["hf", *reversed(levels)]
    result = {}
    for what in order:
        if what == "hf":
            if hf is not None:
                result["hf"] = hf_generate(hf, requests[: args.requests], args.max_tokens, tokenizer)
        else:
            result[what] = asyncio.run(level(url, requests[: max(args.requests, what)], args.max_tokens, what))
    return result


def report(rounds: list[dict], levels: list[int]) -> None:
    print(f"{'clients':>8} {'tokens/s':>9} {'vs 1 client':>17} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8}  (ms; medians over rounds, ratios with their range)")  # fmt: skip
    for c in levels:
        tps = [r[c]["tokens/s"] for r in rounds]
        ratio = spread([r[c]["tokens/s"] / r[1]["tokens/s"] for r in rounds]) if 1 in levels else "-"
        ttft = [t for r in rounds for t in r[c]["ttft"]]
        itl = [t for r in rounds for t in r[c]["itl"]]
        ms = [1000 * percentile(v, q) for v in (ttft, itl) for q in (50, 99)]
        print(f"{c:>8} {statistics.median(tps):>9.0f} {ratio:>17} {ms[0]:>9.1f} {ms[1]:>9.1f} {ms[2]:>8.1f} "
              f"{ms[3]:>8.1f}")  # fmt: skip
    if "hf" in rounds[0]:
        hf = [r["hf"] for r in rounds]
        line = f"{'HF gen.':>8} {statistics.median(hf):>9.0f}  one at a time, no HTTP"
        for c in (x for x in (16, 1) if x in levels):
            line += f"; {c} client{'s' if c > 1 else ''} / HF {spread([r[c]['tokens/s'] / r['hf'] for r in rounds])}"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="what dozero serve --model takes; default: random 4x128, GPT-2 vocab")
    p.add_argument("--clients", default="1,4,16,32", help="concurrency levels (default: 1,4,16,32)")
    p.add_argument("--requests", type=int, default=32, help="requests per level, at least the clients (default: 32)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every level and HF (default: 3)")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=float, default=None, help="the server's (default: dozero serve's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the server and HF (default: torch's); on a busy machine 1 avoids "
                   "threads spinning against each other")  # fmt: skip
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 clients, 4 requests, 8 tokens, 1 round")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.rounds = "1,4", 4, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            folder = Path(tmp) / "bench"
            torch.manual_seed(0)
            cfg = get_model_config("shakespeare-char", vocab_size=50257, context_length=256, qkv_bias=True)
            save_model(GPTModel(cfg), folder, load_tokenizer("gpt2"), format="hf")
        else:
            folder = resolve_model_dir(args.model)
        args.tokenizer = "gpt2" if args.model is None else str(folder)
        tokenizer = load_tokenizer(args.tokenizer)
        ctx = load_model(folder).cfg.context_length
        requests = prompts(max(args.requests, *levels), args.prompt_words)
        longest = max(len(tokenizer.encode(r)) for r in requests)
        if longest + args.max_tokens > ctx:
            raise SystemExit(f"prompt ({longest} tokens) + max tokens ({args.max_tokens}) pass the context of {ctx}")
        hf = None if args.no_hf else hf_model(folder)
        port = 18000 + int(time.time()) % 1000
        proc = start_server(folder, port, args)
        name = folder.name if args.model else "random 4x128, GPT-2 vocab"
        print(f"model {name}: max({args.requests}, clients) requests per level, {args.max_tokens} new tokens "
              f"each, greedy, streamed; {args.rounds} rounds; load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        rounds = []
        try:
            # The server's first request pays one-time costs (SmolLM2: once 208 s to its first token on
            # a loaded machine); a warm-up keeps them out of round 1's one-client figure.
            asyncio.run(level(f"http://127.0.0.1:{port}", requests[:1], 2, 1))
            for i in range(args.rounds):
                r = measure_round(f"http://127.0.0.1:{port}", requests, args, levels, hf, tokenizer, i % 2 == 1)
                rounds.append(r)
                tps = "  ".join(f"{c}: {r[c]['tokens/s']:.0f}" for c in levels)
                print(f"round {i + 1}: tokens/s {tps}" + (f"  HF: {r['hf']:.0f}" if "hf" in r else "") +
                      f"  (load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        report(rounds, levels)


if __name__ == "__main__":
    main()
