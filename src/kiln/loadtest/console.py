"""The terminal side of a run: a Rich live line with the running figures, and the summary
table at the end."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kiln.loadtest.metrics import RequestRecord, percentile


class LiveLine:
    """One line, redrawn a few times a second: requests done/failed, output tokens/s and
    median TTFT over the last 10 seconds, and the level being run."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self.label = ""
        self.records: list[RequestRecord] = []
        self.started = time.perf_counter()
        self._live: Live | None = None

    def __enter__(self) -> LiveLine:
        if self.enabled:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def level(self, label: str) -> None:
        self.label = label
        self.records = []
        self.started = time.perf_counter()
        self._refresh()

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Text:
        measured = [r for r in self.records if r.phase == "measure"]
        ok = [r for r in measured if r.ok]
        failed = len(measured) - len(ok)
        window = 10.0
        elapsed = time.perf_counter() - self.started
        recent = [r for r in ok if r.end >= (ok[-1].end if ok else 0) - window]
        tokens = sum(r.output_tokens for r in recent)
        span = min(window, elapsed) or 1.0
        ttft = percentile([r.ttft for r in recent if r.ttft is not None], 50)
        ttft_text = "-" if math.isnan(ttft) else f"{ttft * 1e3:.0f} ms"
        return Text.assemble(
            (f"{self.label} ", "bold"),
            f"{elapsed:5.0f} s | done {len(ok)} | ",
            (f"failed {failed}", "red" if failed else ""),
            f" | {tokens / span:.1f} out tok/s | TTFT p50 {ttft_text}",
        )


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def summary_tables(summary: dict[str, Any], title: str) -> list[Table]:
    """Latency percentiles by metric; then throughput, tokens, errors, goodput and cost."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for column in ("mean", "p50", "p90", "p99"):
        table.add_column(column, justify="right")
    for name, key in (
        ("TTFT (ms)", "ttft"),
        ("TPOT (ms)", "tpot"),
        ("ITL (ms)", "itl"),
        ("E2E latency (ms)", "e2el"),
    ):
        table.add_row(
            name,
            _ms(summary[f"mean_{key}_ms"]),
            _ms(summary[f"median_{key}_ms"]),
            _ms(summary[f"p90_{key}_ms"]),
            _ms(summary[f"p99_{key}_ms"]),
        )
    rows = [
        ("requests completed / failed", f"{summary['completed']} / {summary['failed']}"),
        ("duration (s)", _num(summary["duration"], 2)),
        ("requests per minute", _num(summary["requests_per_minute"])),
        ("output tokens per minute", _num(summary["output_tokens_per_minute"])),
        ("input+output tokens per minute", _num(summary["total_tokens_per_minute"])),
        ("output tokens/s (total)", _num(summary["output_throughput"])),
        ("output tokens/s per user (mean)", _num(summary["mean_output_tokens_per_s_per_user"])),
        (
            "tokens in / out",
            f"{summary['total_input_tokens']:,} / {summary['total_output_tokens']:,} "
            f"({summary['input_tokens_source']} / {summary['output_tokens_source']})",
        ),
    ]
    if summary["errors_by_kind"]:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(summary["errors_by_kind"].items()))
        rows.append(("errors by kind", kinds))
    if summary.get("request_goodput") is not None:
        rows.append(
            (
                "goodput (req/s within SLO)",
                f"{summary['request_goodput']:.3f} ({summary['goodput_fraction']:.0%} of requests)",
            )
        )
    if "price_per_hour" in summary:
        rows.append(
            ("cost per 1M output tokens ($)", _num(summary["cost_per_1m_output_tokens"], 2))
        )
        rows.append(
            ("cost per 1M input+output tokens ($)", _num(summary["cost_per_1m_total_tokens"], 2))
        )
    figures = Table(show_header=False)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    for name, value in rows:
        figures.add_row(name, value)
    return [table, figures]


def sweep_table(levels: Sequence[dict[str, Any]]) -> Table:
    """One row per sweep step."""
    table = Table(title="sweep", title_justify="left")
    for column in (
        "load",
        "req/min",
        "out tok/s",
        "TTFT p50 ms",
        "TPOT p50 ms",
        "E2E p90 ms",
        "errors",
    ):
        table.add_column(column, justify="right")
    for level in levels:
        s = level["summary"]
        table.add_row(
            level["load"],
            _num(s["requests_per_minute"]),
            _num(s["output_throughput"]),
            _ms(s["median_ttft_ms"]),
            _ms(s["median_tpot_ms"]),
            _ms(s["p90_e2el_ms"]),
            f"{s['failed']} ({s['error_rate']:.0%})",
        )
    return table
