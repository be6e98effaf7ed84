"""An analytic judge for shapes-world images: which colour(s) and shape(s) an image shows.

No learned classifier: a learned judge could share a generator's blind spots, and an erasure
benchmark needs a judge that cannot be fooled by the model it scores. Colour is the hue of
confidently coloured foreground pixels (the raw mean is pulled off by anti-aliased edges and by
the background); shape is how the foreground fills a 3x3 grid over its bounding box (corners full:
square; corners partly full: circle; corners empty: cross; top empty, bottom full: triangle), which
survives the blur of generated images better than perimeter-based measures. Either answer is
``none`` when nothing recognisable is there.

Gray is the one achromatic colour (:data:`~conceptedit.shapes.world.GRAY`): a solid foreground
pixel is gray when its HSV saturation is below :data:`GRAY_MAX_SATURATION`, its value lies in
:data:`GRAY_VALUES` (darker reads as black, lighter as white: neither is a mid grey) and it differs
from the background's value by :data:`GRAY_MIN_CONTRAST`. Gray pixels and the confidently coloured
ones are pooled: the dominant colour must cover half of that pool, a listed one a quarter.

Besides the class names the verdict reports what was measured: the foreground's ``hue`` (the
circular mean hue of the confidently coloured pixels), its ``saturation`` and ``value``. The hue
lets a caller judge strictly (:data:`STRICT_HUE_RADIUS`): the nearest class calls a red drawn at
15 degrees "orange", but it is still within reach of red.
"""

from __future__ import annotations

import colorsys
from collections import deque
from dataclasses import dataclass
from functools import cache

import numpy as np

from conceptedit.shapes.world import GRAY, HUED, IMAGE_SIZE, SHAPE_NAMES, SUPERSAMPLE, shape_outline

NONE = "none"
_MIN_CONTRAST = 0.25  # RGB distance in [0, 1] units below which nothing stands out from the background
_MIN_AREA = 8.0  # pixels; smaller blobs are noise, not shapes
_HUE_TOLERANCE = 22.0  # degrees from a colour's hue beyond which a pixel is no known colour
_MAX_SHAPE_DISTANCE = 0.55  # grid-occupancy distance beyond which a blob is no known shape
_MIN_SHARE = 0.25  # a colour or shape is listed when it covers this share of the foreground
# 4*pi*area / perimeter^2 with the pixel-edge perimeter: 0.62 for a disc, 0.39 for the triangle,
# 0.48 for the cross; ragged or holed blobs (noise, a broken render) fall far below.
_MIN_COMPACTNESS = 0.2
#: Strict mode: a foreground whose measured hue is within this many degrees (circular) of a colour's
#: hue shows that colour, whatever the nearest class. 20 is under the 26-degree gap between
#: neighbouring palette hues less the renders' 3-degree jitter and the judge's hue error, so a
#: correctly drawn colour is never strictly its neighbour; a red that drifted 15 degrees towards
#: orange (nearest class: orange) still counts as red.
STRICT_HUE_RADIUS = 20.0
#: Gray: HSV saturation below this (the palette's colours are drawn at 0.72 or more).
GRAY_MAX_SATURATION = 0.2
#: Gray: the value range of a mid grey; a darker foreground is black, a lighter one white.
GRAY_VALUES = (0.3, 0.8)
#: Gray: the least difference of value from the background (light 0.92, dark 0.12) to stand out.
GRAY_MIN_CONTRAST = 0.2
# The hue is reported when the coloured pixels agree on one (mean resultant length; 0.9 is a
# circular spread of about 26 degrees) and make up a quarter of the judged pixels.
_MIN_HUE_AGREEMENT = 0.9


@dataclass(frozen=True)
class Verdict:
    """What the judge sees. ``colour``/``shape`` are the dominant ones (or ``none``); ``colours``/
    ``shapes`` list every one covering at least a quarter of the foreground."""

    colour: str
    shape: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    #: Circular mean hue (degrees, [0, 360)) of the confidently coloured foreground pixels; ``None``
    #: when there are too few (a gray or empty image) or they disagree (two colours).
    hue: float | None = None
    #: Median HSV saturation and value of the solid foreground; ``None`` when nothing stands out.
    saturation: float | None = None
    value: float | None = None


