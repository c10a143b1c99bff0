"""Per-request records and the summary maths: percentiles, TTFT, TPOT, ITL, throughput,
goodput and cost.

Times are seconds. A request's token events are the streamed chunks that carried text; one
chunk may carry several tokens (a server batching its stream, or a detokenizer holding back an
incomplete character), so each event has a token count and the inter-token latencies of a
k-token event are k equal shares of the gap before it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request's outcome.

    Args:
        start: when it was sent, seconds since the run began.
        ttft: seconds from sending to the first token event (None if none came).
        e2e: seconds from sending to the end of the stream (None if it failed before the end).
        event_times: seconds from sending to each token event.
        event_tokens: tokens carried by each event (sums to output_tokens).
        input_tokens: prompt tokens, from the server's usage when it reported them.
        output_tokens: generated tokens, from the server's usage when it reported them.
        input_source: "usage", "counted" (our tokenizer) or "unknown".
        output_source: "usage" or "counted" (streamed events, or our tokenizer).
        error: the error kind when the request failed ("connect", "http_503", ...).
        error_detail: the error's message, shortened.
        phase: "warmup" or "measure": warm-up requests are left out of every figure.
        step: the sweep step that sent it (0 without a sweep).
        turn: the turn of its conversation (0 for single-turn workloads).
        text: the generated text (kept for multi-turn chat and the JSON file).
    """

    start: float
    ttft: float | None = None
    e2e: float | None = None
    event_times: list[float] = field(default_factory=list)
    event_tokens: list[int] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int = 0
    input_source: str = "unknown"
    output_source: str = "counted"
    error: str | None = None
    error_detail: str | None = None
    phase: str = "measure"
    step: int = 0
    turn: int = 0
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def end(self) -> float:
        """When it finished (or failed), seconds since the run began."""
        if self.e2e is not None:
            return self.start + self.e2e
        if self.event_times:
            return self.start + self.event_times[-1]
        return self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (tokens - 1)."""
        return tpot(self.e2e, self.ttft, self.output_tokens)

    @property
    def itls(self) -> list[float]:
        return inter_token_latencies(self.event_times, self.event_tokens)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between order statistics (numpy's
    default method), so p50 of an even-sized sample is the mean of the two middle values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def tpot(e2e: float | None, ttft: float | None, output_tokens: int) -> float | None:
    """Time per output token excluding the first: the first token's wait is TTFT's, so a
    one-token answer has no TPOT."""
    if e2e is None or ttft is None or output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


def inter_token_latencies(event_times: Sequence[float], event_tokens: Sequence[int]) -> list[float]:
    """Latencies between consecutive tokens. An event carrying k tokens after a gap g gives k
    values of g / k: the tokens were produced during the gap, and the k values add up to it,
    so the ITLs of a request always sum to its last event minus its first. The first event's
    extra tokens came with the first token (they are part of TTFT), so they add nothing, and an
    event with no tokens is not a token boundary."""
    out: list[float] = []
    last: float | None = None
    for time, k in zip(event_times, event_tokens, strict=True):
        if k <= 0:
            continue  # no token came: the next gap runs from the last event that had one
        if last is not None:
            out.extend([(time - last) / k] * k)
        last = time
    return out


def apportion(weights: Sequence[int], total: int) -> list[int]:
    """Split ``total`` tokens over events in proportion to ``weights`` (our per-event token
    estimates), whole numbers by largest remainder, so the counts add up to the server's own
    total. With no usable weights, one token per event."""
    if not weights:
        return []
    base = [max(w, 0) for w in weights]
    if sum(base) == 0:
        base = [1] * len(weights)
    scale = total / sum(base)
    exact = [w * scale for w in base]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def cost_per_million(tokens_per_minute: float, price_per_hour: float) -> float:
    """Dollars per 1M tokens for an instance at ``price_per_hour`` producing
    ``tokens_per_minute``: the hour's price over the tokens an hour makes."""
    if tokens_per_minute <= 0:
        return math.inf
    return price_per_hour / (tokens_per_minute * 60.0) * 1e6


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput, in seconds; None: not constrained."""

    ttft: float | None = None
    tpot: float | None = None

    def met(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        if self.ttft is not None and (record.ttft is None or record.ttft > self.ttft):
            return False
        record_tpot = record.tpot
        return not (self.tpot is not None and record_tpot is not None and record_tpot > self.tpot)


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """mean/median/std/p50/p90/p99 in milliseconds, with vLLM's field names."""
    ms = [v * 1e3 for v in values_s]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else math.nan,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": statistics.pstdev(ms) if ms else math.nan,
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = percentile(ms, p)
    return out


