"""The plugin-author API: the base class every edit method extends.

A method is a class with a name, a pydantic ``Params`` model and up to three hook points
that the engine calls in this order for each recipe edit:

1. :meth:`EditMethod.encode_prompts` -- **prompt encoding**: turn prompts into text-encoder
   embeddings plus the token positions (SoT, first [EoT], keywords) the method reads.
2. :meth:`EditMethod.attention_edits` -- **attention edit**: closed-form changes of the
   cross-attention key/value projections, as :class:`~conceptedit.KVEdit` problems that the
   engine's shared solver turns into new weights.
3. :meth:`EditMethod.trainable_parameters` + :meth:`EditMethod.trajectory_loss` --
   **trajectory loss**: loss terms on denoising predictions inside the training loop the
   engine owns (optimiser, accumulation, checkpoints, NaN checks, accelerate).
4. :meth:`EditMethod.inference_guard` + :meth:`EditMethod.install_guard` -- **inference
   guard**: for methods that act while sampling (SLD, AdaVD), a serialisable
   :class:`~conceptedit.Guard` the run saves, and the classmethod that puts it on a pipeline
   (after the run's weight edits, and again in :func:`conceptedit.load`).

Every hook has a do-nothing default, so a method overrides only what it uses. Built-in
methods use exactly this API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt

if TYPE_CHECKING:
    from torch import Tensor

    from conceptedit.engine.context import EditContext
    from conceptedit.engine.encoding import PromptEncoding
    from conceptedit.engine.guards import Guard
    from conceptedit.engine.kv_solver import KVEdit
    from conceptedit.models.backbone import BackboneAdapter

MethodKind = Literal["closed_form", "training", "inference_time"]


class MethodParams(BaseModel):
    """Base of every method's ``Params``: unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class TrainingConfig(BaseModel):
    """Settings of the engine's training loop; training methods subclass it to change defaults."""

    model_config = ConfigDict(extra="forbid")

    steps: PositiveInt = Field(100, description="Optimiser steps.")
    lr: PositiveFloat = Field(1e-5, description="Learning rate.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimiser.")
    weight_decay: NonNegativeFloat = Field(0.01, description="Weight decay (AdamW/SGD).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon.")
    grad_accum: PositiveInt = Field(1, description="Micro-batches summed per optimiser step.")
    max_grad_norm: PositiveFloat | None = Field(None, description="Clip gradients to this norm.")
    zero_grad: bool = Field(
        True,
        description="Zero gradients after every step. False keeps summing them over the whole run, "
        "as some reference implementations do by accident.",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    micro_batch: PositiveInt | None = Field(
        None,
        description="Most samples per denoiser call (None: whole batch). Each call's graph is rebuilt in "
        "backward, one call at a time, so 1 keeps activation memory at one sample's worth (one extra "
        "forward per call).",
    )
    park_idle_modules: bool = Field(
        True,
        description="Free the weights of pipeline parts the loop does not train (text encoder, VAE) while it "
        "runs, from a temporary safetensors file; they come back bit for bit, and on demand if a method "
        "encodes prompts mid-training.",
    )
    checkpoint_every: PositiveInt | None = Field(
        None, description="Save a resumable checkpoint every N steps (None: only at the end)."
    )


class EditMethod:
    """One edit technique. The engine makes one instance per recipe edit.

    Class attributes a subclass sets:
        name: What recipes write after ``method:`` (lower case, ``[a-z0-9_]``).
        summary: One line for ``conceptedit methods``.
        kind: ``closed_form``, ``training`` or ``inference_time`` (acts while sampling, through
            :meth:`inference_guard`; changes no weights).
        paper: Citation or URL of the method's paper, if any.
        backbones: Backbone families it supports (``sd1``, ``sd2``, ...).
        Params: Its pydantic parameters (subclass of :class:`MethodParams`).
        Training: For training methods, its :class:`TrainingConfig` subclass with its defaults.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[MethodKind]
    paper: ClassVar[str | None] = None
    backbones: ClassVar[frozenset[str]] = frozenset({"sd1", "sd2"})
    Params: ClassVar[type[MethodParams]] = MethodParams
    Training: ClassVar[type[TrainingConfig]] = TrainingConfig

    def __init__(self, params: MethodParams) -> None:
        self.params = params

    # -- hook point: prompt encoding --------------------------------------------------

    def encode_prompts(self, ctx: EditContext, prompts: Sequence[str]) -> PromptEncoding:
        """Encode prompts for this method's own use; override to change embeddings or positions.

        The default runs the pipeline's text encoder (see :meth:`EditContext.encode_prompts`).
        """
        return ctx.encode_prompts(prompts)

    # -- hook point: attention edit ---------------------------------------------------

    def attention_edits(self, ctx: EditContext) -> Iterable[KVEdit]:
        """Yield closed-form key/value edits; the engine solves and applies each before the next.

        Yielding several lets an iterative method (one that needs the weights of its previous
        round) read them from ``ctx`` between rounds.
        """
        return ()

    # -- hook point: trajectory loss --------------------------------------------------

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        """Names (``unet.…`` / ``text_encoder.…``) of the parameters this method trains."""
        return ()

    def prepare_training(self, ctx: EditContext) -> None:
        """Build what the loss needs (cached trajectories, embeddings) before step 1."""

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        """Loss terms for one micro-batch; the engine sums them (times the edit's weight).

        Draw randomness from ``ctx.generator`` so runs repeat exactly. Call the model being
        trained through ``ctx.predict_noise`` and frozen references inside
        ``with ctx.reference_weights(...)``.
        """
        raise NotImplementedError(f"{type(self).__name__} declares no trajectory loss")

    # -- hook point: inference guard --------------------------------------------------

    def inference_guard(self, ctx: EditContext) -> Guard | None:
        """For methods that act at sampling time: the guard to save in the run folder, or None.

        The engine writes it to ``guards/`` and records it in the manifest; once every weight
        edit of the run has finished it calls :meth:`install_guard` with what it wrote, as
        :func:`conceptedit.load` does later, so both pipelines behave the same.
        """
        return None

    @classmethod
    def install_guard(cls, pipeline: Any, guard: Guard, adapter: BackboneAdapter) -> None:
        """Put a saved guard on ``pipeline`` (attention processors, UNet hooks, ...).

        A classmethod because loading a run has no recipe edit to build a method from: all it
        may rely on is what :meth:`inference_guard` saved. Wrap what is installed rather than
        replacing it, so guards and other processors compose.
        """
        raise NotImplementedError(f"{cls.__name__} saved a guard but does not implement install_guard")

    # -- description ------------------------------------------------------------------

    @classmethod
    def describe(cls) -> dict[str, object]:
        """Name, kind, backbones and every parameter with type, default and description."""
        from conceptedit.recipe.describe import describe_model

        out: dict[str, object] = {
            "name": cls.name,
            "summary": cls.summary,
            "kind": cls.kind,
            "paper": cls.paper,
            "backbones": sorted(cls.backbones),
            "params": describe_model(cls.Params),
        }
        if cls.kind == "training":
            out["training"] = describe_model(cls.Training)
        return out
