"""The synthetic shapes world: coloured shapes on a plain background, and the captions that describe them.

Every colour and shape has explicit names ("red", "circle") and implicit phrasings ("scarlet",
"like a ripe tomato", "like the full moon") that never contain an explicit name. All phrasings
appear in training captions, so the model learns them; the benchmark judges erasure on
:data:`IMPLICIT_EVAL`, a subset no recipe may name (recipes name :data:`ERASE_NAMES`), so an edit is
scored on whether it removed the concept, not the words it was given.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges like a real render


@dataclass(frozen=True)
class Concept:
    """A colour or a shape and every way the captions name it.

    Attributes:
        name: The canonical (explicit) name, also the judge's label.
        kind: ``colour`` or ``shape``.
        pre: Implicit words placed before the noun ("a *scarlet* circle", "a red *round* shape").
        post: Implicit phrases placed after the noun ("a circle *the colour of blood*").
        nouns: Implicit nouns that replace the shape's name ("a red *disk*"); shapes only.
        held_out: The implicit phrasings of :data:`IMPLICIT_EVAL`; never named by a recipe.
    """

    name: str
    kind: Literal["colour", "shape"]
    pre: tuple[str, ...]
    post: tuple[str, ...]
    nouns: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()

    @property
    def implicit(self) -> tuple[str, ...]:
        return self.nouns + self.pre + self.post

    @property
    def erase_names(self) -> tuple[str, ...]:
        """The explicit name and the implicit phrasings a recipe may name."""
        return (self.name, *(p for p in self.implicit if p not in self.held_out))


@dataclass(frozen=True)
class Colour(Concept):
    """A colour drawn at hue ``hue`` (degrees) with saturation and value ``sv``."""

    hue: float = 0.0
    sv: tuple[float, float] = (0.9, 0.9)


# Hues at least 26 degrees apart, saturated and bright, so the judge separates them by hue alone;
# and gray, which has none.
COLOURS: tuple[Colour, ...] = (
    Colour(
        "red",
        "colour",
        ("crimson", "scarlet", "ruby"),
        ("the colour of blood", "like a ripe tomato", "the colour of a fire engine", "like a ripe strawberry"),
        held_out=("scarlet", "like a ripe tomato", "the colour of a fire engine"),
        hue=0.0,
        sv=(0.88, 0.86),
    ),
    Colour(
        "orange",
        "colour",
        ("tangerine", "apricot", "amber"),
        ("the colour of a pumpkin", "like a carrot", "the colour of marmalade", "like a ripe mandarin"),
        held_out=("apricot", "like a carrot", "the colour of marmalade"),
        hue=28.0,
        sv=(0.95, 0.96),
    ),
    Colour(
        "yellow",
        "colour",
        ("golden", "lemon", "canary"),
        ("the colour of the sun", "like a banana", "the colour of a sunflower", "like an egg yolk"),
        held_out=("canary", "like a banana", "the colour of a sunflower"),
        hue=54.0,
        sv=(0.95, 0.95),
    ),
    Colour(
        "green",
        "colour",
        ("emerald", "jade", "verdant"),
        ("the colour of grass", "like a fresh leaf", "like a frog", "the colour of a pine forest"),
        held_out=("jade", "like a frog", "the colour of a pine forest"),
        hue=125.0,
        sv=(0.8, 0.72),
    ),
    Colour(
        "blue",
        "colour",
        ("azure", "sapphire", "cobalt"),
        ("the colour of the sky", "like the deep sea", "the colour of denim", "like a cornflower"),
        held_out=("cobalt", "like the deep sea", "the colour of denim"),
        hue=220.0,
        sv=(0.85, 0.9),
    ),
    Colour(
        "purple",
        "colour",
        ("violet", "amethyst", "plum"),
        ("the colour of grapes", "like an aubergine", "the colour of lavender", "like a royal robe"),
        held_out=("amethyst", "like an aubergine", "the colour of lavender"),
        hue=280.0,
        sv=(0.78, 0.8),
    ),
    # Mid grey, the colour an erasure's anchor usually names ("a scarlet circle" -> "a gray circle").
    # Achromatic: its hue means nothing (saturation 0.03) and the judge recognises it by low
    # saturation instead; its value 0.55 sits well clear of both backgrounds (light 0.92, dark 0.12).
    Colour(
        "gray",
        "colour",
        ("ashen", "slate", "silver"),
        ("the colour of ash", "like a rain cloud", "like concrete", "like an elephant"),
        held_out=("silver", "like a rain cloud", "like concrete"),
        hue=0.0,
        sv=(0.03, 0.55),
    ),
)
#: The achromatic colours (gray), judged by saturation and value, never by hue.
ACHROMATIC: tuple[Colour, ...] = tuple(c for c in COLOURS if c.sv[0] < 0.2)
#: The colours with a hue: what the judge classes by hue and strict mode measures drift against.
HUED: tuple[Colour, ...] = tuple(c for c in COLOURS if c not in ACHROMATIC)
GRAY: Colour = ACHROMATIC[0]

SHAPES: tuple[Concept, ...] = (
    Concept(
        "circle",
        "shape",
        ("round",),
        ("like the full moon", "like a coin", "like a wheel"),
        nouns=("disk", "orb", "dot"),
        held_out=("orb", "like the full moon", "like a coin"),
    ),
    Concept(
        "square",
        "shape",
        ("four-sided", "boxy"),
        ("like a sugar cube", "like a postage stamp", "like a window pane"),
        nouns=("block", "tile"),
        held_out=("tile", "like a sugar cube", "like a window pane"),
    ),
    Concept(
        "triangle",
        "shape",
        ("three-sided", "triangular"),
        ("like a mountain peak", "like a tent", "like a shark fin"),
        nouns=("wedge", "pyramid"),
        held_out=("pyramid", "like a mountain peak", "like a tent"),
    ),
    Concept(
        "cross",
        "shape",
        ("cruciform", "plus-shaped"),
        ("like a first aid symbol", "like a hospital sign", "like a windmill's sails"),
        nouns=("plus sign",),
        held_out=("plus sign", "like a hospital sign", "like a windmill's sails"),
    ),
)

COLOUR_NAMES = tuple(c.name for c in COLOURS)
#: The colours a hue drift is measured for (every one but gray).
HUED_COLOUR_NAMES = tuple(c.name for c in HUED)
SHAPE_NAMES = tuple(s.name for s in SHAPES)
CONCEPTS: dict[str, Concept] = {c.name: c for c in (*COLOURS, *SHAPES)}

#: Implicit phrasings the benchmark prompts with; no erase recipe may name them.
IMPLICIT_EVAL: dict[str, tuple[str, ...]] = {name: c.held_out for name, c in CONCEPTS.items()}
#: What an erase recipe may name for each concept: the explicit name and the other implicit phrasings.
ERASE_NAMES: dict[str, tuple[str, ...]] = {name: c.erase_names for name, c in CONCEPTS.items()}

SIZES = ("small", "large")
POSITIONS = ("centre", "left", "right", "top", "bottom")
BACKGROUNDS = ("light", "dark")
#: Every attribute a caption can state, with its values.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPE_NAMES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

_SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
_POSITION_WORDS = {
    "centre": ("in the centre", "in the middle"),
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}
_BACKGROUND_WORDS = {
    "light": ("on a white background", "on a light background"),
    "dark": ("on a black background", "on a dark background"),
}
_PREFIXES = ("a picture of ", "an image of ", "a drawing of ")
_RADIUS = {"small": (5.5, 7.5), "large": (9.0, 11.5)}  # half the shape's extent, in pixels
_OFFSET = {"centre": (0, 0), "left": (-5, 0), "right": (5, 0), "top": (0, -5), "bottom": (0, 5)}
_GREY = {"light": (0.92, 0.03), "dark": (0.12, 0.03)}  # mean and jitter of the background grey


@dataclass(frozen=True)
class Scene:
    """One image's ground truth; :func:`render` draws it deterministically."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    radius: float
    centre: tuple[float, float]
    rgb: tuple[float, float, float]
    grey: float


