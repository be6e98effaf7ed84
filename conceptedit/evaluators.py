"""Evaluators: plugins that score generated images (a concept detector, a judge, a distance).

An evaluator gets samples -- an image with the prompt, seed and whatever labels the prompt
set attached (the concept it should or should not show) -- and returns one dictionary of
scores per sample. It also describes its protocol (classes, thresholds, version), which
reports print next to every number so numbers from different protocols are never mixed up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image


@dataclass
class Sample:
    """One generated image and what was asked for.

    Attributes:
        prompt: The prompt that produced it.
        seed: Its sampling seed.
        image: The image.
        labels: Facts about the prompt from its prompt set (e.g. ``{"colour": "red"}``).
    """

    prompt: str
    seed: int
    image: Image.Image
    labels: Mapping[str, Any] = field(default_factory=dict)


class Evaluator(ABC):
    """Scores samples. Subclass, set ``name``/``summary``/``version`` and register the class."""

    name: ClassVar[str]
    summary: ClassVar[str]
    version: ClassVar[str] = "1"

    @abstractmethod
    def score(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """One dictionary of scores per sample, in order."""

    def protocol(self) -> dict[str, Any]:
        """What a reader needs to compare numbers: scorer, version, classes, thresholds."""
        return {"scorer": self.name, "version": self.version}
