"""The settings of `dozero serve`, as one typed dataclass: the CLI's flags are its fields. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from dozero.errors import DozeroError


@dataclass
class ServeConfig:
    """How the server listens, how much it holds in memory, and what it refuses."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 makes the server reachable from other machines)."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on /v1/ routes (None = no key needed)."""
    kv_cache_mb: float | None = None
    """Memory for the paged KV cache, in MiB: the pool of blocks that all running requests share
    (default: 256, or what one request of the model's full context needs if that is more)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    max_batch: int = 32
    """Most sequences decoding together in one step."""
    max_queue: int = 64
    """Most requests waiting for a place in the batch; beyond it new requests get HTTP 429."""
    prefill_chunk: int = 256
    """Most prompt tokens read in one step, so a long prompt does not stall the running streams."""
    prefix_caching: bool = True
    """Share the KV blocks of identical prompt beginnings (a system prompt, earlier chat turns) between requests."""
    max_tokens: int = 1024
    """Largest max_tokens a request may ask for (also the default of chat requests, within the context)."""
    max_n: int = 8
    """Largest n (completions per request)."""
    max_body_kb: int = 1024
    """Largest request body, in KiB (HTTP 413 beyond)."""
    grace_seconds: float = 10.0
    """On SIGTERM: how long in-flight requests may run on before they are cancelled."""

    def __post_init__(self) -> None:
        for name in ("port", "block_size", "max_batch", "max_queue", "prefill_chunk", "max_tokens", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "port" else 1):
                raise DozeroError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.kv_cache_mb is not None and not self.kv_cache_mb > 0:
            raise DozeroError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        if self.max_body_kb < 1 or self.grace_seconds < 0:
            raise DozeroError("max_body_kb must be >= 1 and grace_seconds >= 0")
