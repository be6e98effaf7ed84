"""Loss curves of a run that trained, read from its logs and drawn as inline SVG.

The training loop appends one JSON object per step to ``<run_dir>/logs/<label>.jsonl`` (step,
every loss term, total, lr, time). The report plots them so a reader sees whether a training
edit converged next to what it did to the images. The SVG is written by hand -- polylines,
axes, a legend -- so the report needs no plotting library and stays one self-contained file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

from conceptedit.errors import RunDirError

LOGS_DIR = "logs"
NOT_TERMS = frozenset({"step", "lr", "time"})  # logged every step, but no loss term
LOG_SCALE_RATIO = 100.0  # auto log scale once positive values span two decades
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
TOTAL_COLOUR = "#111111"

WIDTH, HEIGHT = 640, 260  # at least; a long or tall legend widens or lengthens the picture
LEFT, RIGHT, TOP, BOTTOM = 60, 460, 14, 222  # plot area; the legend sits right of it
CHAR_WIDTH, LEGEND_ROW = 7, 16  # generous for 11 px sans-serif


@dataclass(frozen=True)
class LossCurves:
    """One training log: for each loss term (``total`` included), its ``(step, value)`` points in log order."""

    label: str
    terms: dict[str, list[tuple[int, float]]]


def read_run_logs(run_dir: Path) -> list[LossCurves]:
    """Every ``logs/*.jsonl`` of ``run_dir`` holding a step, by label; none for a run that never trained."""
    folder = run_dir / LOGS_DIR
    if not folder.is_dir():
        return []
    curves = [read_log(path) for path in sorted(folder.glob("*.jsonl"))]
    return [c for c in curves if c.terms]


def read_log(path: Path) -> LossCurves:
    """Parse one log; an unterminated, unparsable last line is what a killed run leaves, so it is skipped."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    terms: dict[str, list[tuple[int, float]]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
            if not isinstance(step, int) or isinstance(step, bool):
                raise TypeError("step is not an integer")
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            raise RunDirError(f"{path}:{number}: not a training-log line ({exc}): {line[:80]!r}") from None
        for key, value in record.items():
            if key in NOT_TERMS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                terms.setdefault(key, []).append((step, float(value)))
    return LossCurves(path.stem, terms)


def summary(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """``(first, last, min)`` of one term, for the report's table."""
    values = [v for _, v in points]
    return values[0], values[-1], min(values)


def svg(curves: LossCurves) -> str:
    """A standalone SVG of every term of ``curves``, on a log y axis when the values span decades."""
    values = [v for points in curves.terms.values() for _, v in points]
    steps = [s for points in curves.terms.values() for s, _ in points]
    log_y = min(values) > 0 and max(values) / min(values) >= LOG_SCALE_RATIO
    fy = math.log10 if log_y else float
    x0, x1 = _span(min(steps), max(steps))
    y0, y1 = _span(fy(min(values)), fy(max(values)))

    def px(step: float) -> float:
        return LEFT + (step - x0) / (x1 - x0) * (RIGHT - LEFT)

    def py(value: float) -> float:  # larger values sit higher, so at smaller y
        return BOTTOM - (fy(value) - y0) / (y1 - y0) * (BOTTOM - TOP)

    title = f"loss curves of {curves.label}" + (" (log scale)" if log_y else "")
    width = max(WIDTH, RIGHT + 46 + CHAR_WIDTH * max(len(term) for term in curves.terms))
    height = max(HEIGHT, TOP + 8 + LEGEND_ROW * len(curves.terms))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{LEFT}" y="{TOP}" width="{RIGHT - LEFT}" height="{BOTTOM - TOP}" fill="none" stroke="#999"/>',
    ]
    for tick in _ticks(x0, x1, integer=True):
        x = px(tick)
        parts.append(f'<line x1="{x:.2f}" y1="{BOTTOM}" x2="{x:.2f}" y2="{BOTTOM + 4}" stroke="#999"/>')
        parts.append(f'<text x="{x:.2f}" y="{BOTTOM + 16}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{(LEFT + RIGHT) / 2:.0f}" y="{BOTTOM + 34}" text-anchor="middle">step</text>')
    y_ticks = [10**p for p in _log_ticks(y0, y1)] if log_y else _ticks(y0, y1)
    for tick in y_ticks:
        y = py(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.2f}" x2="{RIGHT}" y2="{y:.2f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.2f}" text-anchor="end">{tick:.4g}</text>')
    for index, (term, points) in enumerate(curves.terms.items()):
        colour = TOTAL_COLOUR if term == "total" else PALETTE[index % len(PALETTE)]
        stroke = 2 if term == "total" else 1.25
        coords = " ".join(f"{px(s):.2f},{py(v):.2f}" for s, v in points)
        parts.append(
            f'<polyline data-term="{escape(term)}" points="{coords}" fill="none" stroke="{colour}" '
            f'stroke-width="{stroke}" stroke-linejoin="round"/>'
        )
        y = TOP + 8 + LEGEND_ROW * index
        parts.append(
            f'<line x1="{RIGHT + 12}" y1="{y}" x2="{RIGHT + 32}" y2="{y}" stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{RIGHT + 38}" y="{y + 4}">{escape(term)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _span(low: float, high: float) -> tuple[float, float]:
    """Widen a one-value range so a flat curve or a single step still maps somewhere."""
    if high > low:
        return low, high
    pad = abs(low) * 0.1 or 1.0
    return low - pad, high + pad


def _ticks(low: float, high: float, integer: bool = False) -> list[float]:
    """About five round values inside ``[low, high]`` (steps 1, 2 or 5 times a power of ten)."""
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def _log_ticks(low: float, high: float) -> list[int]:
    """The powers of ten inside a log10 range (two at least, as it spans two decades), thinned to at most six."""
    powers = list(range(math.ceil(low - 1e-9), math.floor(high + 1e-9) + 1))
    stride = math.ceil(len(powers) / 6) or 1
    return powers[::stride]
