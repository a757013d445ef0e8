"""Grouped bar charts as small inline SVG (for gr.HTML), like `chart.py`'s weight curve: no plotting library, text
rendered by the browser. Used by the Analysis sub-tab: one group of bars per block, one bar per model pair.

Each bar carries its value as a tooltip (`<title>`) and a `data-value` attribute, so a browser test can read what
is drawn; a missing value (NaN: undefined for that block) draws no bar and says so in its tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 10, 26, 48
COLOURS = ("#2563eb", "#ea580c", "#16a34a")


def value_range(values: Sequence[float], floor: float | None = None, ceiling: float | None = None,
                ) -> tuple[float, float]:
    """The y range that shows the differences: from `floor` (or the smallest value, padded) to `ceiling` (or the
    largest, padded). Cosines of related models sit at 98-100 %, where a 0-100 axis would show nothing."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (0.0, 1.0)
    lo, hi = min(finite), max(finite)
    pad = 0.08 * (hi - lo) if hi > lo else (abs(hi) * 0.05 or 0.05)
    lo = floor if floor is not None and floor <= lo else lo - pad
    hi = ceiling if ceiling is not None and ceiling >= hi else hi + pad
    if floor is not None:
        lo = max(lo, floor)
    return lo, hi


def bars_svg(labels: Sequence[str], series: Sequence[tuple[str, Sequence[float]]], y_label: str,
             y_range: tuple[float, float] | None = None) -> str:
    """HTML with one SVG grouped bar chart: `series` are (name, one value per label); bars grow from the bottom of
    `y_range` (default: `value_range` of all values)."""
    if not labels or not series:
        return '<div class="bm-chart bm-chart-empty" style="padding:12px;opacity:.8">Nothing to draw.</div>'
    lo, hi = y_range or value_range([v for _, values in series for v in values])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(labels)
    bar = slot * 0.8 / len(series)

    def y(v: float) -> float:
        return TOP + (hi - min(max(v, lo), hi)) / (hi - lo) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'style="max-width:{WIDTH * 1.25:.0f}px;font-family:sans-serif" role="img" '
        f'aria-label="{escape(y_label)} per block">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af" '
        f'stroke-width="0.6"/>',
        f'<text x="12" y="{TOP + plot_h / 2:.1f}" font-size="10" fill="currentColor" text-anchor="middle" '
        f'transform="rotate(-90 12 {TOP + plot_h / 2:.1f})">{escape(y_label)}</text>',
    ]
    for tick in _ticks_for(lo, hi):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     f'stroke="#9ca3af" stroke-width="0.4" stroke-dasharray="2 3"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y(tick) + 3.5:.1f}" font-size="10" text-anchor="end" '
                     f'fill="currentColor">{tick:g}</text>')
    for i, label in enumerate(labels):
        x0 = LEFT + i * slot + slot * 0.1
        for n, (name, values) in enumerate(series):
            value = values[i]
            title = f"{name} {label}: " + (f"{value:.6g}" if math.isfinite(value) else "n/a")
            if not math.isfinite(value):
                parts.append(f'<g class="bm-bar" data-label="{escape(label)}" data-series="{escape(name)}" '
                             f'data-value="nan"><title>{escape(title)}</title></g>')
                continue
            top = y(value)
            parts.append(f'<rect class="bm-bar" x="{x0 + n * bar:.1f}" y="{top:.1f}" width="{bar:.1f}" '
                         f'height="{TOP + plot_h - top:.1f}" fill="{COLOURS[n % len(COLOURS)]}" '
                         f'data-label="{escape(label)}" data-series="{escape(name)}" data-value="{value!r}">'
                         f'<title>{escape(title)}</title></rect>')
        cx = LEFT + (i + 0.5) * slot
        parts.append(f'<text x="{cx:.1f}" y="{TOP + plot_h + 8}" font-size="10" fill="currentColor" '
                     f'text-anchor="end" transform="rotate(-55 {cx:.1f} {TOP + plot_h + 8})">{escape(label)}</text>')
    for n, (name, _) in enumerate(series):  # the legend, above the plot
        lx = LEFT + 4 + n * 80
        parts.append(f'<rect x="{lx}" y="{TOP - 16}" width="12" height="10" fill="{COLOURS[n % len(COLOURS)]}"/>')
        parts.append(f'<text x="{lx + 16}" y="{TOP - 7}" font-size="11" fill="currentColor">{escape(name)}</text>')
    parts.append("</svg>")
    return f'<div class="bm-chart bm-bars">{"".join(parts)}</div>'


def _ticks_for(lo: float, hi: float) -> list[float]:
    """About five round ticks between lo and hi, whatever the scale (0.001 of a distance, or 99.2-100 %)."""
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= 6:
            step *= factor
            break
    start = math.ceil(lo / step) * step
    count = int((hi - start) / step + 1e-9) + 1
    return [round(start + k * step, 10) for k in range(count)]
