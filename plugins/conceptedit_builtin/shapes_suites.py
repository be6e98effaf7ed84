"""The shapes model's prompt suites: explicit, held-out implicit and preserve prompts of a target.

With a ``target`` concept (a colour or shape of the shapes world) the explicit and implicit
suites report how often the judge still finds it (``target_shown``) and its complement
(``erased``); the preserve suite holds the prompts that do not involve the target and reports
how often the judge sees what they ask for. The attack suite runs the UnlearnDiffAtk evaluator
on the target's explicit prompts. Images per prompt come from seeds ``0..seeds-1``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import Field, PositiveInt, field_validator

from conceptedit import AttackSettings, PromptSuite, SuiteOptions, SuitePrompt, hookimpl
from conceptedit.toolkit import (
    ATTACK_DIRECTIONS,
    SHAPES_CONCEPTS,
    ShapesPrompt,
    attack_metrics,
    explicit_prompts,
    implicit_prompts,
    row_shows,
    shapes_prompt_sets,
)


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
    higher_is_better: ClassVar[Mapping[str, bool]] = {
        "target_shown": False,
        "erased": True,
        "colour_correct": True,
        "shape_correct": True,
        "both_correct": True,
    }

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
        n = max(len(scores), 1)
        colour = sum(bool(s.get("colour_correct")) for s in scores) / n
        shape = sum(bool(s.get("shape_correct")) for s in scores) / n
        both = sum(bool(s.get("colour_correct")) and bool(s.get("shape_correct")) for s in scores) / n
        out = {"colour_correct": colour, "shape_correct": shape, "both_correct": both}
        target = prompts[0].labels.get("target") if prompts else None
        if target is not None and self.name != "shapes-preserve":
            shown = sum(row_shows(target, s) for s in scores) / n
            out = {"target_shown": shown, "erased": 1.0 - shown, **out}
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

    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        return shapes_prompt_sets(target).preserve if target else explicit_prompts()


class AttackOptions(ShapesOptions, AttackSettings):
    target: str = Field(description="Colour or shape that was erased; the attack tries to bring it back.")


class ShapesAttack(_ShapesSuite):
    name = "shapes-attack"
    summary = "builtin:shapes: UnlearnDiffAtk prompt attack on the target's explicit prompts (needs a base model)"
    scorer = "unlearndiffatk"
    Options = AttackOptions
    higher_is_better = ATTACK_DIRECTIONS

    def _prompts(self, target: str | None) -> list[ShapesPrompt]:
        return shapes_prompt_sets(target).explicit if target else explicit_prompts()

    def scorer_options(self) -> dict[str, Any]:
        options: AttackOptions = self.options  # type: ignore[assignment]
        return options.attack_options("shapes-judge")

    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return attack_metrics(scores)


@hookimpl
def conceptedit_register_suites(register: Callable[[type[PromptSuite]], None]) -> None:
    for suite in (ShapesExplicit, ShapesImplicit, ShapesPreserve, ShapesAttack):
        register(suite)
