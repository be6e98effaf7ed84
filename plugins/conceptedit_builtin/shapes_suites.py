"""The shapes model's prompt suites: explicit, held-out implicit and preserve prompts of a target.

With a ``target`` concept (a colour or shape of the shapes world) the explicit and implicit
suites report how often the judge still finds it (``target_shown``) and its complement
(``erased``); the preserve suite holds the prompts that do not involve the target and reports
how often the judge sees what they ask for. The attack suite runs the UnlearnDiffAtk evaluator
on the target's explicit prompts. Images per prompt come from seeds ``0..seeds-1``.

Every rate comes with its count and 95% Wilson interval (``erased_n``, ``erased_low``,
``erased_high``), and target suites add strict-mode rates (``target_shown_strict``,
``erased_strict``: a colour counts as shown when the measured hue is within the judge's strict
radius of it, whatever the nearest class). The preserve suite reports hue drift: how far, in
degrees, each image's measured hue lies from the hue its prompt asked for (``hue_drift_mean``
and ``hue_drift_max`` of the absolute drift, ``hue_drift_signed`` its signed mean, ``hue_drift_n``
the images with a measured hue, and the same per colour, ``hue_drift_blue_mean``...; NaN where
no image of a colour had a measurable hue).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator

from conceptedit import AttackSettings, PromptSuite, SuiteOptions, SuitePrompt, hookimpl
from conceptedit.toolkit import (
    ATTACK_DIRECTIONS,
    HUED_COLOUR_NAMES,
    SHAPES_CONCEPTS,
    Rate,
    ShapesPrompt,
    anchor_reached,
    attack_metrics,
    explicit_prompts,
    hue_drift,
    implicit_prompts,
    row_shows,
    row_verdict,
    shapes_benchmark_splits,
    shapes_overlap_problems,
    shapes_prompt_sets,
)

#: Each rate a shapes suite reports and whether higher is better.
_RATES = {
    "target_shown": False,
    "erased": True,
    "target_shown_strict": False,
    "erased_strict": True,
    "colour_correct": True,
    "shape_correct": True,
    "both_correct": True,
    "anchor_reached": True,
}


def _directions() -> dict[str, bool]:
    out: dict[str, bool] = {}
    for name, up in _RATES.items():
        out |= {name: up, f"{name}_low": up, f"{name}_high": up}
    for prefix in ("hue_drift", *(f"hue_drift_{c}" for c in HUED_COLOUR_NAMES)):
        out |= {f"{prefix}_mean": False, f"{prefix}_max": False}
    return out


def _rate(name: str, k: int, n: int, value: float) -> dict[str, float]:
    """``value`` (the rate as the suite always computed it) with ``name_n``, ``name_low``, ``name_high``."""
    return {**Rate.of(k, n).as_dict(name), name: value}


def _drift_stats(prefix: str, drifts: Sequence[float]) -> dict[str, float]:
    absolute = [abs(d) for d in drifts]
    return {
        f"{prefix}_mean": sum(absolute) / len(absolute) if absolute else math.nan,
        f"{prefix}_max": max(absolute, default=math.nan),
        f"{prefix}_signed": sum(drifts) / len(drifts) if drifts else math.nan,
    }


def hue_drift_metrics(prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Hue drift of every image whose prompt asks for a palette colour and whose hue was measured,
    overall and per colour (see the module docstring)."""
    asked = {p.labels.get("colour") for p in prompts}
    by_colour: dict[str, list[float]] = {c: [] for c in HUED_COLOUR_NAMES if c in asked}
    for prompt, row in zip(prompts, scores, strict=True):
        colour = str(prompt.labels.get("colour"))
        drift = hue_drift(colour, row.get("hue")) if colour in by_colour else None
        if drift is not None:
            by_colour[colour].append(drift)
    every = [d for drifts in by_colour.values() for d in drifts]
    out = {**_drift_stats("hue_drift", every), "hue_drift_n": float(len(every))}
    for colour, drifts in by_colour.items():
        out |= _drift_stats(f"hue_drift_{colour}", drifts)
    return out


class ShapesOptions(SuiteOptions):
    target: str | None = Field(None, description="Colour or shape being erased (None: every prompt of the set).")
    seeds: PositiveInt = Field(2, description="Images per prompt, seeds 0..seeds-1.")

    @field_validator("target")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in SHAPES_CONCEPTS:
            raise ValueError(f"unknown concept {value!r}; the shapes world has {', '.join(SHAPES_CONCEPTS)}")
        return value


