"""Prometheus metrics through ``prometheus_client``: TGI's names (so TGI dashboards work) plus
kiln's engine gauges.

:class:`~kiln.serving.generation.Generation` records each request once, as it ends, in
``prometheus_client`` counters and histograms held in a registry of the server's own (several
servers can share a process, as in the tests). The engine's counters and histograms (TTFT,
time per output token, KV usage, prefix-cache hits) are read from the active model's engine at
scrape time (so they start again from zero after a model switch, as counters of a restarted
process do). Model switching adds ``kiln_model_switches``, ``kiln_model_load_failures`` and
``kiln_model_status{model, status}``.

:meth:`PrometheusExporter.render` answers in Prometheus' text format, or in OpenMetrics when
the scraper's ``Accept`` header asks for it. With ``PROMETHEUS_MULTIPROC_DIR`` set before
``prometheus_client`` is imported (tensor-parallel workers, several replicas on one host), the
request metrics are written to that directory by every process and a scrape sums them all; the
engine's gauges are those of the process that answers the scrape. The directory must be empty
at start (``prometheus_client``'s rule), and each process should hold one server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client import Histogram as PromHistogram
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kiln.engine.metrics import LATENCY_BUCKETS, TOKENS_BUCKETS, TPOT_BUCKETS, Histogram
from kiln.serving.models import ModelManager, ModelStatus


def multiprocess_mode() -> bool:
    """Whether ``prometheus_client`` keeps its values in ``PROMETHEUS_MULTIPROC_DIR``.

    NOTE: the library decides this once, when it is imported; asking it (rather than reading the
    environment now) keeps the scrape consistent with where the values really are."""
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


class RequestMetrics:
    """Request-level metrics (TGI's names), each request recorded once as it ends; the
    ``prometheus_client`` metrics are thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests that succeeded", registry=r)
        self.request_failure = Counter(
            "tgi_request_failure", "Requests that failed", ["err"], registry=r
        )
        self.request_duration = _histogram(
            "tgi_request_duration", "End-to-end request seconds", LATENCY_BUCKETS, r
        )
        self.request_queue_duration = _histogram(
            "tgi_request_queue_duration", "Seconds queued", LATENCY_BUCKETS, r
        )
        self.request_mean_time_per_token = _histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean seconds per generated token",
            TPOT_BUCKETS,
            r,
        )
        self.request_input_length = _histogram(
            "tgi_request_input_length", "Prompt tokens", TOKENS_BUCKETS, r
        )
        self.request_generated_tokens = _histogram(
            "tgi_request_generated_tokens", "Generated tokens", TOKENS_BUCKETS, r
        )

    def record_start(self) -> None:
        self.request_count.inc()

    def record_success(
        self, duration: float, queue: float, input_tokens: int, generated_tokens: int
    ) -> None:
        self.request_success.inc()
        self.request_duration.observe(duration)
        self.request_queue_duration.observe(queue)
        self.request_input_length.observe(input_tokens)
        self.request_generated_tokens.observe(generated_tokens)
        if generated_tokens:
            self.request_mean_time_per_token.observe((duration - queue) / generated_tokens)

    def record_failure(self, error_type: str) -> None:
        self.request_failure.labels(err=error_type).inc()


def _histogram(
    name: str, help_text: str, buckets: tuple[float, ...], registry: CollectorRegistry
) -> PromHistogram:
    return PromHistogram(name, help_text, buckets=buckets, registry=registry)


