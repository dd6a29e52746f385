"""Per-request latency histograms for the server's /metrics, as vLLM exports them: time to
first token, time per output token after the first, and end-to-end time, in seconds, in
Prometheus' text format (cumulative `_bucket{le=...}` counts, `_sum`, `_count`).

Measured where a client would see them, on the replica: from the request's arrival to
its first token, and to its last. Requests that fail or are aborted are not counted.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# vLLM's buckets (vllm/engine/metrics.py), in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]  # upper bounds, ascending; +Inf is implied
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last: +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def prometheus(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, n in zip((*self.buckets, "+Inf"), self.counts):
            running += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return lines + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


class RequestMetrics:
    """The server's three histograms; `finished()` once per request that ends normally."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def finished(self, arrived: float, first: float | None, num_tokens: int) -> None:
        """A request that ended normally: arrival and first-token times (time.monotonic())."""
        now = time.monotonic()
        self.e2e.observe(now - arrived)
        if first is not None:
            self.ttft.observe(first - arrived)
            if num_tokens > 1:
                self.tpot.observe((now - first) / (num_tokens - 1))

    def prometheus(self, prefix: str) -> list[str]:
        return (self.ttft.prometheus(f"{prefix}time_to_first_token_seconds", "Time to first token.")
                + self.tpot.prometheus(f"{prefix}time_per_output_token_seconds",
                                       "Time per output token after the first.")
                + self.e2e.prometheus(f"{prefix}e2e_request_latency_seconds", "End-to-end request latency."))


__all__ = ["Histogram", "RequestMetrics"]
