"""`kiln bench compare A.json B.json`: two runs' figures side by side, with B/A."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

# (label, field, higher is better); latency fields are in milliseconds.
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("requests completed", "completed", True),
    ("requests failed", "failed", False),
    ("requests per minute", "requests_per_minute", True),
    ("output tokens per minute", "output_tokens_per_minute", True),
    ("input+output tokens per minute", "total_tokens_per_minute", True),
    ("output tokens/s per user", "mean_output_tokens_per_s_per_user", True),
    ("goodput (req/s)", "request_goodput", True),
    ("TTFT mean (ms)", "mean_ttft_ms", False),
    ("TTFT p50 (ms)", "median_ttft_ms", False),
    ("TTFT p90 (ms)", "p90_ttft_ms", False),
    ("TTFT p99 (ms)", "p99_ttft_ms", False),
    ("TPOT mean (ms)", "mean_tpot_ms", False),
    ("TPOT p50 (ms)", "median_tpot_ms", False),
    ("TPOT p99 (ms)", "p99_tpot_ms", False),
    ("ITL p50 (ms)", "median_itl_ms", False),
    ("ITL p99 (ms)", "p99_itl_ms", False),
    ("E2E mean (ms)", "mean_e2el_ms", False),
    ("E2E p50 (ms)", "median_e2el_ms", False),
    ("E2E p90 (ms)", "p90_e2el_ms", False),
    ("E2E p99 (ms)", "p99_e2el_ms", False),
    ("cost per 1M output tokens ($)", "cost_per_1m_output_tokens", False),
    ("cost per 1M input+output tokens ($)", "cost_per_1m_total_tokens", False),
)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, A, B, B/A) for every figure either run has; B/A is marked "better" or
    "worse" by the metric's direction."""
    rows = []
    for label, key, higher_better in ROWS:
        va, vb = _number(a.get(key)), _number(b.get(key))
        if va is None and vb is None:
            continue
        ratio = ""
        if va and vb is not None:
            r = vb / va
            verdict = "" if r == 1 else ("better" if (r > 1) == higher_better else "worse")
            ratio = f"{r:.2f}x {verdict}".strip()
        rows.append((label, _show(va), _show(vb), ratio))
    return rows


def _show(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def compare_table(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> Table:
    table = Table(title="kiln bench compare", title_justify="left")
    table.add_column("metric")
    table.add_column(f"A: {name_a}", justify="right")
    table.add_column(f"B: {name_b}", justify="right")
    table.add_column("B/A", justify="right")
    for key in ("endpoint", "backend", "model_id", "workload", "load"):
        table.add_row(key, str(a.get(key, "-")), str(b.get(key, "-")), "")
    for row in compare_rows(a, b):
        table.add_row(*row)
    return table