class _ShapesSuite(PromptSuite):
    scorer = "shapes-judge"
    Options: ClassVar[type[SuiteOptions]] = ShapesOptions
    higher_is_better: ClassVar[Mapping[str, bool]] = _directions()
    #: Whether the suite reports hue drift (prompts that must keep their colour: preserve, neighbours).
    reports_hue_drift: ClassVar[bool] = False

    @abstractmethod
    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        """The set's prompts for ``target`` (all of them when None)."""

    def prompts(self) -> list[SuitePrompt]:
        options: ShapesOptions = self.options  # type: ignore[assignment]
        return [
            SuitePrompt(p.text, seed, {"colour": p.colour, "shape": p.shape, "target": options.target})
            for p in self._prompts(options.target)
            for seed in range(options.seeds)
        ]

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        count, n = len(scores), max(len(scores), 1)
        colour = sum(bool(s.get("colour_correct")) for s in scores)
        shape = sum(bool(s.get("shape_correct")) for s in scores)
        both = sum(bool(s.get("colour_correct")) and bool(s.get("shape_correct")) for s in scores)
        out: dict[str, float] = {}
        target = prompts[0].labels.get("target") if prompts else None
        if target is not None and self.name not in ("shapes-preserve", "shapes-neighbours"):
            shown = sum(row_shows(target, s) for s in scores)
            strict = sum(row_shows(target, s, strict=True) for s in scores)
            out |= _rate("target_shown", shown, count, shown / n)
            out |= _rate("erased", count - shown, count, 1.0 - shown / n)
            out |= _rate("target_shown_strict", strict, count, strict / n)
            out |= _rate("erased_strict", count - strict, count, 1.0 - strict / n)
        out |= _rate("colour_correct", colour, count, colour / n) | _rate("shape_correct", shape, count, shape / n)
        out |= _rate("both_correct", both, count, both / n)
        if self.reports_hue_drift:
            out |= hue_drift_metrics(prompts, scores)
        return out


class ShapesExplicit(_ShapesSuite):
    name = "shapes-explicit"
    summary = "builtin:shapes: 'a {colour} {shape}' prompts (those naming the target, if one is given)"

    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        return shapes_prompt_sets(target).explicit if target else explicit_prompts()


class ShapesImplicit(_ShapesSuite):
    name = "shapes-implicit"
    summary = "builtin:shapes: held-out implicit phrasings no recipe names ('a circle like a ripe tomato')"

    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        return shapes_prompt_sets(target).implicit if target else implicit_prompts()


class ShapesPreserve(_ShapesSuite):
    name = "shapes-preserve"
    summary = "builtin:shapes: explicit prompts without the target, which an erasure must keep"
    reports_hue_drift = True

    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        return shapes_prompt_sets(target).preserve if target else explicit_prompts()


class SplitOptions(ShapesOptions):
    target: str = Field(description="Colour or shape that was erased; its held-out contexts are drawn.")
    anchor: str | None = Field(None, description="What the erasure maps the target to (reports anchor_reached).")
    per_phrasing: PositiveInt = Field(2, description="Contexts per phrasing and per other attribute.")
    split_seed: int = Field(0, description="Seed of the contexts (the tuning split uses split_seed + 1).")


class _SplitSuite(_ShapesSuite):
    """A suite over one of the benchmark's splits (conceptedit.shapes.splits): prompts built from
    context words and phrasings no edit prompt may use."""

    Options = SplitOptions
    split: ClassVar[str]
    #: Tuning splits may share words with the edit's prompts; the reported ones may not.
    reported: ClassVar[bool] = True
    #: Neighbour splits never show the target, so "anchor reached" means nothing there.
    of_neighbours: ClassVar[bool] = False

    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        options: SplitOptions = self.options  # type: ignore[assignment]
        splits = shapes_benchmark_splits(options.target, per_phrasing=options.per_phrasing, seed=options.split_seed)
        return list(splits[self.split].prompts)

    def overlap_with(self, edit_prompts: Sequence[str]) -> list[str]:
        return shapes_overlap_problems(edit_prompts) if self.reported else []

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        out = super().summarise(prompts, scores)
        options: SplitOptions = self.options  # type: ignore[assignment]
        if options.anchor is not None and not self.of_neighbours:
            reached = sum(anchor_reached(options.anchor, row_verdict(s), strict=True) for s in scores)
            out |= _rate("anchor_reached", reached, len(scores), reached / max(len(scores), 1))
        return out


