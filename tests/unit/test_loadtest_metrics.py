"""The load tester's metric maths: percentiles, TPOT, ITL with multi-token events, token
apportioning, goodput, throughput and the tutorial's cost figure."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from kiln.loadtest.compare import compare_rows
from kiln.loadtest.metrics import (
    RequestRecord,
    Slo,
    apportion,
    cost_per_million,
    inter_token_latencies,
    percentile,
    summarize,
    throughput_over_time,
    tpot,
)
from kiln.loadtest.runner import Level, LoadShape, SweepRule
from kiln.loadtest.svg import nice_ticks


def test_percentile_interpolates_like_numpy_linear() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    # rank (n-1) * p = 3 * 0.9 = 2.7: between 3 and 4
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0


def test_tpot_excludes_the_first_token() -> None:
    # 1 s to the first token, then 9 more tokens over 0.9 s: 100 ms each.
    assert tpot(e2e=1.9, ttft=1.0, output_tokens=10) == pytest.approx(0.1)
    assert tpot(e2e=1.0, ttft=1.0, output_tokens=1) is None
    assert tpot(e2e=None, ttft=1.0, output_tokens=5) is None


def test_itl_splits_a_multi_token_event_into_equal_gaps() -> None:
    # Events at 0.1 (first token), 0.2 (1 token), 0.5 (3 tokens in one chunk), 0.6 (1 token).
    itls = inter_token_latencies([0.1, 0.2, 0.5, 0.6], [1, 1, 3, 1])
    assert itls == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    assert sum(itls) == pytest.approx(0.6 - 0.1)
    # A 2-token first event adds nothing (its tokens came with the first token); an event
    # with no tokens adds nothing either.
    assert inter_token_latencies([0.3, 0.5, 0.9], [2, 0, 4]) == pytest.approx([0.15] * 4)
    assert inter_token_latencies([0.3], [5]) == []


def test_itl_of_one_token_events_is_the_gaps() -> None:
    assert inter_token_latencies([0.1, 0.15, 0.35], [1, 1, 1]) == pytest.approx([0.05, 0.2])


def test_apportion_matches_the_server_total() -> None:
    assert apportion([1, 1, 1], 3) == [1, 1, 1]
    assert apportion([1, 2, 1], 8) == [2, 4, 2]
    counts = apportion([1, 1, 1], 4)
    assert sum(counts) == 4 and sorted(counts) == [1, 1, 2]
    assert apportion([0, 0], 3) in ([2, 1], [1, 2])
    assert apportion([], 0) == []
    assert sum(apportion([3, 1, 5, 2], 17)) == 17


def _record(start: float, ttft: float, e2e: float, tokens: int, **kw: object) -> RequestRecord:
    # Evenly spaced one-token events from ttft to e2e.
    times = [ttft + (e2e - ttft) * i / max(tokens - 1, 1) for i in range(tokens)]
    return RequestRecord(
        start=start,
        ttft=ttft,
        e2e=e2e,
        event_times=times,
        event_tokens=[1] * tokens,
        input_tokens=100,
        output_tokens=tokens,
        input_source="usage",
        output_source="usage",
        **kw,  # type: ignore[arg-type]
    )


def test_summary_figures() -> None:
    records = [
        _record(0.0, 0.2, 1.1, 10),  # TPOT 0.1
        _record(1.0, 0.4, 2.2, 10),  # TPOT 0.2, ends at 3.2
        _record(0.5, 0.1, 0.5, 5, phase="warmup"),  # left out
        RequestRecord(start=2.0, error="http_503", error_detail="busy"),
        RequestRecord(start=2.5, error="connect"),
    ]
    s = summarize(records, Slo(ttft=0.3, tpot=0.15), price_per_hour=1.0)
    assert s["completed"] == 2 and s["failed"] == 2 and s["num_requests"] == 4
    assert s["errors_by_kind"] == {"http_503": 1, "connect": 1}
    assert s["error_rate"] == 0.5
    assert s["duration"] == pytest.approx(3.2)  # first start 0.0, last end 1.0 + 2.2
    assert s["total_input_tokens"] == 200 and s["total_output_tokens"] == 20
    assert s["requests_per_minute"] == pytest.approx(2 / 3.2 * 60)
    assert s["output_tokens_per_minute"] == pytest.approx(20 / 3.2 * 60)
    assert s["total_tokens_per_minute"] == pytest.approx(220 / 3.2 * 60)
    assert s["mean_ttft_ms"] == pytest.approx(300.0)
    assert s["median_tpot_ms"] == pytest.approx(150.0)
    assert s["mean_itl_ms"] == pytest.approx(150.0)  # 9 gaps of 100 ms, 9 of 200 ms
    assert s["p50_e2el_ms"] == pytest.approx(1650.0)
    # Only the first request meets TTFT <= 300 ms and TPOT <= 150 ms; 1 of 4 measured.
    assert s["request_goodput"] == pytest.approx(1 / 3.2)
    assert s["goodput_fraction"] == pytest.approx(0.25)
    assert s["cost_per_1m_output_tokens"] == pytest.approx(1.0 / (20 / 3.2 * 3600) * 1e6)
    assert s["input_tokens_source"] == "usage"
    assert s["mean_output_tokens_per_s_per_user"] == pytest.approx((10 + 5) / 2)


def test_summary_without_slo_has_no_goodput() -> None:
    s = summarize([_record(0.0, 0.2, 1.1, 10)])
    assert s["request_goodput"] is None
    assert "cost_per_1m_output_tokens" not in s


def test_tutorial_cost_per_million_tokens() -> None:
    # The tutorials: 10,872 tokens per minute on a $0.7582/hour instance -> $1.16 per 1M.
    assert round(cost_per_million(10_872, 0.7582), 2) == 1.16
    assert cost_per_million(0, 1.0) == math.inf


def test_throughput_over_time_places_tokens_at_their_arrival() -> None:
    records = [
        RequestRecord(start=0.0, event_times=[0.5, 1.5], event_tokens=[1, 3], e2e=1.5),
        RequestRecord(start=1.0, event_times=[0.2], event_tokens=[2], e2e=0.2),
    ]
    assert throughput_over_time(records) == [(0.0, 1.0), (1.0, 5.0)]


def _level(step: int, rate: float, ttft_ms: float, tokens_per_s: float, errors: float) -> Level:
    summary = {
        "median_ttft_ms": ttft_ms,
        "output_throughput": tokens_per_s,
        "error_rate": errors,
    }
    return Level(step, LoadShape(rate=rate), [], summary)


def test_sweep_stops_at_the_knee() -> None:
    rule = SweepRule(max_steps=8, latency_factor=4.0, min_gain=0.1, max_error_rate=0.05)
    assert rule.knee([_level(0, 1, 100, 50, 0.0)]) is None
    assert rule.knee([_level(0, 1, 100, 50, 0.0), _level(1, 2, 150, 90, 0.0)]) is None
    assert "latency" in (rule.knee([_level(0, 1, 100, 50, 0), _level(1, 2, 500, 90, 0)]) or "")
    assert "throughput" in (rule.knee([_level(0, 1, 100, 50, 0), _level(1, 2, 150, 52, 0)]) or "")
    assert "error" in (rule.knee([_level(0, 1, 100, 50, 0), _level(1, 2, 150, 90, 0.2)]) or "")
    assert rule.next_shape(LoadShape(rate=1.5)).rate == 3.0
    assert rule.next_shape(LoadShape(users=1)).users == 2


def test_compare_marks_direction() -> None:
    a = {"completed": 10, "output_tokens_per_minute": 100.0, "median_ttft_ms": 50.0}
    b = {"completed": 10, "output_tokens_per_minute": 150.0, "median_ttft_ms": 100.0}
    rows = {r[0]: r for r in compare_rows(a, b)}
    assert rows["output tokens per minute"][3] == "1.50x better"
    assert rows["TTFT p50 (ms)"][3] == "2.00x worse"
    assert rows["requests completed"][3] == "1.00x"


def test_nice_ticks_cover_the_range() -> None:
    ticks = nice_ticks(0, 87)
    assert ticks[0] == 0 and ticks[-1] >= 87
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and steps.pop() in (10, 20, 25, 50)


def test_loadtest_talks_http_only() -> None:
    """kiln.loadtest imports no torch and nothing of the engine or server: only the stdlib,
    httpx, rich, tokenizers and kiln's tokenizer and errors."""
    import ast

    import kiln.loadtest

    package = Path(kiln.loadtest.__file__).parent
    allowed_kiln = ("kiln.loadtest", "kiln.text.tokenizer", "kiln.errors")
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in ("torch", "numpy", "fastapi", "uvicorn"), f"{file.name}: {name}"
                if root == "kiln":
                    assert name.startswith(allowed_kiln), f"{file.name}: {name}"


def test_loadtest_and_plan_load_without_torch() -> None:
    """What the import graph above promises holds at run time: `kiln bench serve`'s package and
    the sizing planner start without loading torch (``kiln`` itself imports it lazily)."""
    import subprocess
    import sys

    code = "import sys, kiln.loadtest, kiln.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
