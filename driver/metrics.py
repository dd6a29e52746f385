"""Engine metrics: counters per step, a periodic log line, a snapshot for callers."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("raytp.metrics")

LOG_INTERVAL_S = 5.0


@dataclass
class EngineMetrics:
    num_steps: int = 0
    num_prompt_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    num_generated_tokens: int = 0
    num_finished: int = 0
    step_time_s: float = 0.0  # wall time of engine.step() (async: its share of overlapped steps)
    phase_time_s: dict = field(default_factory=dict)  # rank 0's time per step phase, summed
    driver_time_s: dict = field(default_factory=dict)  # the driver's time per step phase, summed
    _last_log: float = field(default_factory=time.monotonic)
    _window: list = field(default_factory=lambda: [0, 0])  # prompt, generated tokens since last log

    def record_step(self, so, result, seconds: float, scheduler) -> None:
        self.num_steps += 1
        generated = len(result.sampled_token_ids) if result is not None else 0
        prompt = so.total_num_scheduled_tokens - generated
        self.num_prompt_tokens += max(prompt, 0)
        self.num_generated_tokens += generated
        self.step_time_s += seconds
        if result is not None:
            for key, value in result.timings.items():
                self.phase_time_s[key] = self.phase_time_s.get(key, 0.0) + value
        self._window[0] += max(prompt, 0)
        self._window[1] += generated
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            span = now - self._last_log
            logger.info("prompt %.1f tok/s, generation %.1f tok/s | running %d, waiting %d, swapped %d | "
                        "KV cache %.1f%% used, prefix cache hit rate %.1f%%",
                        self._window[0] / span, self._window[1] / span, scheduler.num_running,
                        scheduler.num_waiting, scheduler.num_swapped, 100 * scheduler.block_manager.gpu_usage,
                        100 * scheduler.block_manager.prefix_cache_hit_rate)
            self._last_log, self._window = now, [0, 0]

    def record_driver(self, phases: dict[str, float]) -> None:
        for key, value in phases.items():
            self.driver_time_s[key] = self.driver_time_s.get(key, 0.0) + value

    @property
    def gpu_time_s(self) -> float:
        """Rank 0's device time, summed over steps: each step's span on the device (on a
        CPU worker, its host time)."""
        return self.phase_time_s.get("gpu_step_s", 0.0)

    def record_finished(self, group) -> None:
        self.num_finished += 1

    def snapshot(self) -> dict:
        return {"steps": self.num_steps, "prompt_tokens": self.num_prompt_tokens,
                "generated_tokens": self.num_generated_tokens, "finished_requests": self.num_finished,
                "mean_step_s": self.step_time_s / max(self.num_steps, 1),
                "mean_gpu_step_s": self.gpu_time_s / max(self.num_steps, 1),
                "total_step_s": self.step_time_s, "worker_phase_total_s": dict(self.phase_time_s),
                "driver_phase_total_s": dict(self.driver_time_s)}


class RayMetrics:
    """An engine's counters as Ray metrics (ray.util.metrics), so the cluster's Prometheus
    endpoint, and the Ray dashboard's Metrics view on top of it, show every engine as
    `ray_raytp_*{engine=..., model=...}`. Fed the same dict as /metrics, at most once per
    `interval_s`; keys ending in `_total` are counters, the others gauges."""

    def __init__(self, engine: str, model: str, interval_s: float = 1.0):
        self.tags = {"engine": engine, "model": model}
        self.interval_s = interval_s
        self._metrics: dict = {}
        self._last: dict[str, float] = {}  # counters' values already published
        self._published = 0.0

    def publish(self, stats) -> None:
        """stats: a callable giving the dict, called only when a publish is due (once a
        second, not every step)."""
        now = time.monotonic()
        if now - self._published < self.interval_s:
            return
        self._published = now
        try:
            self._publish(stats())
        except Exception:  # metrics are not worth an engine: say so once, then stop publishing
            logger.exception("Ray metrics stopped")
            self.interval_s = float("inf")

    def _publish(self, stats: dict[str, float]) -> None:
        from ray.util.metrics import Counter, Gauge
        for key, value in stats.items():
            metric = self._metrics.get(key)
            if metric is None:
                kind = Counter if key.endswith("_total") else Gauge
                metric = self._metrics[key] = kind(f"raytp_{key}", description=f"raytp engine: {key}",
                                                   tag_keys=tuple(self.tags))
            if key.endswith("_total"):
                delta = value - self._last.get(key, 0.0)
                if delta > 0:
                    metric.inc(delta, tags=self.tags)
                self._last[key] = value
            else:
                metric.set(value, tags=self.tags)
