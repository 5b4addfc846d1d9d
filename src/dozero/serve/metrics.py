"""Counters, gauges and latency histograms, written out in Prometheus' text format (version 0.0.4).

A few dozen lines instead of a dependency: the engine thread adds, the /metrics handler reads.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket (+Inf)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return [*out, f"{name}_sum {self.total}", f"{name}_count {self.count}"]


class Metrics:
    """What /metrics reports. `gauges` is a callable that reads the engine's state at scrape time."""

    COUNTERS = {
        "requests_total": "Requests finished, by how they ended",
        "prompt_tokens_total": "Prompt tokens read",
        "generation_tokens_total": "Tokens generated",
        "rejected_total": "Requests refused because the queue was full",
        "prompt_tokens_cached_total": "Prompt tokens found in shared KV blocks instead of computed",
        "preemptions_total": "Sequences preempted when the KV pool ran dry (read again later)",
        "kv_accounting_errors_total": "Times the KV pool's books did not balance when the engine fell idle (a bug)",
    }
    HISTOGRAMS = {
        "time_to_first_token_seconds": "From arrival to the first generated token",
        "inter_token_latency_seconds": "Between two generated tokens of one request",
        "request_latency_seconds": "From arrival to the end of the request",
    }

    def __init__(self, gauges):
        self.lock = threading.Lock()
        self.gauges = gauges
        self.counters: dict[str, float] = {name: 0 for name in self.COUNTERS}
        self.finished: dict[str, int] = {}
        self.histograms = {name: Histogram() for name in self.HISTOGRAMS}

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counters[name] += value

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.histograms[name].observe(value)

    def request_done(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.counters["requests_total"] += 1

    def render(self, prefix: str = "dozero_") -> str:
        lines = []
        with self.lock:
            for name, help_text in self.COUNTERS.items():
                lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} counter"]
                if name == "requests_total":
                    lines += [f'{prefix}{name}{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
                else:
                    lines.append(f"{prefix}{name} {self.counters[name]}")
            for name, help_text in self.HISTOGRAMS.items():
                lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} histogram"]
                lines += self.histograms[name].lines(prefix + name)
        for name, (value, help_text) in self.gauges().items():
            lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} gauge", f"{prefix}{name} {value}"]
        return "\n".join(lines) + "\n"