def summarize(
    records: Sequence[RequestRecord],
    slo: Slo | None = None,
    price_per_hour: float | None = None,
) -> dict[str, Any]:
    """The figures of one load level, from its measured (non-warm-up) records.

    The duration runs from the first measured request's start to the last one's end, so
    requests per minute and tokens per minute are rates over the time the load was on.
    Tokens per minute are given both ways: output only, and input + output (what the
    tutorials count); the cost per 1M tokens follows each.
    """
    measured = [r for r in records if r.phase == "measure"]
    done = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    duration = (max(r.end for r in measured) - min(r.start for r in measured)) if measured else 0.0
    total_in = sum(r.input_tokens or 0 for r in done)
    total_out = sum(r.output_tokens for r in done)
    per_s = 1.0 / duration if duration > 0 else 0.0
    errors: dict[str, int] = {}
    for r in failed:
        kind = r.error or "incomplete"
        errors[kind] = errors.get(kind, 0) + 1
    good = sum(1 for r in done if (slo or Slo()).met(r))
    tpots = [t for r in done if (t := r.tpot) is not None]
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(failed),
        "num_requests": len(measured),
        "error_rate": len(failed) / len(measured) if measured else 0.0,
        "errors_by_kind": errors,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "input_tokens_source": _sources(r.input_source for r in done),
        "output_tokens_source": _sources(r.output_source for r in done),
        "request_throughput": len(done) * per_s,
        "request_goodput": good * per_s if slo and (slo.ttft or slo.tpot) else None,
        "goodput_fraction": good / len(measured) if slo and (slo.ttft or slo.tpot) else None,
        "output_throughput": total_out * per_s,
        "total_token_throughput": (total_in + total_out) * per_s,
        "requests_per_minute": len(done) * per_s * 60,
        "output_tokens_per_minute": total_out * per_s * 60,
        "total_tokens_per_minute": (total_in + total_out) * per_s * 60,
        "mean_output_tokens_per_s_per_user": (
            statistics.fmean(1.0 / t for t in tpots if t > 0) if tpots else math.nan
        ),
    }
    summary.update(_stats("ttft", [r.ttft for r in done if r.ttft is not None]))
    summary.update(_stats("tpot", tpots))
    summary.update(_stats("itl", [x for r in done for x in r.itls]))
    summary.update(_stats("e2el", [r.e2e for r in done if r.e2e is not None]))
    if price_per_hour is not None:
        summary["price_per_hour"] = price_per_hour
        summary["cost_per_1m_output_tokens"] = cost_per_million(
            summary["output_tokens_per_minute"], price_per_hour
        )
        summary["cost_per_1m_total_tokens"] = cost_per_million(
            summary["total_tokens_per_minute"], price_per_hour
        )
    return summary


def _sources(sources: Any) -> str:
    """One word for where a run's token counts came from ("usage", "counted" or "mixed")."""
    seen = set(sources)
    if not seen:
        return "none"
    return seen.pop() if len(seen) == 1 else "mixed"


def throughput_over_time(
    records: Sequence[RequestRecord], bucket_s: float = 1.0
) -> list[tuple[float, float]]:
    """Output tokens per second in consecutive buckets, each token placed at the time its
    event arrived: (bucket start, tokens/s). Failed requests' streamed tokens count too (the
    server produced them)."""
    stamps = [
        (r.start + t, k)
        for r in records
        if r.phase == "measure"
        for t, k in zip(r.event_times, r.event_tokens, strict=True)
    ]
    if not stamps:
        return []
    origin = min(r.start for r in records if r.phase == "measure")
    last = max(t for t, _ in stamps)
    buckets = [0.0] * (int((last - origin) / bucket_s) + 1)
    for t, k in stamps:
        buckets[int((t - origin) / bucket_s)] += k
    return [(origin + i * bucket_s, n / bucket_s) for i, n in enumerate(buckets)]
