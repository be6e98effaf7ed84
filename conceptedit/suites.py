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
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


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
    scorer: ClassVar[str]
    Options: ClassVar[type[SuiteOptions]] = SuiteOptions
    higher_is_better: ClassVar[Mapping[str, bool]] = {}

    def __init__(self, options: SuiteOptions) -> None:
        self.options = options

    @abstractmethod
    def prompts(self) -> list[SuitePrompt]:
        """Every prompt of the suite, in a fixed order."""

    @abstractmethod
    def summarise(self, prompts: Sequence[SuitePrompt], scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The suite's metrics from its prompts and the scorer's per-image results, in order."""
