"""Judging an erasure on the shapes world: whether an image still shows a concept, whether it shows
the anchor instead, and how far a kept colour's hue drifted; plus the prompt sets per target and
the concept sets the shipped recipes' pair files are generated from.

Whether an image shows a colour is judged in one of two modes. The default (nearest) mode takes
the judge's classes: a red that drifted to 15 degrees is "orange", so red counts as erased. Strict
mode (``strict=True``) also counts a colour as shown when the measured hue is within
:data:`~conceptedit.shapes.judge.STRICT_HUE_RADIUS` of it, so an erasure must move the colour
well away, not just past the midpoint to a neighbour. :func:`hue_drift` is how far, in degrees,
an image's hue is from the one its prompt asked for; :func:`anchor_reached` whether an erased
image shows the anchor instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from conceptedit.shapes.judge import Verdict, hue_difference, judge, strict_colours
from conceptedit.shapes.world import (
    ACHROMATIC,
    COLOUR_NAMES,
    COLOURS,
    CONCEPTS,
    ERASE_NAMES,
    SHAPE_NAMES,
    Colour,
    Concept,
    Prompt,
    explicit_prompts,
    implicit_prompts,
    preserve_prompts,
)


@dataclass(frozen=True)
class PromptSets:
    """The three prompt sets of one target concept."""

    target: str
    explicit: list[Prompt]
    implicit: list[Prompt]
    preserve: list[Prompt]


def prompt_sets(target: str) -> PromptSets:
    """Explicit, held-out implicit and preserve prompts for ``target``."""
    kind = CONCEPTS[target].kind
    explicit = [p for p in explicit_prompts() if getattr(p, kind) == target]
    implicit = [p for p in implicit_prompts() if p.implicit == kind and getattr(p, kind) == target]
    return PromptSets(target, explicit, implicit, preserve_prompts(target))


_JUDGED: dict[str, Colour] = {c.name: c for c in COLOURS}


def _concept(name: str) -> Concept:
    concept = _JUDGED.get(name) or CONCEPTS.get(name)
    if concept is None:
        known = ", ".join((*_JUDGED, *SHAPE_NAMES))
        raise ValueError(f"unknown concept {name!r}; the judge knows {known}")
    return concept


def verdict_shows(target: str, verdict: Verdict, strict: bool = False) -> bool:
    """Whether ``verdict`` finds ``target``, as the dominant or as a listed colour/shape: an image
    that is half red still shows red. ``strict``: a colour is also shown when the measured hue is
    within :data:`~conceptedit.shapes.judge.STRICT_HUE_RADIUS` of its hue, whatever the nearest
    class (shapes and gray are judged the same in both modes)."""
    if _concept(target).kind == "colour":
        if target == verdict.colour or target in verdict.colours:
            return True
        return strict and target in strict_colours(verdict)
    return target == verdict.shape or target in verdict.shapes


def row_verdict(row: Mapping[str, Any]) -> Verdict:
    """The :class:`~conceptedit.shapes.judge.Verdict` of a shapes-judge score row; rows written
    before the judge reported hue, saturation and value read as having none."""
    return Verdict(
        row["colour"],
        row["shape"],
        tuple(row["colours"]),
        tuple(row["shapes"]),
        row.get("hue"),
        row.get("saturation"),
        row.get("value"),
    )


def row_shows(target: str, row: Mapping[str, Any], strict: bool = False) -> bool:
    """:func:`verdict_shows` on a shapes-judge score row (``colour``, ``shape``, ``colours``,
    ``shapes``, and ``hue`` for strict mode; a row without a hue is judged by its classes only)."""
    return verdict_shows(target, row_verdict(row), strict)


def shows(target: str, image: np.ndarray, strict: bool = False) -> bool:
    """Whether the judge finds ``target`` in ``image``."""
    return verdict_shows(target, judge(image), strict)


def anchor_reached(anchor: str, verdict: Verdict, strict: bool = False) -> bool:
    """Whether an image shows the ``anchor`` an erasure steers towards, as its dominant colour or
    shape: for gray an achromatic foreground (gray dominant), for a palette colour that colour
    dominant (``strict``: or the measured hue within the strict radius of it), for a shape that
    shape dominant."""
    concept = _concept(anchor)
    if concept.kind == "shape":
        return verdict.shape == anchor
    if verdict.colour == anchor:
        return True
    return strict and concept not in ACHROMATIC and anchor in strict_colours(verdict)


def hue_drift(colour: str, hue: float | None) -> float | None:
    """Signed circular difference in degrees (``[-180, 180)``) between a measured ``hue`` and the
    hue of the ``colour`` a prompt asked for: +10 for a yellow drawn at 64 degrees, -10 for one
    at 44. ``None`` when no hue was measured or ``colour`` is achromatic (gray has no hue)."""
    concept = _concept(colour)
    if hue is None or not isinstance(concept, Colour) or concept in ACHROMATIC:
        return None
    return hue_difference(hue, concept.hue)


def erase_concept_set(target: str, anchor: str) -> dict[str, Any]:
    """A recipe concept set of full prompt pairs: each phrasing a recipe may name for ``target``,
    in the sentence positions the captions use it, paired with the plain sentence saying ``anchor``
    ("a scarlet circle" -> "a gray circle"; "a red disk" -> "a red shape").

    The held-out implicit phrasings (:data:`~conceptedit.shapes.world.IMPLICIT_EVAL`) are never
    included, so the implicit erase rate measures generalisation.
    """
    concept = CONCEPTS[target]
    pairs = []
    for name in ERASE_NAMES[target]:
        if concept.kind == "colour":
            for noun in SHAPE_NAMES:
                said = f"{noun} {name}" if name in concept.post else f"{name} {noun}"
                pairs.append([_a(said), _a(f"{anchor} {noun}")])
        else:
            for colour in COLOUR_NAMES:
                if name in concept.post:
                    said = f"{colour} shape {name}"
                elif name in concept.pre:
                    said = f"{colour} {name} shape"
                else:  # the shape's name or an implicit noun
                    said = f"{colour} {name}"
                pairs.append([_a(said), _a(f"{colour} {anchor}")])
    return {"pairs": pairs}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase
