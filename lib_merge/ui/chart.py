"""The block-weight curve as a small inline SVG (for gr.HTML): no plotting library, text rendered by the browser.

x: the blocks in weight order (BASE, IN.., M00, OUT..), y: the weight. Alpha is a solid line, beta (when MBW
beta is given) a dashed one; 0 and 1 are marked, and each point carries its value as a tooltip.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from ..core.arch import BLOCKS_FLUX, BLOCKS_XL_FINE, xl_group
from ..core.weights import Presets
from .values import SD1, XL_POSITIONS, block_labels, fmt, number_or_none, weight_tokens

WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 38, 10, 22, 46
ALPHA_COLOUR, BETA_COLOUR = "#2563eb", "#ea580c"


def parse_curve(text: str, presets: Presets | None = None) -> list[float | None] | None:
    """Weights text (or a preset name) -> its values (None for R/U entries), or None if it is not 20, 26, 61 (Flux)
    or 110 (extended SDXL) values."""
    text = (text or "").strip()
    if presets is not None and text and "," not in text:
        text = presets.get(text) or text
    tokens = weight_tokens(text)
    if len(tokens) not in (20, 26, len(BLOCKS_FLUX), len(BLOCKS_XL_FINE)):
        return None
    values = [number_or_none(t) for t in tokens]
    if any(v is None and t not in ("R", "U") for v, t in zip(values, tokens, strict=True)):
        return None
    return values


def _message(text: str) -> str:
    return (f'<div class="bm-chart bm-chart-empty" style="padding:12px;opacity:.8;font-size:14px">'
            f'{escape(text)}</div>')


def weights_svg(alpha_text: str, beta_text: str = "", block_type: str = SD1, presets: Presets | None = None,
                enabled: bool = True) -> str:
    """HTML with the SVG chart of the alpha (and beta) block weights, or a one-line note when there is no curve."""
    if not enabled:
        return _message("Block weights are off (tick \"use MBW\"): alpha applies to every block.")
    alpha = parse_curve(alpha_text, presets)
    if alpha is None:
        return _message("The chart appears when the alpha weights hold 26 values (SDXL: 20, Flux: 61) or a preset "
                        "name.")
    beta = parse_curve(beta_text, presets) if (beta_text or "").strip() else None
    labels = (BLOCKS_FLUX if len(alpha) == len(BLOCKS_FLUX) else BLOCKS_XL_FINE if len(alpha) == len(BLOCKS_XL_FINE)
              else block_labels(block_type))
    label_size = 10 if len(labels) <= 26 else 7
    curves = [(alpha, ALPHA_COLOUR, "alpha", "")]
    if beta is not None:
        curves.append((beta, BETA_COLOUR, "beta", "6 4"))
    curves = [(_fit(v, len(labels)), *rest) for v, *rest in curves]
    numbers = [v for values, *_ in curves for v in values if v is not None]
    lo, hi = min([0.0, *numbers]), max([1.0, *numbers])
    pad = 0.04 * (hi - lo)  # points on 0 or 1 stay off the frame
    lo, hi = lo - pad, hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / (len(labels) - 1)

    def x(i: int) -> float:
        return LEFT + i * step

    def y(v: float) -> float:
        return TOP + (hi - v) / (hi - lo) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'style="max-width:{WIDTH * 1.25:.0f}px;font-family:sans-serif" role="img" '
        f'aria-label="block weight chart">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af" '
        f'stroke-width="0.6"/>',
    ]
    for tick in _ticks(lo, hi):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     f'stroke="#9ca3af" stroke-width="{0.9 if tick in (0, 1) else 0.4}" '
                     f'stroke-dasharray="{"" if tick in (0, 1) else "2 3"}"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y(tick) + 3.5:.1f}" font-size="10" text-anchor="end" '
                     f'fill="currentColor">{fmt(tick)}</text>')
    shown = _shown_labels(labels)
    for i, label in enumerate(labels):
        if label not in shown:
            continue
        if label in ("M00", "IN00", "OUT00", "D00", "S00", "MID00"):
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#9ca3af" '
                         f'stroke-width="0.4"/>')
        parts.append(f'<text x="{x(i):.1f}" y="{TOP + plot_h + 8}" font-size="{label_size}" fill="currentColor" '
                     f'text-anchor="end" transform="rotate(-55 {x(i):.1f} {TOP + plot_h + 8})">{label}</text>')
    for values, colour, name, dash in curves:
        points = [(x(i), y(v)) for i, v in enumerate(values) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" '
                         f'stroke-dasharray="{dash}"/>')
        for i, v in enumerate(values):
            if v is not None:
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}">'
                             f'<title>{name} {labels[i]}: {fmt(v)}</title></circle>')
    for n, (_, colour, name, dash) in enumerate(curves):  # the legend, above the plot
        lx = LEFT + 4 + n * 70
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{TOP - 10}" y2="{TOP - 10}" stroke="{colour}" '
                     f'stroke-width="2" stroke-dasharray="{dash}"/>')
        parts.append(f'<text x="{lx + 22}" y="{TOP - 6.5}" font-size="11" fill="currentColor">{name}</text>')
    parts.append("</svg>")
    return f'<div class="bm-chart">{"".join(parts)}</div>'


def _shown_labels(labels: Sequence[str]) -> set[str]:
    """Every label of 20/26 blocks; of the 110 fine SDXL blocks only each block's first (they would overlap)."""
    if len(labels) != len(BLOCKS_XL_FINE):
        return set(labels)
    firsts: dict[str, str] = {}
    for label in labels:
        firsts.setdefault(xl_group(label), label)
    return set(firsts.values())


def _fit(values: Sequence[float | None], count: int) -> list[float | None]:
    """26 values shown on the 20-block SDXL axis keep the SDXL blocks (as the merge converts them); a curve of
    another family's length (SD beta beside Flux alpha) is not drawn."""
    if len(values) == 26 and count == 20:
        return [values[i] for i in XL_POSITIONS]
    if len(values) == 20 and count == 26:
        full: list[float | None] = [None] * 26
        for pos, v in zip(XL_POSITIONS, values, strict=True):
            full[pos] = v
        return full
    return list(values) if len(values) == count else [None] * count


def _ticks(lo: float, hi: float) -> list[float]:
    span = hi - lo
    step = 0.25 if span <= 1.5 else 0.5 if span <= 3 else 1.0
    start = -(-lo // step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9:
        ticks.append(round(t, 6))
        t += step
    return ticks
