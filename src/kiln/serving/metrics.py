"""Prometheus metrics: TGI's names (so TGI dashboards work) plus kiln's engine gauges.

:class:`~kiln.serving.generation.Generation` records each request once, as it ends; the engine's own
counters and histograms (TTFT, time per output token, KV usage, prefix-cache hits) are read
from the active model's engine at scrape time (so they start again from zero after a model
switch, as counters of a restarted process do). Model switching adds ``kiln_model_switches``,
``kiln_model_load_failures`` and ``kiln_model_status{model, status}``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from kiln.engine.metrics import LATENCY_BUCKETS, TOKENS_BUCKETS, TPOT_BUCKETS, Histogram
from kiln.serving.models import ModelManager, ModelStatus


@dataclass
class RequestMetrics:
    """Request-level metrics, each request recorded once as it ends (thread-safe)."""

    request_count: int = 0
    request_success: int = 0
    request_failure: Counter[str] = field(default_factory=Counter)
    request_duration: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    request_queue_duration: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    request_mean_time_per_token: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    request_input_length: Histogram = field(default_factory=lambda: Histogram(TOKENS_BUCKETS))
    request_generated_tokens: Histogram = field(default_factory=lambda: Histogram(TOKENS_BUCKETS))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_start(self) -> None:
        with self._lock:
            self.request_count += 1

    def record_success(
        self, duration: float, queue: float, input_tokens: int, generated_tokens: int
    ) -> None:
        with self._lock:
            self.request_success += 1
            self.request_duration.observe(duration)
            self.request_queue_duration.observe(queue)
            self.request_input_length.observe(input_tokens)
            self.request_generated_tokens.observe(generated_tokens)
            if generated_tokens:
                self.request_mean_time_per_token.observe((duration - queue) / generated_tokens)

    def record_failure(self, error_type: str) -> None:
        with self._lock:
            self.request_failure[error_type] += 1


def _histogram(lines: list[str], name: str, help_text: str, h: Histogram) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for bound, count in zip((*h.buckets, float("inf")), h.cumulative(), strict=True):
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        lines.append(f'{name}_bucket{{le="{le}"}} {count}')
    lines += [f"{name}_sum {h.total}", f"{name}_count {h.count}"]


def _scalar(lines: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def _models(lines: list[str], models: ModelManager) -> None:
    _scalar(
        lines, "kiln_model_switches", "counter", "Model switches completed", models.num_switches
    )
    _scalar(
        lines, "kiln_model_load_failures", "counter", "Model loads failed", models.num_failed_loads
    )
    lines += [
        "# HELP kiln_model_status 1 for the status each model is in (available, loading...)",
        "# TYPE kiln_model_status gauge",
    ]
    for report in models.statuses():
        name = _label(report.name)
        for status in ModelStatus:
            value = int(report.status is status)
            lines.append(f'kiln_model_status{{model="{name}",status="{status.value}"}} {value}')


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(m: RequestMetrics, models: ModelManager, in_flight: int) -> str:
    """The Prometheus text exposition of ``m``, the models' statuses and the active model's
    engine."""
    lines: list[str] = []
    _scalar(lines, "tgi_request_count", "counter", "Requests received", m.request_count)
    _scalar(lines, "tgi_request_success", "counter", "Requests that succeeded", m.request_success)
    lines += [
        "# HELP tgi_request_failure Requests that failed",
        "# TYPE tgi_request_failure counter",
    ]
    for err, count in sorted(m.request_failure.items()):
        lines.append(f'tgi_request_failure{{err="{err}"}} {count}')
    _histogram(lines, "tgi_request_duration", "End-to-end request seconds", m.request_duration)
    _histogram(lines, "tgi_request_queue_duration", "Seconds queued", m.request_queue_duration)
    _histogram(
        lines,
        "tgi_request_mean_time_per_token_duration",
        "Mean seconds per generated token",
        m.request_mean_time_per_token,
    )
    _histogram(lines, "tgi_request_input_length", "Prompt tokens", m.request_input_length)
    _histogram(
        lines, "tgi_request_generated_tokens", "Generated tokens", m.request_generated_tokens
    )
    _scalar(lines, "kiln_requests_in_flight", "gauge", "Requests admitted", in_flight)
    _models(lines, models)
    active = models.active
    if active is None:  # between an unload and a load: no engine to report on
        return "\n".join(lines) + "\n"
    stats = active.engine.stats()
    engine = active.engine.metrics
    _scalar(lines, "tgi_queue_size", "gauge", "Requests waiting", stats.num_waiting)
    _scalar(lines, "tgi_batch_current_size", "gauge", "Requests running", stats.num_running)
    _scalar(lines, "kiln_kv_cache_blocks", "gauge", "KV cache blocks", stats.num_kv_blocks)
    _scalar(
        lines, "kiln_kv_cache_blocks_used", "gauge", "KV blocks in use", stats.num_kv_blocks_used
    )
    _scalar(
        lines, "kiln_kv_cache_usage", "gauge", "Fraction of KV blocks in use", stats.kv_cache_usage
    )
    _scalar(
        lines,
        "kiln_prefix_cache_queries",
        "counter",
        "Prompt tokens looked up",
        stats.prefix_cache_queries,
    )
    _scalar(
        lines,
        "kiln_prefix_cache_hits",
        "counter",
        "Prompt tokens found cached",
        stats.prefix_cache_hits,
    )
    _scalar(lines, "kiln_preemptions", "counter", "Requests preempted", stats.num_preemptions)
    _scalar(
        lines, "kiln_prompt_tokens", "counter", "Prompt tokens processed", engine.num_prompt_tokens
    )
    _scalar(
        lines, "kiln_generation_tokens", "counter", "Tokens generated", engine.num_generation_tokens
    )
    _histogram(lines, "kiln_time_to_first_token_seconds", "TTFT", engine.time_to_first_token)
    _histogram(lines, "kiln_time_per_output_token_seconds", "TPOT", engine.time_per_output_token)
    _histogram(lines, "kiln_queue_time_seconds", "Seconds waiting", engine.queue_time)
    _histogram(
        lines, "kiln_tokens_per_step", "Tokens computed per engine step", engine.tokens_per_step
    )
    return "\n".join(lines) + "\n"
