"""The HTTP layer: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over the engine,
plus /health, /metrics (Prometheus) and the web chat page at /.

It turns requests into token ids and `GenerationConfig`s, submits one sequence per choice, and
turns the engine's events into OpenAI's JSON, or into server-sent events
(`data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`) when `stream` is true. A client that goes away
cancels its sequences; the engine frees them at its next step. It knows nothing of blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
import weakref
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dozero.errors import DozeroError
from dozero.generate.config import GenerationConfig
from dozero.serve.chat import chat_prompt
from dozero.serve.engine import Engine, QueueFull
from dozero.serve.protocol import ApiError, ChatRequest, CompletionRequest, Sampling

STATIC = Path(__file__).parent / "static"
CANCELLED = ApiError(503, "the request was cancelled (the server is shutting down or failed)", "server_error")


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 before any handler reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                message = f"the request body is larger than {self.limit // 1024} KiB"
                error = ApiError(413, message, code="body_too_large")
                return await JSONResponse(error.body(), 413)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)


def create_app(engine: Engine, model_name: str, chat_template: str | None = None) -> FastAPI:
    """The app over `engine`; `chat_template` (Jinja) replaces the tokenizer's for chat requests."""
    app = FastAPI(title="dozero serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=engine.config.max_body_kb * 1024)
    api_key = engine.config.api_key

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "the body is not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
        return await api_error(request, ApiError(400, message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return await api_error(request, ApiError(e.status_code, str(e.detail)))

    async def check_key(request: Request):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "dozero"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise ApiError(400, "prompt must not be an empty list", param="prompt")
        ids = [encode(engine, p) for p in prompts]
        return await answer(engine, request, body, ids, (), "text_completion", model_name)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text, stops = chat_prompt(engine.tokenizer, messages, chat_template)
        except DozeroError as e:
            raise ApiError(400, str(e), param="messages") from None
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        return await answer(engine, request, body, [encode(engine, text)], stops, "chat.completion", model_name)

    return app


def encode(engine: Engine, text: str | list[int]) -> list[int]:
    """Token ids of a prompt (text, or ids as OpenAI's API also takes them), checked against the context."""
    tok, ctx = engine.tokenizer, engine.model.cfg.context_length
    try:
        if isinstance(text, list):
            ids = tok.check_ids(text)
        else:
            ids = tok.encode(text, special="allow") if text else ([tok.eot_id] if tok.eot_id is not None else [])
    except DozeroError as e:  # e.g. a character the model's vocabulary does not have
        raise ApiError(400, str(e), param="prompt") from None
    if not ids:
        raise ApiError(400, "the prompt is empty and this tokenizer has no end-of-text token to start from")
    if len(ids) >= ctx:
        raise ApiError(
            400, f"the prompt has {len(ids)} tokens; this model's context is {ctx}", code="context_length_exceeded"
        )
    return ids


def settings(engine: Engine, body: Sampling, ids: list[list[int]], stops: tuple[str, ...]) -> GenerationConfig:
    """The request's sampling settings, checked against the server's limits and the context."""
    limits, ctx = engine.config, engine.model.cfg.context_length
    if body.n * len(ids) > limits.max_n:
        raise ApiError(400, f"n x prompts must be at most {limits.max_n}, got {body.n * len(ids)}", param="n")
    longest = max(len(i) for i in ids)
    max_tokens = body.max_tokens or min(limits.max_tokens, ctx - longest)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens must be at most {limits.max_tokens}, got {max_tokens}", param="max_tokens")
    if longest + max_tokens > ctx:
        raise ApiError(
            400,
            f"this model's context is {ctx} tokens; the prompt ({longest}) plus max_tokens ({max_tokens}) exceed it",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return GenerationConfig(
        temperature=body.temperature,
        top_k=None,
        top_p=body.top_p,
        max_new_tokens=max_tokens,
        seed=body.seed,
        stop=body.stops() + stops,
        stop_at_eot=not body.ignore_eos,
    )


class Mailbox:
    """The engine thread's way into one event loop. A step emits an event per running sequence; they
    wait here, and the loop is woken once to hand them all to their requests' queues (one wake-up per
    step instead of one per event, which the engine thread pays for under the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        # A weak reference: _MAILBOXES is keyed weakly by the loop, and a strong one here would keep
        # every loop (and its mailbox) alive for good.
        self.loop, self.lock, self.items = weakref.ref(loop), threading.Lock(), []

    def put(self, events: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((events, item))
            if len(self.items) > 1:
                return  # a delivery is already on its way and will take this one too
        try:
            loop = self.loop()
            if loop is None:
                raise RuntimeError("event loop is gone")
            loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # the loop is closed: nobody reads these; the engine cancels the sequence
            with self.lock:
                self.items.clear()
            raise

    def deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for events, item in items:
            events.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def emitter(loop, events: asyncio.Queue, choice: int):
    """What the engine calls with each event of one choice: (choice, event) onto `events`, via the loop's mailbox."""
    mailbox = _MAILBOXES.get(loop) or _MAILBOXES.setdefault(loop, Mailbox(loop))

    def emit(event):
        mailbox.put(events, (choice, event))

    return emit


def drain(events: asyncio.Queue, first) -> list:
    """`first` and whatever else is already queued: a client that fell behind gets its backlog at once."""
    batch = [first]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


async def answer(engine, request, body: Sampling, ids, extra_stops, kind: str, model_name: str):
    if body.model and body.model != model_name:
        raise ApiError(404, f"The model `{body.model}` does not exist; this server has `{model_name}`",
                       code="model_not_found", param="model")  # fmt: skip
    config = settings(engine, body, ids, extra_stops)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    seqs = []
    try:
        for p, prompt in enumerate(ids):
            for j in range(body.n):  # n choices of one prompt: seeds seed, seed + 1, ...
                seed = None if config.seed is None else config.seed + j
                choice = p * body.n + j
                emit = emitter(loop, events, choice)
                seqs.append(engine.submit(prompt, dataclasses.replace(config, seed=seed), emit))
    except QueueFull as e:
        for seq in seqs:
            seq.cancel()
        message = f"the server is busy ({e}); retry shortly"
        error = ApiError(429, message, "rate_limit_error", code="rate_limit_exceeded")
        error.headers["Retry-After"] = "1"
        raise error from None
    except DozeroError as e:
        for seq in seqs:
            seq.cancel()
        raise ApiError(400, str(e)) from None
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind, "created": int(time.time()), "model": model_name}  # fmt: skip
    prompt_tokens = sum(len(i) for i in ids)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        chunks = stream_events(seqs, events, head, prompt_tokens, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await collect(seqs, events, head, prompt_tokens, request)


async def collect(seqs, events, head, prompt_tokens, request) -> Response:
    """Wait for every choice, checking now and then that the client is still there."""
    texts, reasons, completion_tokens = [""] * len(seqs), [None] * len(seqs), 0
    try:
        while None in reasons:
            try:
                choice, event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally frees the sequences
                continue
            texts[choice] += event.text
            if event.finish_reason:
                reasons[choice], completion_tokens = event.finish_reason, completion_tokens + event.completion_tokens
    finally:
        for seq in seqs:
            seq.cancel()  # a no-op for the finished ones
    if any(r in ("cancelled", "error") for r in reasons):
        raise CANCELLED
    chat = head["object"] == "chat.completion"
    choices = [
        {"index": i, **({"message": {"role": "assistant", "content": t}} if chat else {"text": t}),
         "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
    ]  # fmt: skip
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    return JSONResponse({**head, "choices": choices, "usage": usage})


async def stream_events(seqs, events, head, prompt_tokens, include_usage):
    """Server-sent events as OpenAI sends them: a role chunk (chat), text chunks, a finish chunk per
    choice, a usage chunk when asked, then `data: [DONE]`."""
    chat = head["object"] == "chat.completion"
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index, text=None, finish=None, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    done, completion_tokens = 0, 0
    try:
        if chat:
            for i in range(len(seqs)):
                yield chunk(i, role=True)
        failed = False
        while done < len(seqs) and not failed:
            # Text that piled up while this stream waited for the loop goes out as one chunk per choice.
            out, texts = [], {}
            for choice, event in drain(events, await events.get()):
                texts[choice] = texts.get(choice, "") + event.text
                if event.finish_reason and texts[choice]:
                    out.append(chunk(choice, texts.pop(choice)))
                if event.finish_reason in ("cancelled", "error"):
                    out.append(f"data: {json.dumps(CANCELLED.body())}\n\n")
                    failed = True
                    break
                if event.finish_reason:
                    done, completion_tokens = done + 1, completion_tokens + event.completion_tokens
                    out.append(chunk(choice, finish=event.finish_reason))
            if not failed:
                out += [chunk(choice, text) for choice, text in texts.items() if text]
            yield "".join(out)
        if not failed:
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream: the engine drops these at its next step
        for seq in seqs:
            seq.cancel()
