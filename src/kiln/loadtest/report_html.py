"""One self-contained HTML report of a run, built from its results document: the settings,
the figures, errors, and inline-SVG plots (latency CDFs, throughput over time, TTFT and TPOT
against load for sweeps, and the Pareto plot of tokens/s per user against total tokens/s).
No scripts, fonts or styles are fetched: it opens with no network."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.loadtest.svg import Series, cdf_points, chart

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #212529; max-width: 1300px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #dee2e6; padding: 4px 10px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots figure { margin: 0; border: 1px solid #dee2e6; }
.note { color: #868e96; font-size: 13px; }
"""


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(svg: str, caption: str) -> str:
    return f'<figure>{svg}<figcaption class="note">{html.escape(caption)}</figcaption></figure>'


def _level_records(doc: dict[str, Any], step: int) -> list[dict[str, Any]]:
    return [
        r
        for r in doc["requests"]
        if r["step"] == step and r["phase"] == "measure" and r["error"] is None
    ]


def _load_value(level: dict[str, Any]) -> float:
    shape = level["shape"]
    return float(shape["users"] if shape["users"] is not None else shape["rate"])


def render(doc: dict[str, Any]) -> str:
    """The report's HTML text."""
    levels = doc["levels"]
    sweep = len(levels) > 1
    settings = [
        ("endpoint", doc.get("endpoint")),
        ("API", doc.get("backend")),
        ("model", doc.get("model_id")),
        ("workload", doc.get("workload")),
        ("load", doc.get("load") if not sweep else f"sweep of {len(levels)} steps"),
        ("date", doc.get("date")),
    ]
    if sweep:
        settings.append(("sweep stopped", doc.get("sweep_stop_reason")))
    figures = [
        ("requests completed / failed", f"{doc['completed']} / {doc['failed']}"),
        ("duration (s)", doc["duration"]),
        ("requests per minute", doc["requests_per_minute"]),
        ("output tokens per minute", doc["output_tokens_per_minute"]),
        ("input+output tokens per minute", doc["total_tokens_per_minute"]),
        (
            "total input / output tokens",
            f"{doc['total_input_tokens']} / {doc['total_output_tokens']}",
        ),
    ]
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        figures.append(
            (
                f"{name} mean / p50 / p90 / p99 (ms)",
                " / ".join(
                    _fmt(doc.get(f"{s}_{key}_ms")) for s in ("mean", "median", "p90", "p99")
                ),
            )
        )
    if doc.get("request_goodput") is not None:
        figures.append(("goodput (req/s within SLO)", doc["request_goodput"]))
    if doc.get("price_per_hour") is not None:
        figures.append(("price per hour ($)", _fmt(doc["price_per_hour"], 4)))
        figures.append(
            ("cost per 1M output tokens ($)", _fmt(doc.get("cost_per_1m_output_tokens"), 2))
        )
        figures.append(
            ("cost per 1M input+output tokens ($)", _fmt(doc.get("cost_per_1m_total_tokens"), 2))
        )
    errors = doc.get("errors_by_kind") or {}

    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        "<title>kiln bench serve report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>kiln bench serve</h1>",
        _table(["setting", "value"], settings),
        "<h2>Figures" + (" (best step)" if sweep else "") + "</h2>",
        _table(["metric", "value"], figures),
    ]
    if errors:
        parts.append("<h2>Errors</h2>")
        parts.append(_table(["kind", "count"], sorted(errors.items())))
    if doc.get("notes"):
        parts.append("<h2>Notes</h2><ul>")
        parts.extend(f"<li>{html.escape(n)}</li>" for n in doc["notes"])
        parts.append("</ul>")
    if sweep:
        parts.append("<h2>Sweep</h2>")
        parts.append(
            _table(
                ["load", "req/min", "out tok/s", "TTFT p50 ms", "TPOT p50 ms", "failed"],
                [
                    (
                        lv["load"],
                        lv["summary"]["requests_per_minute"],
                        lv["summary"]["output_throughput"],
                        lv["summary"]["median_ttft_ms"],
                        lv["summary"]["median_tpot_ms"],
                        lv["summary"]["failed"],
                    )
                    for lv in levels
                ],
            )
        )
    parts.append('<h2>Plots</h2><div class="plots">')
    parts.extend(_plots(doc))
    parts.append("</div></body></html>")
    return "\n".join(parts)


def _plots(doc: dict[str, Any]) -> list[str]:
    levels = doc["levels"]
    out = []
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E latency")):
        series = [
            Series(
                lv["load"],
                cdf_points([r[key] * 1e3 for r in _level_records(doc, lv["step"]) if r[key]]),
            )
            for lv in levels
        ]
        out.append(
            _figure(
                chart(series, f"{name} CDF", f"{name} (ms)", "fraction of requests"),
                f"Cumulative distribution of {name} per request.",
            )
        )
    itls = [x * 1e3 for row in doc.get("itls") or [] for x in row]
    out.append(
        _figure(
            chart(
                [Series(doc["load"], cdf_points(itls))], "ITL CDF", "ITL (ms)", "fraction of tokens"
            ),
            "Inter-token latency; a chunk of k tokens counts k gaps of 1/k its wait.",
        )
    )
    out.append(
        _figure(
            chart(
                [
                    Series(
                        lv["load"],
                        [
                            (t - lv["throughput_over_time"][0][0], v)
                            for t, v in lv["throughput_over_time"]
                        ],
                    )
                    for lv in levels
                    if lv["throughput_over_time"]
                ],
                "Throughput over time",
                "seconds into the level",
                "output tokens/s",
            ),
            "Output tokens per second in 1-second buckets, each token at its arrival.",
        )
    )
    if len(levels) > 1:
        unit = "users" if levels[0]["shape"]["users"] is not None else "offered req/s"
        loads = [_load_value(lv) for lv in levels]
        summaries = [lv["summary"] for lv in levels]
        for key, name in (("ttft", "TTFT"), ("tpot", "TPOT")):
            series = [
                Series(
                    f"{name} {stat}",
                    [
                        (x, s[f"{field}_{key}_ms"])
                        for x, s in zip(loads, summaries, strict=True)
                        if s[f"{field}_{key}_ms"] is not None
                    ],
                )
                for stat, field in (("p50", "median"), ("p90", "p90"))
            ]
            out.append(
                _figure(
                    chart(series, f"{name} vs load", unit, f"{name} (ms)"),
                    f"{name} percentiles at each sweep step.",
                )
            )
    pareto = [
        (lv["summary"]["output_throughput"], lv["summary"]["mean_output_tokens_per_s_per_user"])
        for lv in levels
        if lv["summary"]["mean_output_tokens_per_s_per_user"] is not None
    ]
    out.append(
        _figure(
            chart(
                [Series("load levels", sorted(pareto))],
                "Pareto: per-user vs total",
                "total output tokens/s",
                "output tokens/s per user",
                kind="line",
            ),
            "Each point is one load level: faster for each user, or more in total.",
        )
    )
    return out


def write_report(doc: dict[str, Any], path: Path) -> None:
    Path(path).write_text(render(doc))
