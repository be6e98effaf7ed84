"""What a method and a lifecycle hook may use of the run: the contexts, as protocols.

The engine's concrete contexts (:mod:`conceptedit.engine.context`) have more (the weight
ledger, the plugin host, the loaded recipe); a plugin sees only these members, so the engine
can change everything behind them. Every built-in method is written against exactly this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from conceptedit.api.adversary import Adversary
    from conceptedit.api.backbone import BackboneAdapter, CrossAttentionLayer
    from conceptedit.api.edits import PromptEncoding, PromptPair
    from conceptedit.api.params import TrainingConfig


class ProgressTask(Protocol):
    """One progress bar: ``advance`` it as work is done (extra fields, a loss say, show beside it)."""

    def advance(self, steps: int = 1, **fields: object) -> None: ...


class Progress(Protocol):
    """Progress bars for long steps (quiet runs and non-main processes draw nothing)."""

    def task(self, description: str, total: int | None) -> AbstractContextManager[ProgressTask]: ...


class EditContext(Protocol):
    """One recipe edit, as its method sees it. The engine makes one per edit and passes it to
    every hook point of :class:`~conceptedit.EditMethod`."""

    # -- where and what -----------------------------------------------------------------

    @property
    def label(self) -> str:
        """The edit's name in logs and outputs."""

    @property
    def index(self) -> int:
        """The edit's position in the recipe (group members share their group's)."""

    @property
    def edit(self) -> Any:
        """The edit's validated recipe entry (``edit.params`` are the method's parameters)."""

    @property
    def training(self) -> TrainingConfig:
        """The training loop in force (a group's, for a group member); only training methods have one
        (others get an :class:`~conceptedit.EditError`)."""

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline being edited (in place)."""

    @property
    def adapter(self) -> BackboneAdapter:
        """Access to the pipeline's parts (text encoder, UNet, scheduler...)."""

    @property
    def device(self) -> torch.device:
        """Where computation runs."""

    # -- randomness, files, progress -------------------------------------------------------

    @property
    def generator(self) -> torch.Generator:
        """Seeded randomness for this edit: draw every random number from it."""

    def seed_for(self, *parts: object) -> int:
        """A seed of its own for one purpose of this edit, repeatable across runs and resumes."""

    @property
    def base_dir(self) -> Path:
        """The folder the recipe's relative paths are read from."""

    @property
    def cache_dir(self) -> Path:
        """Where reusable intermediate results are cached."""

    @property
    def base_fingerprint(self) -> str:
        """Identifies the base model, for cache keys."""

    @property
    def edit_start_fingerprint(self) -> str:
        """Identifies the model at this edit's start (base model and earlier edits), for cache keys."""

    @property
    def process_index(self) -> int | None:
        """This process's rank when several train data-parallel, else None."""

    @property
    def progress(self) -> Progress:
        """Progress bars for this edit's long steps."""

    def cache_path(self, kind: str, key: str, suffix: str = ".safetensors") -> Path:
        """A file path in the cache folder for ``kind`` and a content ``key``."""

    # -- hook point helpers ----------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], length: Literal["full", "longest"] = "full") -> PromptEncoding:
        """The text encoder's output for ``prompts`` with their token positions."""

    def concept_pairs(self, ref: str) -> list[PromptPair]:
        """The prompt pairs of a concept set the recipe names."""

    def cross_attention_layers(self) -> list[CrossAttentionLayer]:
        """Every cross-attention layer of the denoiser."""

    def predict_noise(self, latents: Tensor, timesteps: Tensor, hidden: Tensor, *, frozen: bool = False) -> Tensor:
        """The denoiser's prediction: the model being trained, or with ``frozen=True`` the plain module."""

    def separable_loss(
        self, latents: Tensor, timesteps: Tensor, hidden: Tensor, loss: Callable[[Tensor, range], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Loss terms of the trained model's predictions for a batch whose loss is a sum over its rows:
        ``loss(predictions of rows, rows)`` gives the rows' share of each term, and the shares of any
        split of the batch add up to the whole batch's terms. With ``training.micro_batch`` each
        micro-batch is run once and back-propagated at once (one forward and one backward per sample,
        one micro-batch's activations), where :meth:`predict_noise` would rebuild each call's graph."""

    def reference_weights(
        self, which: Literal["base", "edit_start"], names: Sequence[str] | None = None
    ) -> AbstractContextManager[None]:
        """Run the model as it was at the run's start (``base``) or this edit's start."""

    def adversary(self, kind: str, **options: Any) -> Adversary:
        """An attack (``soft_prompt``, ...) on the model being edited, seeded from the edit's seed
        unless ``seed`` is given: the same implementation the attack suites evaluate with."""


class RunContext(Protocol):
    """A run of a recipe, as lifecycle hooks see it."""

    @property
    def recipe(self) -> Any:
        """The validated recipe."""

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline being edited."""

    @property
    def adapter(self) -> BackboneAdapter:
        """Access to the pipeline's parts."""

    @property
    def device(self) -> torch.device:
        """Where computation runs."""

    @property
    def run_dir(self) -> Path:
        """The run folder being written (a staging folder until the run completes)."""

    @property
    def seed(self) -> int:
        """The recipe's seed."""