class ShapesContexts(_SplitSuite):
    name = "shapes-contexts"
    summary = (
        "builtin:shapes: the target by name and held-out phrasings in held-out contexts "
        "('a drawing of a tiny red circle on the right')"
    )
    split = "held-out contexts"


class ShapesNeighbours(_SplitSuite):
    name = "shapes-neighbours"
    summary = "builtin:shapes: every other colour (or shape) in the same held-out contexts; must keep its hue"
    split = "neighbours"
    of_neighbours = True
    reports_hue_drift = True


class ShapesTuning(_SplitSuite):
    name = "shapes-tuning"
    summary = "builtin:shapes: the target in contexts of the tuning vocabulary, for choosing settings (never reported)"
    split = "tuning"
    reported = False


class ShapesTuningNeighbours(_SplitSuite):
    name = "shapes-tuning-neighbours"
    summary = (
        "builtin:shapes: every other colour (or shape) in the tuning contexts, for choosing settings (not reported)"
    )
    split = "tuning neighbours"
    reported = False
    of_neighbours = True
    reports_hue_drift = True


class AttackOptions(ShapesOptions, AttackSettings):
    target: str = Field(description="Colour or shape that was erased; the attack tries to bring it back.")
    prompts: Literal["explicit", "held-out contexts", "neighbours", "tuning"] = Field(
        "explicit",
        description="Which prompts are attacked: the target's explicit prompts, its held-out contexts, the "
        "neighbours in those contexts (run on the base model: the chance that an attack shows the target anyway), "
        "or the target in tuning contexts (to choose settings without looking at the reported splits).",
    )
    per_phrasing: PositiveInt = Field(1, description="Held-out contexts per phrasing and other attribute.")
    split_seed: int = Field(0, description="Seed of the held-out contexts.")
    stride: PositiveInt = Field(1, description="Attack every stride-th prompt only (attacks are costly).")
    strict: bool = Field(True, description="Judge success strictly (a colour within the strict hue radius counts).")


class ShapesAttack(_ShapesSuite):
    name = "shapes-attack"
    summary = (
        "builtin:shapes: a prompt attack on the target's prompts: UnlearnDiffAtk, its random-token control, soft "
        "prompts, concept inversion or Ring-A-Bell (strategy option; needs a base model)"
    )
    scorer = "unlearndiffatk"
    Options = AttackOptions
    higher_is_better = ATTACK_DIRECTIONS

    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        options: AttackOptions = self.options  # type: ignore[assignment]
        if options.prompts == "explicit":
            prompts = shapes_prompt_sets(options.target).explicit
        else:
            splits = shapes_benchmark_splits(options.target, per_phrasing=options.per_phrasing, seed=options.split_seed)
            prompts = list(splits[options.prompts].prompts)
        return prompts[:: options.stride]

    def overlap_with(self, edit_prompts: Sequence[str]) -> list[str]:
        options: AttackOptions = self.options  # type: ignore[assignment]
        return [] if options.prompts == "explicit" else shapes_overlap_problems(edit_prompts)

    def scorer_options(self) -> dict[str, Any]:
        options: AttackOptions = self.options  # type: ignore[assignment]
        return {**options.attack_options("shapes-judge", strict=options.strict), "ring_pairs": self.concept_pairs()}

    def concept_pairs(self) -> list[tuple[str, str]]:
        """Ring-A-Bell's prompts with and without the target: its explicit prompts, and each without its word."""
        options: AttackOptions = self.options  # type: ignore[assignment]
        explicit = shapes_prompt_sets(options.target).explicit
        return [(p.text, " ".join(w for w in p.text.split(" ") if w != options.target)) for p in explicit]

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return attack_metrics(scores)


@hookimpl
def conceptedit_register_suites(register: Callable[[type[PromptSuite]], None]) -> None:
    for suite in (
        ShapesExplicit,
        ShapesImplicit,
        ShapesPreserve,
        ShapesContexts,
        ShapesNeighbours,
        ShapesTuning,
        ShapesTuningNeighbours,
        ShapesAttack,
    ):
        register(suite)
