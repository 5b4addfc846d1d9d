"""`dozero serve`: an OpenAI-compatible HTTP server and a web chat page for a trained model.

    dozero serve --model runs/my-model
    dozero serve --model smollm2-folder --port 8080 --api-key secret --kv-cache-mb 512

The server's flags come from `ServeConfig` (serve/config.py).
"""

from __future__ import annotations

import argparse

from dozero.cli_args import add_dataclass_args, apply_args
from dozero.generate.commands import add_keep_quantized_flag
from dozero.serve.config import ServeConfig

DESCRIPTION = """\
Serve a trained model over HTTP with OpenAI's API (/v1/models, /v1/completions,
/v1/chat/completions, streaming included), /health, /metrics (Prometheus) and a chat page at /.

Requests are batched continuously: each joins the running batch as soon as it has a place and
KV-cache blocks, and leaves it when it ends. Greedy and seeded answers are the same as
`dozero generate`'s. Stop with Ctrl-C or SIGTERM: the server stops accepting, lets running
requests finish for --grace-seconds, then exits."""

EXAMPLES = """\
examples:
  dozero serve --model runs/shakespeare-char
  dozero serve --model gpt2-folder --port 8080 --api-key secret
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "shakespeare-char", "prompt": "ROMEO:", "max_tokens": 50}'"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model with an OpenAI-compatible API and a web chat",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="RUN_OR_FOLDER", help="training run folder or model folder")
    p.add_argument(
        "--tokenizer", default=None, metavar="SPEC", help="'gpt2', a folder or a file (default: the model folder's)"
    )
    p.add_argument("--model-name", default=None, help="the name clients use (default: the folder's name)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    add_keep_quantized_flag(p)
    add_dataclass_args(p, ServeConfig, group_title="server")
    p.set_defaults(func=run_serve)


def graceful_server_class():
    import signal
    import threading

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM once it has shut down, so the process dies of the signal;
        a server that stopped as asked should exit 0 (what supervisors and `docker stop` expect).

        `engine` (set after construction): its requests still running just before uvicorn's grace period
        ends are cancelled, so their streams end with an error event and `data: [DONE]` instead of a
        connection cut mid-body when uvicorn gives up on them."""

        engine = None

        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
            grace = self.config.timeout_graceful_shutdown
            if first and self.engine is not None and grace is not None:
                margin = min(0.5, grace / 2)  # time for the cancelled streams to send their last events
                timer = threading.Timer(grace - margin, self.engine.cancel_all)
                timer.daemon = True  # a server that finished early does not wait for it
                timer.start()

    return GracefulServer


def run_serve(args) -> int:
    import torch
    import uvicorn

    from dozero.generate.layout import use_decoding_layout
    from dozero.model.checkpoint import load_model, resolve_model_dir
    from dozero.runtime import pick_device
    from dozero.serve.app import create_app
    from dozero.serve.chat import read_chat_template
    from dozero.serve.engine import Engine
    from dozero.tokenizer import load_tokenizer

    config = apply_args(ServeConfig(), args)
    device = pick_device(args.device)
    folder = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(args.tokenizer or folder)
    model = load_model(folder, device=device, keep_quantized=args.keep_quantized)
    tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {folder}")
    if device.type == "cuda":
        model = model.to(torch.bfloat16) if torch.cuda.is_bf16_supported() else model.half()
    use_decoding_layout(model)
    engine = Engine(model, tokenizer, config)
    name = args.model_name or folder.name
    if folder.name in ("best", "latest"):  # a run's checkpoint: the run's name
        name = args.model_name or folder.parent.name
    app = create_app(engine, name, read_chat_template(args.tokenizer or folder))
    GracefulServer = graceful_server_class()
    server = GracefulServer(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=config.grace_seconds
        )
    )
    server.engine = engine
    print(f"serving {name} on http://{config.host}:{config.port}  ({engine.pool.num_blocks} KV blocks)", flush=True)
    try:
        server.run()  # returns after SIGINT/SIGTERM, once in-flight requests end or the grace period passes
    finally:
        engine.close()
    return 0