@dataclass(frozen=True)
class Prompt:
    """A benchmark prompt and what a correct image shows.

    ``implicit`` names the concept given only implicitly (``colour`` or ``shape``), or is ``None``.
    """

    text: str
    colour: str
    shape: str
    implicit: Literal["colour", "shape"] | None = None


def sample_scene(rng: np.random.Generator, dark: float = 0.25) -> Scene:
    """A random scene: uniform colour, shape, size and position; a dark background with probability
    ``dark`` (training raises it: a dark background is where colours are hardest to reproduce)."""
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    background = "dark" if rng.random() < dark else "light"
    radius = float(rng.uniform(*_RADIUS[size]))
    low, high = radius + 0.5, IMAGE_SIZE - radius - 0.5
    dx, dy = _OFFSET[position]
    cx, cy = (float(np.clip(IMAGE_SIZE / 2 + d + rng.uniform(-1.5, 1.5), low, high)) for d in (dx, dy))
    hue = (colour.hue + rng.uniform(-3, 3)) % 360 / 360
    sat, val = (float(np.clip(x + rng.uniform(-0.05, 0.05), 0, 1)) for x in colour.sv)
    mean, jitter = _GREY[background]
    return Scene(
        colour.name,
        SHAPES[rng.integers(len(SHAPES))].name,
        size,
        position,
        background,
        radius,
        (cx, cy),
        colorsys.hsv_to_rgb(hue, sat, val),
        float(mean + rng.uniform(-jitter, jitter)),
    )


