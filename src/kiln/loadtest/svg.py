"""Small inline-SVG charts for the HTML report: line charts (CDFs, time series, sweeps) and
scatter charts (Pareto), with axes, ticks and a legend. No JavaScript and nothing fetched, so
the report opens offline."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Distinct, print-safe colours; series take them in order.
PALETTE = ("#d6336c", "#1c7ed6", "#2b8a3e", "#e8590c", "#7048e8", "#0c8599", "#5c940d")

WIDTH, HEIGHT = 600, 340
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 34, 50


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering
    [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def chart(
    series: Sequence[Series],
    title: str,
    x_label: str,
    y_label: str,
    kind: str = "line",
    css_class: str = "plot",
) -> str:
    """An SVG chart of ``series``: ``kind`` "line" joins points (with markers when few),
    "scatter" draws markers only. Empty data gives a chart that says so."""
    points = [p for s in series for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
    parts = [
        f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="15" '
        f'font-weight="bold">{html.escape(title)}</text>',
    ]
    if not points:
        parts.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#868e96">'
            "no data</text></svg>"
        )
        return "".join(parts)
    xs = nice_ticks(min(0.0, min(p[0] for p in points)), max(p[0] for p in points))
    ys = nice_ticks(min(0.0, min(p[1] for p in points)), max(p[1] for p in points))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - xs[0]) / (xs[-1] - xs[0]) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - ys[0]) / (ys[-1] - ys[0]) * plot_h

    for x in xs:
        parts.append(
            f'<line x1="{px(x):.1f}" y1="{TOP}" x2="{px(x):.1f}" y2="{TOP + plot_h}" '
            'stroke="#e9ecef"/>'
            f'<text x="{px(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" '
            f'font-size="11">{_label(x)}</text>'
        )
    for y in ys:
        parts.append(
            f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + plot_w}" y2="{py(y):.1f}" '
            'stroke="#e9ecef"/>'
            f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" '
            f'font-size="11">{_label(y)}</text>'
        )
    parts.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#495057"/>'
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 10}" text-anchor="middle" '
        f'font-size="12">{html.escape(x_label)}</text>'
        f'<text transform="translate(16 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle" '
        f'font-size="12">{html.escape(y_label)}</text>'
    )
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        good = [p for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in good)
        if kind == "line" and len(good) > 1:
            parts.append(
                f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" '
                'stroke-width="2.5"/>'
            )
        if kind == "scatter" or len(good) <= 12:
            parts.extend(
                f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{colour}"/>'
                for x, y in good
            )
        legend_y = TOP + 14 + 16 * i
        parts.append(
            f'<rect x="{LEFT + 10}" y="{legend_y - 9}" width="12" height="4" fill="{colour}"/>'
            f'<text x="{LEFT + 28}" y="{legend_y - 3}" font-size="11">{html.escape(s.name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def cdf_points(values: Sequence[float]) -> list[tuple[float, float]]:
    """(value, fraction of values at or below it), thinned to at most ~400 points."""
    ordered = sorted(v for v in values if math.isfinite(v))
    n = len(ordered)
    if n == 0:
        return []
    stride = max(1, n // 400)
    points = [(ordered[i], (i + 1) / n) for i in range(0, n, stride)]
    if points[-1][1] != 1.0:
        points.append((ordered[-1], 1.0))
    return [(ordered[0], 0.0), *points]
