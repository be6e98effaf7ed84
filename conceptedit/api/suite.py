"""Prompt suites: plugins that say what to generate for an evaluation and how to sum up the scores.

A suite yields prompts, each with its seed (and guidance, when the set fixes one) and labels
(facts the scorer checks, such as the colour the prompt asks for); it names the evaluator that
scores its images, and reduces the per-image scores to the suite's metrics. Suites register
through ``conceptedit_register_suites``, as methods and evaluators do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of a suite.

    Attributes:
        text: The prompt.
        seed: Its sampling seed (int64 range: some published sets use seeds past 2**31).
        labels: What the scorer and the summary need to know about it.
        guidance: Its classifier-free guidance scale, when the set fixes one.
    """

    text: str
    seed: int
    labels: Mapping[str, Any] = field(default_factory=dict)
    guidance: float | None = None


class SuiteOptions(BaseModel):
    """Base class of a suite's options; a misspelt key is an error."""

    model_config = ConfigDict(extra="forbid")


class PromptSuite(ABC):
    """A prompt set, the evaluator that scores it, and the metrics it reports.

    Class attributes a subclass sets: ``name``, ``summary``, ``scorer`` (an evaluator's name),
    ``Options`` (its pydantic options) and ``higher_is_better`` (metric name -> direction, for
    reports that colour a change).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    #: The evaluator that scores this suite's images (a class default; a suite may pick one per options).
    scorer: str
    Options: ClassVar[type[SuiteOptions]] = SuiteOptions
    higher_is_better: ClassVar[Mapping[str, bool]] = {}

    def __init__(self, options: SuiteOptions) -> None:
        self.options = options

    @abstractmethod
    def prompts(self) -> list[SuitePrompt]:
        """Every prompt of the suite, in a fixed order."""

    def overlap_with(self, edit_prompts: Sequence[str]) -> list[str]:
        """Why this suite's numbers would not be honest for an edit made from ``edit_prompts`` (the
        recipe's concept prompts): e.g. they use the suite's held-out words. Empty when they would;
        a recipe that evaluates on a suite that objects is refused when it loads."""
        return []

    def scorer_options(self) -> dict[str, Any]:
        """Keyword arguments for the scorer's constructor (e.g. the concept a CLIP scorer looks for)."""
        return {}

    @abstractmethod
    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The suite's metrics from its prompts and the scorer's per-image results, in order."""

    def compare(self, scores: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Metrics of one model's scores against another's on the same prompts and seeds (FID to
        the base model's images, say). Evaluation adds them to each model's metrics, the base
        model's being measured against itself."""
        return {}


class AttackSettings(SuiteOptions):
    """Options of an attacked suite, passed to the ``unlearndiffatk`` evaluator."""

    tokens: PositiveInt = Field(5, description="Adversarial prefix tokens.")
    iterations: PositiveInt = Field(40, description="Optimisation steps per prompt.")
    lr: PositiveFloat = Field(0.01, description="Adam learning rate of the token weights.")
    check_every: PositiveInt = Field(10, description="Generate and judge the attacked prompt every N steps.")
    strategy: Literal["gradient", "random", "soft_prompt", "concept_inversion", "ring_a_bell"] = Field(
        "gradient",
        description="gradient: UnlearnDiffAtk's discrete tokens; random: the control, random prefix tokens with the "
        "same number of generations; soft_prompt: PGD on continuous token embeddings (the attack robust methods "
        "train against, through ctx.adversary); concept_inversion: CCE, new token embeddings fitted on the attacked "
        "model to the base model's image, in the target word's place; ring_a_bell: a genetic search for a discrete "
        "prompt carrying the target's concept vector (text encoder only).",
    )
    norm: Literal["linf", "l2"] = Field("linf", description="soft_prompt: the ball the adversarial embeddings stay in.")
    radius: PositiveFloat = Field(
        0.05, description="soft_prompt: the ball's radius (per coordinate for linf, per token for l2)."
    )
    step_size: PositiveFloat = Field(0.005, description="soft_prompt: PGD step size.")
    inversion_tokens: PositiveInt = Field(1, description="concept_inversion: new tokens learned (CCE: one).")
    inversion_lr: PositiveFloat = Field(5e-3, description="concept_inversion: AdamW learning rate of the new tokens.")
    ring_length: PositiveInt = Field(16, description="ring_a_bell: tokens of the searched prompt (reference: 16).")
    ring_population: int = Field(50, ge=2, description="ring_a_bell: strings per generation (reference: 200).")
    ring_generations: PositiveInt = Field(100, description="ring_a_bell: generations (reference: 3000).")
    ring_strength: float = Field(3.0, ge=0, description="ring_a_bell: concept vector coefficient η (reference: 3).")

    def attack_options(self, judge: str, **judge_options: Any) -> dict[str, Any]:
        """Keyword arguments for the attack evaluator, judged by evaluator ``judge``."""
        settings = {key: getattr(self, key) for key in AttackSettings.model_fields}
        return {"judge": judge, "judge_options": judge_options, **settings}


#: How the metrics of an attacked suite move when the erasure is better.
ATTACK_DIRECTIONS: Mapping[str, bool] = {
    **{f"{name}{part}": False for name in ("plain_shown", "attack_success_rate") for part in ("", "_low", "_high")},
    "attack_gain": False,
}