class LiveCollector(Collector):
    """What is read at scrape time rather than recorded as it happens: requests in flight, the
    models' statuses and the active engine's gauges, counters and histograms."""

    def __init__(self, models: ModelManager, in_flight: Callable[[], int]) -> None:
        self._models = models
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "kiln_requests_in_flight", "Requests admitted", value=self._in_flight()
        )
        models = self._models
        yield CounterMetricFamily(
            "kiln_model_switches", "Model switches completed", value=models.num_switches
        )
        yield CounterMetricFamily(
            "kiln_model_load_failures", "Model loads failed", value=models.num_failed_loads
        )
        status = GaugeMetricFamily(
            "kiln_model_status",
            "1 for the status each model is in (available, loading...)",
            labels=["model", "status"],
        )
        for report in models.statuses():
            for each in ModelStatus:
                status.add_metric([report.name, each.value], int(report.status is each))
        yield status
        active = models.active
        if active is None:  # between an unload and a load: no engine to report on
            return
        stats = active.engine.stats()
        engine = active.engine.metrics
        yield GaugeMetricFamily("tgi_queue_size", "Requests waiting", value=stats.num_waiting)
        yield GaugeMetricFamily(
            "tgi_batch_current_size", "Requests running", value=stats.num_running
        )
        yield GaugeMetricFamily(
            "kiln_kv_cache_blocks", "KV cache blocks", value=stats.num_kv_blocks
        )
        yield GaugeMetricFamily(
            "kiln_kv_cache_blocks_used", "KV blocks in use", value=stats.num_kv_blocks_used
        )
        yield GaugeMetricFamily(
            "kiln_kv_cache_usage", "Fraction of KV blocks in use", value=stats.kv_cache_usage
        )
        yield CounterMetricFamily(
            "kiln_prefix_cache_queries", "Prompt tokens looked up", value=stats.prefix_cache_queries
        )
        yield CounterMetricFamily(
            "kiln_prefix_cache_hits", "Prompt tokens found cached", value=stats.prefix_cache_hits
        )
        yield CounterMetricFamily(
            "kiln_preemptions", "Requests preempted", value=stats.num_preemptions
        )
        yield CounterMetricFamily(
            "kiln_prompt_tokens", "Prompt tokens processed", value=engine.num_prompt_tokens
        )
        yield CounterMetricFamily(
            "kiln_generation_tokens", "Tokens generated", value=engine.num_generation_tokens
        )
        yield _histogram_family(
            "kiln_time_to_first_token_seconds", "TTFT", engine.time_to_first_token
        )
        yield _histogram_family(
            "kiln_time_per_output_token_seconds", "TPOT", engine.time_per_output_token
        )
        yield _histogram_family("kiln_queue_time_seconds", "Seconds waiting", engine.queue_time)
        yield _histogram_family(
            "kiln_tokens_per_step", "Tokens computed per engine step", engine.tokens_per_step
        )


def _histogram_family(name: str, help_text: str, h: Histogram) -> HistogramMetricFamily:
    bounds = (*h.buckets, float("inf"))
    buckets = [
        (floatToGoString(bound), count) for bound, count in zip(bounds, h.cumulative(), strict=True)
    ]
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=h.total)


class PrometheusExporter:
    """The server's ``/metrics``: the request metrics and the live ones, in the format the
    scraper asks for."""

    def __init__(
        self, requests: RequestMetrics, models: ModelManager, in_flight: Callable[[], int]
    ) -> None:
        self._requests = requests
        self._live = LiveCollector(models, in_flight)
        requests.registry.register(self._live)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, chosen from an ``Accept`` header."""
        encode, content_type = choose_encoder(accept or "")
        registry = self._requests.registry
        if multiprocess_mode():
            # Every process's request metrics from the shared directory, plus this one's engine.
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(self._live)
        body = encode(registry)
        if content_type.startswith("text/plain"):
            body = tgi_counter_names(body)
        return body, content_type


_TYPE_LINE = re.compile(rb"^# TYPE (\S+) (\S+)$", re.MULTILINE)


def tgi_counter_names(text: bytes) -> bytes:
    """Prometheus' text format with each counter's samples named as TGI names them.

    NOTE: ``prometheus_client`` writes a counter ``tgi_request_count`` as samples
    ``tgi_request_count_total`` (OpenMetrics' rule, which it applies to the text format too) and
    adds ``*_created`` gauges; TGI writes ``tgi_request_count`` and no ``_created``, and TGI's
    dashboards query those names, so the text format gets them back here. OpenMetrics keeps the
    suffix its specification requires: a Prometheus that negotiates OpenMetrics (its default)
    stores ``tgi_request_count_total``, unless the scrape config sets
    ``scrape_protocols: [PrometheusText0.0.4]``.
    """
    types = {m.group(1): m.group(2) for m in _TYPE_LINE.finditer(text)}
    counters = {
        name[: -len(b"_total")]
        for name, kind in types.items()
        if kind == b"counter" and name.endswith(b"_total")
    }
    created = {
        base + b"_created"
        for base in counters | {n for n, kind in types.items() if kind == b"histogram"}
    }
    out = []
    for line in text.splitlines(keepends=True):
        comment = line.startswith((b"# HELP ", b"# TYPE "))
        head, name, tail = _split_name(line, 7 if comment else 0)
        if name in created:
            continue
        if name.endswith(b"_total") and name[: -len(b"_total")] in counters:
            line = head + name[: -len(b"_total")] + tail
        out.append(line)
    return b"".join(out)


def _split_name(line: bytes, start: int) -> tuple[bytes, bytes, bytes]:
    """``line`` as (what precedes the metric name, the name, the rest)."""
    end = start
    while end < len(line) and line[end : end + 1] not in (b" ", b"{", b"\n"):
        end += 1
    return line[:start], line[start:end], line[end:]
