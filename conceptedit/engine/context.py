"""What the engine hands to methods and lifecycle hooks: the run, and the edit in it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from conceptedit.api.adversary import Adversary
from conceptedit.api.backbone import BackboneAdapter, CrossAttentionLayer
from conceptedit.api.edits import PromptEncoding, PromptPair
from conceptedit.api.recipe import ConceptSet
from conceptedit.attacks import make_adversary
from conceptedit.engine.ledger import WeightLedger
from conceptedit.engine.memory import ParkedModules
from conceptedit.errors import EditError
from conceptedit.io.progress import Reporter
from conceptedit.recipe.concepts import expand_concepts

if TYPE_CHECKING:
    from conceptedit.api.method import EditMethod
    from conceptedit.api.params import TrainingConfig
    from conceptedit.plugins import PluginHost
    from conceptedit.recipe.loader import LoadedRecipe


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from the run seed and a path (edit index, process, purpose)."""
    text = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def default_cache_dir() -> Path:
    """``$CONCEPTEDIT_CACHE`` or ``~/.cache/conceptedit``: prior statistics, trajectories."""
    return Path(os.environ.get("CONCEPTEDIT_CACHE", Path.home() / ".cache" / "conceptedit"))


@dataclass
class RunContext:
    """One run of a recipe.

    Attributes:
        loaded: The validated recipe and where it came from.
        pipeline: The diffusers pipeline being edited (in place).
        adapter: Access to the pipeline's parts.
        device: Where computation runs.
        ledger: Original values of changed parameters.
        host: The plugin host (for lifecycle hooks).
        run_dir: The run folder being written (a staging folder until the run completes).
        reporter: Progress bars.
        cache_dir: Where methods cache reusable intermediate results.
        base_fingerprint: Identifies the base model (its file hashes), for cache keys.
        process_index: This process's rank when several train data-parallel, else None.
    """

    loaded: LoadedRecipe
    pipeline: Any
    adapter: BackboneAdapter
    device: torch.device
    ledger: WeightLedger
    host: PluginHost
    run_dir: Path
    reporter: Reporter
    cache_dir: Path = field(default_factory=default_cache_dir)
    base_fingerprint: str = ""
    process_index: int | None = None
    training_modules: dict[str, nn.Module] = field(default_factory=dict)
    parked: ParkedModules | None = None
    #: Set by the training loop while a step's loss is computed: back-propagates a share of one member's
    #: loss with the loop's scaling (the member's weight, gradient accumulation, mixed-precision scaling).
    backward: Callable[[Tensor], None] | None = None
    #: ids of loss terms :meth:`EditContext.separable_loss` has already back-propagated this step.
    applied_terms: set[int] = field(default_factory=set)

    @property
    def recipe(self) -> Any:
        return self.loaded.recipe

    @property
    def seed(self) -> int:
        return int(self.recipe.seed)


