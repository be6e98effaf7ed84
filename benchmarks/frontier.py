"""An erase-vs-keep scatter plot drawn with PIL (the benchmarks need no plotting library).

Each point is one method: x is how much of everything else it kept, y how much of the target it
erased, both in percent, with the Wilson intervals as whiskers. Up and to the right is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_SIZE = (960, 720)
_MARGIN = (90, 40, 260, 70)  # left, top, right, bottom: the right margin holds the legend
_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (120, 60, 0),
)


@dataclass(frozen=True)
class Point:
    """One method's position, each coordinate a rate in [0, 1] with its interval."""

    label: str
    keep: float
    keep_interval: tuple[float, float]
    erase: float
    erase_interval: tuple[float, float]


def plot(points: Sequence[Point], path: Path, title: str, x_label: str, y_label: str) -> None:
    """Draw ``points`` and save a PNG at ``path``; the axes span the data (with the whiskers)."""
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = _MARGIN
    width, height = _SIZE[0] - left - right, _SIZE[1] - top - bottom
    x_low = _floor(min(p.keep_interval[0] for p in points))
    y_low = _floor(min(p.erase_interval[0] for p in points))

    def at(keep: float, erase: float) -> tuple[float, float]:
        return (
            left + (keep - x_low) / (1.0 - x_low) * width,
            top + (1.0 - (erase - y_low) / (1.0 - y_low)) * height,
        )

    draw.rectangle([left, top, left + width, top + height], outline="black")
    for i in range(6):
        fx = x_low + (1.0 - x_low) * i / 5
        fy = y_low + (1.0 - y_low) * i / 5
        x, _ = at(fx, 1.0)
        _, y = at(1.0, fy)
        draw.line([x, top, x, top + height], fill=(230, 230, 230))
        draw.line([left, y, left + width, y], fill=(230, 230, 230))
        draw.text((x - 12, top + height + 6), f"{fx:.0%}", fill="black", font=font)
        draw.text((left - 40, y - 6), f"{fy:.0%}", fill="black", font=font)
    draw.text((left + width / 2 - 120, top + height + 30), x_label, fill="black", font=font)
    draw.text((10, top - 25), y_label, fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    for i, point in enumerate(points):
        colour = _COLOURS[i % len(_COLOURS)]
        x, y = at(point.keep, point.erase)
        x0, _ = at(point.keep_interval[0], point.erase)
        x1, _ = at(point.keep_interval[1], point.erase)
        _, y0 = at(point.keep, point.erase_interval[0])
        _, y1 = at(point.keep, point.erase_interval[1])
        draw.line([x0, y, x1, y], fill=colour, width=1)
        draw.line([x, y0, x, y1], fill=colour, width=1)
        marker = _MARKERS[i // len(_COLOURS) % len(_MARKERS)]
        marker(draw, x, y, 5, colour)
        legend_y = top + 16 * i
        marker(draw, left + width + 25, legend_y + 7, 5, colour)
        draw.text((left + width + 38, legend_y), point.label, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _disc(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, colour: tuple[int, int, int]) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _square(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, colour: tuple[int, int, int]) -> None:
    draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)


def _triangle(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, colour: tuple[int, int, int]) -> None:
    draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)


#: Marker shapes, one per round of the colours: the 13th point is a square, not a second blue disc.
_MARKERS = (_disc, _square, _triangle)


def _floor(value: float) -> float:
    """The axis start: ``value`` rounded down to a tenth, at most 0.9 (so an axis spans 10 points)."""
    return min(0.9, max(0.0, int(value * 10) / 10))
