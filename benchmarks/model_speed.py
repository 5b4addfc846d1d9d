"""Training speed of dozero's GPTModel vs Hugging Face's GPT2LMHeadModel: forward + backward, same weights.

Both models get identical weights (through dozero's Hugging Face conversion) and identical batches;
each repetition times ours then theirs (the order alternates every repetition so neither always
runs on a warmer cache), and the script prints median tokens/s and the ratio ours / theirs.

    flock /tmp/dozero-bench.lock .venv/bin/python benchmarks/model_speed.py            # 124M and a small shape
    .venv/bin/python benchmarks/model_speed.py --shapes gpt2 --batch-size 1 --tokens 1024 --repeats 7
    .venv/bin/python benchmarks/model_speed.py --device cuda --dtype bfloat16

Target (issue 2): dozero >= 1.0x Hugging Face on CPU at the 124M shape, batch 1 x 1024.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dozero.config import ModelConfig, get_model_config
from dozero.model.checkpoint import model_from_state_dict
from dozero.model.hf import config_to_hf, state_dict_from_hf

SHAPES = {
    "gpt2": get_model_config("gpt2"),
    "small": ModelConfig(vocab_size=8192, context_length=256, emb_dim=256, n_heads=8, n_layers=4, qkv_bias=True),
}


def build_pair(cfg: ModelConfig, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")})
    hf_cfg.resid_pdrop = hf_cfg.embd_pdrop = hf_cfg.attn_pdrop = 0.0
    theirs = GPT2LMHeadModel(hf_cfg)
    ours = model_from_state_dict(cfg, state_dict_from_hf(theirs.state_dict(), cfg), "benchmark")
    ours = ours.to(device=device, dtype=dtype).train()
    theirs = theirs.to(device=device, dtype=dtype).train()
    return ours, theirs


def step_time(model, x, y, hf: bool, device) -> float:
    """Seconds for one forward + backward (the same loss for both models)."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits = model(x).logits if hf else model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(name: str, cfg: ModelConfig, batch_size: int, tokens: int, repeats: int, device, dtype) -> float:
    ours, theirs = build_pair(cfg, device, dtype)
    x = torch.randint(0, cfg.vocab_size, (batch_size, tokens), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, tokens), device=device)
    with torch.no_grad():  # same function, so the comparison is fair
        diff = (ours(x).float() - theirs(x).logits.float()).abs().max().item()
    for _ in range(2):  # warm-up: allocator, kernels, caches
        step_time(ours, x, y, False, device)
        step_time(theirs, x, y, True, device)
    times = {"dozero": [], "hf": []}
    for r in range(repeats):
        order = [("dozero", ours, False), ("hf", theirs, True)]
        for label, model, hf in order if r % 2 == 0 else order[::-1]:
            times[label].append(step_time(model, x, y, hf, device))
    n = batch_size * tokens
    ours_tps = n / statistics.median(times["dozero"])
    theirs_tps = n / statistics.median(times["hf"])
    print(
        f"{name:<6} batch {batch_size} x {tokens:<5} dozero {ours_tps:>9,.0f} tok/s   HF {theirs_tps:>9,.0f} tok/s   "
        f"ratio {ours_tps / theirs_tps:.3f}x   (max |logit diff| {diff:.1e}, {repeats} repeats, median)"
    )
    return ours_tps / theirs_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default: context length)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, {torch.get_num_threads()} CPU threads")
    for name in args.shapes:
        cfg = SHAPES[name]
        bench(name, cfg, args.batch_size, args.tokens or cfg.context_length, args.repeats, device, dtype)


if __name__ == "__main__":
    main()
