"""Built-in concept sources (``generate:`` concept sets) and the ``conceptedit concepts`` listing.

* ``templates``: concepts (or ``[concept, target]`` pairs) × templates, mapped to a target:
  what a ``pairs:``/``concepts:`` set writes, as a source.
* ``shapes-captions``: prompt pairs in the shapes world's caption grammar. ``count`` distinct
  captions naming ``concept`` (its explicit name, or one of the phrasings a recipe may name,
  never a held-out evaluation phrasing) in random contexts, each paired with the same caption
  naming ``anchor`` instead. ``exclude_contexts`` lists words or phrases no prompt may
  contain, so a held-out evaluation split can stay disjoint.

``conceptedit concepts RECIPE`` prints every concept set's expanded prompt pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from difflib import get_close_matches
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from conceptedit import ConceptSource, ConceptSourceOptions, PromptPair, hookimpl
from conceptedit.toolkit import (
    SHAPES_CONCEPTS,
    SHAPES_ERASE_NAMES,
    SHAPES_IMPLICIT_EVAL,
    mentions_any_phrase,
    sample_shapes_context,
    shapes_caption,
    template_pairs,
)

# --------------------------------------------------------------------------- templates


def _one_slot(template: str) -> str:
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain `{{}}` exactly once, where the concept goes")
    return template


class TemplateOptions(ConceptSourceOptions):
    pairs: list[tuple[str, str]] | None = Field(None, description="[concept, target] pairs.")
    concepts: list[str] | None = Field(None, description="Concepts; each maps to `target`.")
    target: str = Field("", description='Target for concepts that give none ("" = unconditional).')
    templates: list[str] = Field(["{}"], min_length=1, description="Prompt templates, each with one `{}`.")

    @field_validator("templates")
    @classmethod
    def _slots(cls, value: list[str]) -> list[str]:
        return [_one_slot(t) for t in value]

    @model_validator(mode="after")
    def _one_list(self) -> TemplateOptions:
        given = [name for name in ("pairs", "concepts") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `pairs` or `concepts`" + (" (got both)" if given else ""))
        if not getattr(self, given[0]):
            raise ValueError(f"`{given[0]}` is empty")
        return self


class Templates(ConceptSource[TemplateOptions]):
    """Every (entry × template) pair, entries first, templates inner: a ``pairs:`` set as a source."""

    name = "templates"
    summary = "Concepts (or [concept, target] pairs) × templates, mapped to a target."
    Options: ClassVar[type[ConceptSourceOptions]] = TemplateOptions

    def pairs(self) -> list[PromptPair]:
        options = self.options
        entries: list[tuple[str, str | None]] = (
            [(a, b) for a, b in options.pairs]
            if options.pairs is not None
            else [(c, None) for c in options.concepts or []]
        )
        return template_pairs(entries, options.templates, options.target)


# --------------------------------------------------------------------------- shapes-captions

_HELD_OUT = {phrase: name for name, phrases in SHAPES_IMPLICIT_EVAL.items() for phrase in phrases}
_EXPLICIT_SHARE = 0.4  # training captions name a concept explicitly 40% of the time


class ShapesCaptionOptions(ConceptSourceOptions):
    concept: str = Field(description="The colour or shape to edit (a concept of the shapes world).")
    anchor: str = Field(
        description="What the target prompts name instead: any colour or shape name, known to the model or not."
    )
    count: PositiveInt = Field(100, le=100_000, description="Prompt pairs to generate (all source captions distinct).")
    seed: NonNegativeInt = Field(0, description="Seed of the draws; the same options give the same pairs.")
    phrasings: Literal["explicit", "erase_names"] = Field(
        "erase_names",
        description="explicit: the concept's name only; erase_names: also its implicit phrasings a recipe may name "
        "(never the held-out evaluation ones).",
    )
    exclude_contexts: list[str] = Field(
        [], description="Words or phrases no generated prompt may contain (whole words, case-insensitive)."
    )

    @field_validator("concept")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in SHAPES_CONCEPTS:
            close = get_close_matches(value, list(SHAPES_CONCEPTS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown shapes concept {value!r}; {hint}concepts: {', '.join(SHAPES_CONCEPTS)}")
        return value

    @field_validator("anchor")
    @classmethod
    def _usable(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("the anchor must not be empty")
        if value in _HELD_OUT:
            raise ValueError(
                f"{value!r} is a held-out evaluation phrasing of {_HELD_OUT[value]!r}; name another anchor"
            )
        return value

    @model_validator(mode="after")
    def _distinct(self) -> ShapesCaptionOptions:
        if self.anchor == self.concept:
            raise ValueError(f"the anchor is the concept itself ({self.concept!r}); name another one")
        if mentions_any_phrase(self.anchor, self.exclude_contexts):
            raise ValueError(f"the anchor {self.anchor!r} mentions a phrase of `exclude_contexts`")
        return self


class ShapesCaptions(ConceptSource[ShapesCaptionOptions]):
    """Distinct training-style captions of a shapes concept, each paired with its anchor's version."""

    name = "shapes-captions"
    summary = "Shapes-world captions naming a colour or shape, paired with the same caption naming an anchor."
    Options: ClassVar[type[ConceptSourceOptions]] = ShapesCaptionOptions

    def pairs(self) -> list[PromptPair]:
        options = self.options
        concept = SHAPES_CONCEPTS[options.concept]
        exclude = options.exclude_contexts
        named = (concept.name,) if options.phrasings == "explicit" else SHAPES_ERASE_NAMES[concept.name]
        phrasings = [p for p in named if not mentions_any_phrase(p, exclude)]
        if not phrasings:
            raise ValueError(f"`exclude_contexts` excludes every phrasing of {concept.name!r}: {', '.join(named)}")
        rng = np.random.default_rng(options.seed)
        pairs: dict[str, PromptPair] = {}
        draws = 20 * options.count + 1000
        for _ in range(draws):
            phrase = _pick_phrasing(rng, phrasings, concept.name)
            context = sample_shapes_context(rng, concept.kind, exclude)
            source = shapes_caption(phrase, concept.kind, context)
            target = shapes_caption(options.anchor, concept.kind, context)
            if source in pairs or mentions_any_phrase(source, exclude) or mentions_any_phrase(target, exclude):
                continue
            pairs[source] = PromptPair(source, target, phrase, options.anchor)
            if len(pairs) == options.count:
                return list(pairs.values())
        raise ValueError(
            f"found only {len(pairs)} distinct captions of {options.count} in {draws} draws; "
            "lower `count`, allow `erase_names` phrasings or exclude fewer contexts"
        )


def _pick_phrasing(rng: np.random.Generator, phrasings: list[str], name: str) -> str:
    """The explicit name 40% of the time (as in training) when other phrasings are allowed, else uniform."""
    others = [p for p in phrasings if p != name]
    if name in phrasings and (not others or rng.random() < _EXPLICIT_SHARE):
        return name
    pool = others or phrasings
    return pool[int(rng.integers(len(pool)))]


@hookimpl
def conceptedit_register_concept_sources(register: Callable[[type[ConceptSource]], None]) -> None:
    register(Templates)
    register(ShapesCaptions)