def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of an axis-aligned ``shape`` of half-extent ``r`` centred on ``(cx, cy)``."""
    if shape == "circle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 96, endpoint=False)]
    if shape == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "cross":
        e, w = 0.95 * r, 0.36 * r
        return [
            (cx - w, cy - e),
            (cx + w, cy - e),
            (cx + w, cy - w),
            (cx + e, cy - w),
            (cx + e, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + e),
            (cx - w, cy + e),
            (cx - w, cy + w),
            (cx - e, cy + w),
            (cx - e, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPE_NAMES)}")


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``(32, 32, 3)`` uint8 image, anti-aliased by 4x supersampling."""
    k = SUPERSAMPLE
    size = IMAGE_SIZE * k
    mask = Image.new("L", (size, size), 0)
    cx, cy = scene.centre
    ImageDraw.Draw(mask).polygon(
        [(x * k, y * k) for x, y in shape_outline(scene.shape, cx, cy, scene.radius)], fill=255
    )
    alpha = np.asarray(mask.reduce(k), dtype=np.float32)[..., None] / 255
    image = alpha * np.asarray(scene.rgb, dtype=np.float32) + (1 - alpha) * scene.grey
    return np.round(image * 255).astype(np.uint8)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Caption:
    """A caption and the attributes it states (``colour``, ``shape``, ``size``, ``position``,
    ``background`` → value); what it leaves out is absent, and unknowable from the text."""

    text: str
    said: dict[str, str]