def judge(image: np.ndarray) -> Verdict:
    """Judge an ``(H, W, 3)`` image, uint8 or float in [0, 1]."""
    array = np.asarray(image)
    rgb = array.astype(np.float64) / (255.0 if array.dtype == np.uint8 else 1.0)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=-1)
    if distance.max() < _MIN_CONTRAST:
        return Verdict(NONE, NONE, (), ())
    # Coverage of each pixel by the foreground: its distance from the background relative to that of
    # the foreground's solid interior, so anti-aliased edges count by the fraction they cover.
    contrast = max(np.median(distance[distance > 0.5 * distance.max()]), _MIN_CONTRAST)
    alpha = np.clip(distance / contrast, 0.0, 1.0)
    components = [c for c in _components(alpha >= 0.5) if alpha[c].sum() >= _MIN_AREA]
    if not components:
        return Verdict(NONE, NONE, (), ())
    reading = _colours(rgb, alpha, float(background.max()))
    areas = [alpha[c].sum() for c in components]
    shapes: dict[str, float] = {}
    for component, area in zip(components, areas, strict=True):
        region = np.zeros_like(alpha)
        grown = _dilate(component)
        region[grown] = alpha[grown]
        name = classify_shape(region)
        shapes[name] = shapes.get(name, 0.0) + area
    total = sum(areas)
    shape = max(shapes, key=shapes.__getitem__)
    listed_shapes = tuple(
        s for s in sorted(shapes, key=shapes.__getitem__, reverse=True) if s != NONE and shapes[s] >= _MIN_SHARE * total
    )
    colours = reading.colours
    colour = colours[0] if colours else NONE
    return Verdict(colour, shape, colours, listed_shapes, reading.hue, reading.saturation, reading.value)


@dataclass(frozen=True)
class _Reading:
    colours: tuple[str, ...]
    hue: float | None
    saturation: float | None
    value: float | None


def _colours(rgb: np.ndarray, alpha: np.ndarray, background_value: float) -> _Reading:
    """Colours of the solid foreground pixels, most frequent first, with its measured hue,
    saturation and value. Confidently coloured pixels are classed by hue, gray ones (see the module
    docstring) as gray; the dominant colour must cover half of those pixels, else the image has no
    single recognisable colour."""
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    solid = alpha >= 0.8
    saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0)
    confident = solid & (hi - lo >= 0.2) & (hi - lo >= 0.35 * hi)
    gray = (
        solid
        & (saturation < GRAY_MAX_SATURATION)
        & (hi >= GRAY_VALUES[0])
        & (hi <= GRAY_VALUES[1])
        & (np.abs(hi - background_value) >= GRAY_MIN_CONTRAST)
    )
    sat = float(np.median(saturation[solid])) if solid.any() else None
    val = float(np.median(hi[solid])) if solid.any() else None
    hues = np.array([colorsys.rgb_to_hsv(*p)[0] * 360 for p in rgb[confident]])
    total = len(hues) + int(gray.sum())
    if total < _MIN_AREA / 2:
        return _Reading((), None, sat, val)
    counts = np.append(_hue_counts(hues), gray.sum())
    share = counts / total
    order = [i for i in np.argsort(-counts, kind="stable") if share[i] >= _MIN_SHARE]
    names = (*(c.name for c in HUED), GRAY.name)  # the counts: palette colours by hue, then gray
    listed = tuple(names[i] for i in order) if order and share[order[0]] >= 0.5 else ()
    hue = _mean_hue(hues) if len(hues) >= max(_MIN_AREA / 2, _MIN_SHARE * total) else None
    return _Reading(listed, hue, sat, val)


def _hue_counts(hues: np.ndarray) -> np.ndarray:
    """How many of ``hues`` (degrees) fall within :data:`_HUE_TOLERANCE` of each palette colour, nearest."""
    if not len(hues):
        return np.zeros(len(HUED), dtype=np.int64)
    centres = np.array([c.hue for c in HUED])
    gap = np.abs((hues[:, None] - centres[None, :] + 180) % 360 - 180)
    nearest = gap.argmin(axis=1)
    known = gap.min(axis=1) <= _HUE_TOLERANCE
    return np.bincount(nearest[known], minlength=len(HUED))


def _mean_hue(hues: np.ndarray) -> float | None:
    """Circular mean of ``hues`` in degrees [0, 360), or ``None`` when they disagree."""
    angles = np.deg2rad(hues)
    c, s = float(np.cos(angles).mean()), float(np.sin(angles).mean())
    if np.hypot(c, s) < _MIN_HUE_AGREEMENT:
        return None
    return float(np.rad2deg(np.arctan2(s, c)) % 360.0)


