"""Evaluators: plugins that score generated images (a concept detector, a judge, a distance).

An evaluator gets samples -- an image with the prompt, seed and whatever labels the prompt
set attached (the concept it should or should not show) -- and returns one dictionary of
scores per sample. It also describes its protocol (classes, thresholds, version), which
reports print next to every number so numbers from different protocols are never mixed up.

Two flags widen what an evaluator sees: ``needs_base`` (each sample also carries the base
model's image and latent for the same prompt and seed, for distances and attack targets) and
``needs_model`` (the evaluator gets the model under evaluation through :meth:`Evaluator.attach`,
for scorers that generate, such as adversarial attacks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from PIL import Image
from torch import Tensor

#: A score row may carry ``(caption, image)`` under this key: an image the scorer made itself (an
#: attacked prompt's, say). Reports show it beside the sample's own; summaries never see it.
EXTRA_IMAGE = "extra_image"


@dataclass
class Sample:
    """One generated image and what was asked for.

    Attributes:
        prompt: The prompt that produced it.
        seed: Its sampling seed.
        image: The image.
        labels: Facts about the prompt from its prompt set (e.g. ``{"colour": "red"}``).
        guidance: The CFG scale it was drawn with.
        latent: The final latent the image was decoded from.
        base_image: The base model's image for the same prompt and seed (``needs_base`` scorers).
        base_latent: The base model's final latent for it.
    """

    prompt: str
    seed: int
    image: Image.Image
    labels: Mapping[str, Any] = field(default_factory=dict)
    guidance: float | None = None
    latent: Tensor | None = None
    base_image: Image.Image | None = None
    base_latent: Tensor | None = None


class EvaluatedModel(Protocol):
    """The model under evaluation, as an evaluator with ``needs_model`` sees it."""

    @property
    def adapter(self) -> Any:
        """The pipeline's backbone adapter (text encoder, UNet, scheduler, tokenizer)."""

    @property
    def steps(self) -> int:
        """Sampling steps of this evaluation."""

    def render(self, hidden: Tensor, seed: int, guidance: float | None) -> tuple[Image.Image, Tensor]:
        """An image and its final latent from text embeddings ``hidden`` (1 x tokens x width) at ``seed``."""

    def evaluator(self, name: str, **options: Any) -> Evaluator:
        """Another installed evaluator (an attack's judge, say), constructed with ``options``."""

    def base_model(self) -> AbstractContextManager[Any]:
        """Inside, the base model's adapter (``needs_base`` scorers): for attacks an attacker runs on the
        published base model and carries over to the erased one (Ring-A-Bell's search)."""


class Evaluator(ABC):
    """Scores samples. Subclass, set ``name``/``summary``/``version`` and register the class."""

    name: ClassVar[str]
    summary: ClassVar[str]
    version: ClassVar[str] = "1"
    needs_base: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    model: EvaluatedModel  # set by attach(), for evaluators with needs_model

    def attach(self, model: EvaluatedModel) -> None:
        """Called before :meth:`score` on evaluators with ``needs_model``; keep what you need."""
        self.model = model

    def concept_shown(self, row: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
        """Whether a scored image (``row``, from :meth:`score`) shows the concept its prompt set is about.

        Judges that can say so override this; an attack needs it to know when it has succeeded.
        """
        raise NotImplementedError(f"evaluator {self.name!r} cannot say whether an image shows a concept")

    @abstractmethod
    def score(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """One dictionary of scores per sample, in order."""

    def protocol(self) -> dict[str, Any]:
        """What a reader needs to compare numbers: scorer, version, classes, thresholds."""
        return {"scorer": self.name, "version": self.version}