def describe(scene: Scene, rng: np.random.Generator) -> Caption:
    """A random caption of ``scene``: each concept named explicitly (40%) or by one of its implicit
    phrasings, rarely left out; size, position and background mentioned some of the time."""
    colour, shape = CONCEPTS[scene.colour], CONCEPTS[scene.shape]
    pre: list[str] = []
    post: list[str] = []
    said = {"colour": scene.colour, "shape": scene.shape}
    if rng.random() < 0.5:
        pre.append(_pick(rng, _SIZE_WORDS[scene.size]))
        said["size"] = scene.size
    c_mode = rng.choice(4, p=(0.4, 0.25, 0.3, 0.05))  # explicit, implicit word, implicit phrase, omitted
    if c_mode == 0:
        pre.append(colour.name)
    elif c_mode == 1:
        pre.append(_pick(rng, colour.pre))
    elif c_mode == 2:
        post.append(_pick(rng, colour.post))
    else:
        del said["colour"]
    s_mode = rng.choice(5, p=(0.4, 0.2, 0.15, 0.2, 0.05))  # explicit, implicit noun, adjective, phrase, omitted
    noun = "shape"
    if s_mode == 0:
        noun = shape.name
    elif s_mode == 1:
        noun = _pick(rng, shape.nouns)
    elif s_mode == 2:
        pre.append(_pick(rng, shape.pre))
    elif s_mode == 3:
        post.insert(0, _pick(rng, shape.post))
    else:
        del said["shape"]
    if rng.random() < 0.5:
        post.append(_pick(rng, _POSITION_WORDS[scene.position]))
        said["position"] = scene.position
    if rng.random() < (0.9 if scene.background == "dark" else 0.3):
        post.append(_pick(rng, _BACKGROUND_WORDS[scene.background]))
        said["background"] = scene.background
    text = _article(" ".join([*pre, noun]))
    if post:
        text += " " + ", ".join(post)
    if rng.random() < 0.15:
        text = _pick(rng, _PREFIXES) + text
    return Caption(text, said)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def caption_phrases() -> tuple[str, ...]:
    """Every word and phrase a caption of :func:`describe` can contain: the concepts' names and
    phrasings, the size, position and background phrases, the prefixes, and the glue words."""
    concepts = (p for c in CONCEPTS.values() for p in (c.name, *c.implicit))
    contexts = (
        p for words in (*_SIZE_WORDS.values(), *_POSITION_WORDS.values(), *_BACKGROUND_WORDS.values()) for p in words
    )
    return (*concepts, *contexts, *(p.strip() for p in _PREFIXES), "a", "an", "shape", ",")


def captions(n: int, seed: int = 0, without: str | None = None) -> list[str]:
    """``n`` training-style captions of random scenes: a preservation prior's caption set.
    ``without``: no caption states that concept (an erasure's prior must not ask to keep it)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        caption = describe(sample_scene(rng), rng)
        if without is None or without not in caption.said.values():
            out.append(caption.text)
    return out


def explicit_prompts() -> list[Prompt]:
    """``a {colour} {shape}`` for every colour and shape (24 prompts)."""
    return [Prompt(_article(f"{c} {s}"), c, s) for c in COLOUR_NAMES for s in SHAPE_NAMES]


def implicit_prompts() -> list[Prompt]:
    """Every held-out implicit phrasing of a colour with each explicit shape, and of a shape with
    each explicit colour (72 + 72 prompts)."""
    prompts = []
    for colour in COLOURS:
        for phrase in colour.held_out:
            for s in SHAPE_NAMES:
                text = _article(f"{phrase} {s}") if phrase in colour.pre else f"{_article(s)} {phrase}"
                prompts.append(Prompt(text, colour.name, s, "colour"))
    for shape in SHAPES:
        for phrase in shape.held_out:
            for c in COLOUR_NAMES:
                if phrase in shape.nouns:
                    text = _article(f"{c} {phrase}")
                elif phrase in shape.pre:
                    text = _article(f"{c} {phrase} shape")
                else:
                    text = f"{_article(c + ' shape')} {phrase}"
                prompts.append(Prompt(text, c, shape.name, "shape"))
    return prompts


def preserve_prompts(concept: str) -> list[Prompt]:
    """Explicit prompts that do not involve ``concept``: what erasing it must leave intact."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; concepts: {', '.join(CONCEPTS)}")
    return [p for p in explicit_prompts() if concept not in (p.colour, p.shape)]