def hue_difference(hue: float, reference: float) -> float:
    """Signed circular difference ``hue - reference`` in degrees, in ``[-180, 180)``: +10 is 10
    degrees past ``reference`` towards higher hues (red -> orange), -10 the other way."""
    return float((hue - reference + 180.0) % 360.0 - 180.0)


def strict_colours(verdict: Verdict) -> tuple[str, ...]:
    """Palette colours within :data:`STRICT_HUE_RADIUS` of the verdict's measured hue, nearest
    first; empty when no hue was measured. Strict mode counts these as shown in addition to
    ``verdict.colours``."""
    if verdict.hue is None:
        return ()
    gaps = [(abs(hue_difference(verdict.hue, c.hue)), c.name) for c in HUED]
    return tuple(name for gap, name in sorted(gaps) if gap <= STRICT_HUE_RADIUS)


def classify_shape(alpha: np.ndarray) -> str:
    """The shape whose 3x3 grid occupancy is nearest to that of the coverage map ``alpha``, or ``none``
    for a blob too ragged to be any shape."""
    if _compactness(alpha >= 0.5) < _MIN_COMPACTNESS:
        return NONE
    grid = grid_occupancy(alpha)
    if grid is None:
        return NONE
    names, prototypes = _prototypes()
    distances = np.linalg.norm(prototypes - grid.ravel(), axis=1)
    best = int(distances.argmin())
    return names[best] if distances[best] <= _MAX_SHAPE_DISTANCE else NONE


def _compactness(mask: np.ndarray) -> float:
    padded = np.pad(mask, 1)
    perimeter = np.count_nonzero(padded[1:] != padded[:-1]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    return float(4 * np.pi * mask.sum() / max(perimeter, 1) ** 2)


def grid_occupancy(alpha: np.ndarray) -> np.ndarray | None:
    """Mean coverage of each cell of a 3x3 grid laid over the foreground's sub-pixel bounding box;
    ``None`` for a degenerate blob (too small, or over twice as long as it is wide)."""
    x0, x1 = _extent(alpha.max(axis=0))
    y0, y1 = _extent(alpha.max(axis=1))
    width, height = x1 - x0, y1 - y0
    if min(width, height) < 2.0 or max(width, height) > 2.0 * min(width, height):
        return None
    rows = _cell_weights(y0, y1, alpha.shape[0])
    cols = _cell_weights(x0, x1, alpha.shape[1])
    return (rows @ alpha @ cols.T) / np.outer(rows.sum(axis=1), cols.sum(axis=1))


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel start and end of a coverage profile: where it crosses one half, between pixel centres."""
    inside = np.flatnonzero(profile >= 0.5)
    if not len(inside):
        return 0.0, 0.0
    first, last = int(inside[0]), int(inside[-1])
    start = first + 0.5 - _crossing(profile, first, first - 1)
    end = last + 0.5 + _crossing(profile, last, last + 1)
    return start, end


def _crossing(profile: np.ndarray, inner: int, outer: int) -> float:
    """How far beyond pixel ``inner``'s centre, towards ``outer``, the profile falls to one half."""
    outside = profile[outer] if 0 <= outer < len(profile) else 0.0
    return float((profile[inner] - 0.5) / max(profile[inner] - outside, 1e-6))


def _cell_weights(start: float, end: float, n: int) -> np.ndarray:
    """``(3, n)`` overlap lengths of pixels ``[i, i + 1)`` with the thirds of ``[start, end)``."""
    edges = np.linspace(start, end, 4)
    pixels = np.arange(n, dtype=np.float64)
    low = np.maximum(edges[:-1, None], pixels[None, :])
    high = np.minimum(edges[1:, None], pixels[None, :] + 1)
    return np.clip(high - low, 0.0, None)


@cache
def _prototypes() -> tuple[tuple[str, ...], np.ndarray]:
    """Each shape's grid occupancy, measured on a large supersampled render of its outline."""
    from PIL import Image, ImageDraw

    size = IMAGE_SIZE * SUPERSAMPLE
    grids = []
    for name in SHAPE_NAMES:
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).polygon(shape_outline(name, size / 2, size / 2, 0.4 * size), fill=255)
        grid = grid_occupancy(np.asarray(mask, dtype=np.float64) / 255)
        assert grid is not None
        grids.append(grid.ravel())
    return SHAPE_NAMES, np.stack(grids)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 8-connected components of ``mask``, largest first."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes: list[float] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label = len(sizes) + 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        sizes.append(size)
    order = np.argsort(sizes)[::-1]
    return [labels == i + 1 for i in order]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in the 8 directions, to take in its anti-aliased rim."""
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + h, dx : dx + w]
    return grown
