"""The OpenAI request bodies, as pydantic models, and the error schema.

Only what dozero can honour is accepted with a value other than OpenAI's default; unknown fields
are ignored, as OpenAI's own server ignores them. Bounds that depend on the server's settings
(max_tokens, n, the context) are checked in `app.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ApiError(Exception):
    """An error answered in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers: dict[str, str] = {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Sampling(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Literal[0, 0.0] = 0.0  # accepted at OpenAI's default only
    frequency_penalty: Literal[0, 0.0] = 0.0
    logprobs: Literal[None, False, 0] = None  # not computed: asking for them is an error, not a silent null
    top_logprobs: Literal[None, 0] = None
    ignore_eos: bool = False  # vLLM's extension: keep going past end-of-text (benchmarks want fixed lengths)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, texts, token ids, or lists of token ids
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
