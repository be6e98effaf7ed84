"""Captions of the shapes world built from parts: a concept's phrasing in a chosen context.

:func:`~conceptedit.shapes.world.describe` writes a random caption of a scene; this module
writes the caption for given choices, in the same grammar and phrase order, so that generators
(the ``shapes-captions`` concept source) and the benchmark's held-out prompts can pick the
concept's phrasing and the context (size, position, background, prefix, the other attribute)
separately, and keep two sets of contexts disjoint.

Phrase order, as in training: ``[prefix] a|an [size] [colour word] [shape adjective] noun
[shape phrase], [colour phrase], [position], [background]``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from conceptedit.shapes.world import (
    _BACKGROUND_WORDS,
    _POSITION_WORDS,
    _PREFIXES,
    _SIZE_WORDS,
    COLOUR_NAMES,
    CONCEPTS,
    SHAPE_NAMES,
    _article,
)

Kind = Literal["colour", "shape"]

#: Every context word or phrase a caption can hold, by slot ("other" is the other attribute's
#: explicit name: a shape when the concept is a colour, a colour when it is a shape).
CONTEXT_WORDS: dict[str, tuple[str, ...]] = {
    "size": tuple(w for words in _SIZE_WORDS.values() for w in words),
    "position": tuple(w for words in _POSITION_WORDS.values() for w in words),
    "background": tuple(w for words in _BACKGROUND_WORDS.values() for w in words),
    "prefix": tuple(p.strip() for p in _PREFIXES),
    "other_colour": COLOUR_NAMES,
    "other_shape": SHAPE_NAMES,
}


@dataclass(frozen=True)
class Context:
    """Everything a caption says besides the concept: each part a phrase, or None to leave it out.

    Attributes:
        size: A size word (``"small"``, ``"tiny"``, ``"large"``, ``"big"``).
        position: A position phrase (``"on the left"``).
        background: A background phrase (``"on a dark background"``).
        prefix: ``"a picture of"``, ``"an image of"`` or ``"a drawing of"``.
        other: The other attribute's explicit name: a shape when the concept is a colour
            (None: the noun is ``shape``), a colour when the concept is a shape (None: no colour).
    """

    size: str | None = None
    position: str | None = None
    background: str | None = None
    prefix: str | None = None
    other: str | None = None

    def phrases(self) -> tuple[str, ...]:
        """The context's phrases that are given, in field order."""
        return tuple(p for p in (self.size, self.position, self.background, self.prefix, self.other) if p)


def phrase_slot(phrase: str, kind: Kind) -> Literal["pre", "noun", "post"]:
    """Where a phrasing of a ``kind`` concept goes: before the noun, as the noun, or after it.

    Implicit phrasings of the shapes world go where training put them; any other string (an
    explicit name, or a name the world does not know, such as ``"gray"``) goes where explicit
    names go: before the noun for a colour, as the noun for a shape.
    """
    for concept in CONCEPTS.values():
        if concept.kind != kind:
            continue
        if phrase in concept.post:
            return "post"
        if phrase in concept.nouns:
            return "noun"
        if phrase in concept.pre:
            return "pre"
    return "pre" if kind == "colour" else "noun"


def caption(concept: str, kind: Kind, context: Context = Context()) -> str:
    """The caption naming ``concept`` (a phrasing or any name) as its ``kind``, in ``context``.

    >>> caption("crimson", "colour", Context(size="small", other="circle", position="on the left"))
    'a small crimson circle on the left'
    >>> caption("like a wheel", "shape", Context(other="red", prefix="a drawing of"))
    'a drawing of a red shape like a wheel'
    """
    colour, shape = (concept, context.other) if kind == "colour" else (context.other, concept)
    pre: list[str] = [context.size] if context.size else []
    post: list[str] = []
    noun = "shape"
    if colour:
        (post if phrase_slot(colour, "colour") == "post" else pre).append(colour)
    if shape:
        slot = phrase_slot(shape, "shape")
        if slot == "noun":
            noun = shape
        elif slot == "pre":
            pre.append(shape)
        else:
            post.insert(0, shape)
    post.extend(p for p in (context.position, context.background) if p)
    text = _article(" ".join([*pre, noun]))
    if post:
        # one post phrase follows the noun directly; describe() joins the post phrases with ", "
        text += " " + ", ".join(post)
    return f"{context.prefix} {text}" if context.prefix else text


def mentions(text: str, phrase: str) -> bool:
    """True if ``phrase`` occurs in ``text`` as whole words, case-insensitive ("four" is in "four-sided")."""
    return re.search(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", text, re.IGNORECASE) is not None


def mentions_any(text: str, phrases: Iterable[str]) -> bool:
    return any(mentions(text, p) for p in phrases if p.strip())


def sample_context(rng: np.random.Generator, kind: Kind, exclude: Collection[str] = ()) -> Context:
    """A random context for a ``kind`` concept, mentioning parts about as often as training does.

    Size and position half of the time each, the background as often as training captions do
    (a dark one a quarter of the scenes, mentioned 90% of the time; a light one 30%), a prefix
    15% of the time, and the other attribute by its explicit name three times in four. No part
    that mentions a phrase of ``exclude`` is drawn.
    """
    background = "dark" if rng.random() < 0.25 else "light"
    others = CONTEXT_WORDS["other_shape" if kind == "colour" else "other_colour"]
    return Context(
        size=_maybe(rng, 0.5, CONTEXT_WORDS["size"], exclude),
        position=_maybe(rng, 0.5, CONTEXT_WORDS["position"], exclude),
        background=_maybe(rng, 0.9 if background == "dark" else 0.3, _BACKGROUND_WORDS[background], exclude),
        prefix=_maybe(rng, 0.15, CONTEXT_WORDS["prefix"], exclude),
        other=_maybe(rng, 0.75, others, exclude),
    )


def _maybe(rng: np.random.Generator, p: float, options: tuple[str, ...], exclude: Collection[str]) -> str | None:
    """One of ``options`` not mentioning an excluded phrase, with probability ``p``; else None."""
    allowed = [o for o in options if not mentions_any(o, exclude)]
    if rng.random() >= p or not allowed:
        return None
    return allowed[int(rng.integers(len(allowed)))]