@dataclass
class EditContext:
    """One edit of a run, as a method sees it.

    Attributes:
        run: The run this edit belongs to.
        edit: The edit's validated spec (``edit.params`` are the method's parameters).
        index: The edit's position in the recipe (group members share their group's).
        method: The method object running this edit.
        generator: Seeded randomness for this edit; use it for every random draw.
        training_config: The training-loop settings in force (a group's, for a group member),
            or None for an edit that does not train. Fixed when the context is made; methods
            read it as :attr:`training`.
    """

    run: RunContext
    edit: Any
    index: int
    method: EditMethod[Any]
    generator: torch.Generator
    training_config: TrainingConfig | None = None

    @property
    def training(self) -> TrainingConfig:
        """The training loop in force; only training methods have one."""
        if self.training_config is None:
            raise EditError(f"{self.label}: ctx.training exists only for training methods (kind: training)")
        return self.training_config

    @property
    def adapter(self) -> BackboneAdapter:
        return self.run.adapter

    @property
    def pipeline(self) -> Any:
        return self.run.pipeline

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def label(self) -> str:
        return str(self.edit.label)

    @property
    def base_dir(self) -> Path:
        """The folder relative paths of the recipe are read from (the recipe file's folder)."""
        return self.run.loaded.base_dir

    @property
    def cache_dir(self) -> Path:
        """Where reusable intermediate results (priors, trajectories, anchors) are cached."""
        return self.run.cache_dir

    @property
    def base_fingerprint(self) -> str:
        """Identifies the base model (its file hashes), for cache keys."""
        return self.run.base_fingerprint

    @property
    def edit_start_fingerprint(self) -> str:
        """Identifies the model at this edit's start (the base model and what earlier edits changed),
        for cache keys of results computed with ``reference_weights("edit_start")``."""
        changes = self.run.ledger.edit_start_digest()
        return hashlib.sha256(f"{self.base_fingerprint}|{changes}".encode()).hexdigest()

    @property
    def process_index(self) -> int | None:
        """This process's rank when several train data-parallel, else None."""
        return self.run.process_index

    @property
    def progress(self) -> Reporter:
        """Progress bars for long steps of this edit (``with ctx.progress.task(label, total) as bar``)."""
        return self.run.reporter

    def seed_for(self, *parts: object) -> int:
        """A seed of its own for one purpose of this edit (``ctx.seed_for("noise", j)``): derived from
        the run seed, the edit's position and ``parts``, so it repeats across runs and resumes."""
        return derive_seed(self.run.seed, self.index, *parts)

    # prompt encoding ----------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], length: Literal["full", "longest"] = "full") -> PromptEncoding:
        """The text encoder's output for ``prompts`` with token positions (SoT, [EoT]...).

        ``length="longest"`` pads only to the longest prompt: the SD text encoder is causal,
        so every row up to a prompt's first [EoT] is identical to the 77-token encoding, at a
        fraction of the cost. Use ``full`` when you need padding rows.
        """
        if self.run.parked is not None:  # a training loop parked the text encoder; it is needed after all
            self.run.parked.restore()
        return self.adapter.encode_prompts(prompts, length=length)

    def concept_pairs(self, ref: str | ConceptSet) -> list[PromptPair]:
        """The prompt pairs of a concept set named in the recipe (or given inline)."""
        if isinstance(ref, ConceptSet):
            return expand_concepts(ref, self.run.loaded.base_dir)
        expanded = self.run.loaded.concepts  # expanded once, when the recipe was loaded
        if ref not in expanded:
            raise EditError(f"{self.label}: no concept set named {ref!r}")
        return list(expanded[ref])

    # attention edit -----------------------------------------------------------------

    def cross_attention_layers(self) -> list[CrossAttentionLayer]:
        """Every cross-attention layer of the denoiser (sizes come from the model)."""
        return self.adapter.cross_attention_layers()

    def adversary(self, kind: str, **options: Any) -> Adversary:
        """An attack on the model being edited (see :mod:`conceptedit.attacks`)."""
        if self.run.parked is not None:  # attacks run the text encoder, which training may have parked
            self.run.parked.restore()
        options.setdefault("seed", self.seed_for("adversary", kind))
        return make_adversary(kind, self.adapter, **options)

    # trajectory loss ----------------------------------------------------------------

    def predict_noise(self, latents: Tensor, timesteps: Tensor, hidden: Tensor, *, frozen: bool = False) -> Tensor:
        """The denoiser's prediction for a batch.

        Inside training it runs the model being trained (through accelerate's wrapper), or with
        ``frozen=True`` the plain module, for reference passes under ``reference_weights``. When
        the training loop sets ``micro_batch``, the batch is split into calls of at most that
        many samples; under autograd each call keeps only its inputs and is run again with
        gradients during the backward pass, one call at a time, so activation memory is one
        micro-batch's worth however large the batch, for one extra forward per call. Gradient
        checkpointing then shrinks that one call's activations further.
        """
        unet = None if frozen else self.run.training_modules.get(self.adapter.denoiser_name)
        size = getattr(self.training_config, "micro_batch", None) or latents.shape[0]
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        recompute = len(range(0, latents.shape[0], size)) > 1 and torch.is_grad_enabled() and unet is not None

        def call(_anchor: Tensor | None, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
            return self.adapter.predict_noise(x, t, h, unet=unet)

        outputs = []
        for i in range(0, latents.shape[0], size):
            chunk = (latents[i : i + size], timesteps[i : i + size], hidden[i : i + size])
            if recompute:
                # Reentrant checkpointing runs the call without a graph and redoes it in backward;
                # the anchor (an input that requires grad) makes the output part of the graph.
                anchor = torch.zeros((), requires_grad=True)
                outputs.append(checkpoint(call, anchor, *chunk, use_reentrant=True))
            else:
                outputs.append(call(None, *chunk))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def separable_loss(
        self, latents: Tensor, timesteps: Tensor, hidden: Tensor, loss: Callable[[Tensor, range], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Loss terms of the trained model's predictions for a batch whose loss is a sum over its rows.

        ``loss(predictions, rows)`` returns the share of each term that the batch rows ``rows`` (a
        ``range``) carry, from their predictions alone. Without ``micro_batch`` (or outside training)
        it is called once on the whole batch and the terms come back with their graph. With
        ``micro_batch``, each micro-batch runs once with gradients and its shares are back-propagated
        at once and its graph freed, so activation memory is one micro-batch's and each sample costs
        one forward and one backward; :meth:`predict_noise` must instead run every call again in
        backward, because there the loss may combine the whole batch. The summed terms then come
        back detached, and the training loop knows they have been applied.
        """
        size = getattr(self.training_config, "micro_batch", None)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        rows = range(latents.shape[0])
        backward = self.run.backward
        if size is None or size >= len(rows) or not torch.is_grad_enabled() or backward is None:
            return loss(self.predict_noise(latents, timesteps, hidden), rows)
        unet = self.run.training_modules.get(self.adapter.denoiser_name)
        totals: dict[str, Tensor] = {}
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            prediction = self.adapter.predict_noise(
                latents[start : part.stop], timesteps[start : part.stop], hidden[start : part.stop], unet=unet
            )
            shares = loss(prediction, part)
            total = sum(shares.values(), torch.zeros((), device=prediction.device))
            if total.requires_grad:
                backward(total)
            for key, value in shares.items():
                value = value.detach()
                totals[key] = totals[key] + value if key in totals else value
        self.run.applied_terms.update(id(value) for value in totals.values())
        return totals

    @contextmanager
    def reference_weights(
        self, which: Literal["base", "edit_start"], names: Sequence[str] | None = None
    ) -> Iterator[None]:
        """Run the model as it was at the run's start (``base``) or this edit's start.

        Only parameters changed so far differ, so only those are swapped; nothing else is
        copied. Wrap reference passes in ``torch.no_grad()``.
        """
        with self.run.ledger.reference(which, names):
            yield

    def cache_path(self, kind: str, key: str, suffix: str = ".safetensors") -> Path:
        """A file path under the cache for ``kind`` (a folder) and a content ``key``."""
        folder = self.run.cache_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}{suffix}"
