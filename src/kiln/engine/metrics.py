"""Engine metrics: counters and histograms updated each step, plus a snapshot of gauges.

The server exports these through ``prometheus_client`` at scrape time
(:mod:`kiln.serving.metrics`); buckets follow vLLM's choices so the dashboards people already
have keep working.

NOTE: plain numbers here rather than ``prometheus_client`` metrics: the engine also runs without
a server (``LLM``), where in ``prometheus_client``'s multiprocess mode every metric object would
write a memory-mapped file; the Python API reads ``count``, ``total`` and ``quantile`` from them;
and they belong to one engine, so a model switch starts them from zero.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)
TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # last: above every bucket (+Inf)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (coarse, for logs and tests)."""
        if not self.count:
            return 0.0
        target = q * self.count
        for bound, cumulative in zip((*self.buckets, float("inf")), self.cumulative(), strict=True):
            if cumulative >= target:
                return bound
        return float("inf")


@dataclass
class EngineMetrics:
    """Totals since start. Times in seconds."""

    num_requests_finished: dict[str, int] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    tokens_per_step: Histogram = field(default_factory=lambda: Histogram(TOKENS_BUCKETS))
    prompt_tokens: Histogram = field(default_factory=lambda: Histogram(TOKENS_BUCKETS))
    generation_tokens: Histogram = field(default_factory=lambda: Histogram(TOKENS_BUCKETS))


@dataclass(frozen=True)
class EngineStats:
    """Gauges at one moment."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_kv_blocks_used: int
    num_kv_blocks_cached: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int

    @property
    def kv_cache_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks if self.num_kv_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )
