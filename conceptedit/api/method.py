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
   engine owns (optimiser, accumulation, checkpoints, NaN checks, accelerate);
   :meth:`EditMethod.gradient_masks` may restrict which entries of the trained parameters change;
   :meth:`EditMethod.added_modules` puts new modules (adapters) on the pipeline for the loop to
   train, and :meth:`EditMethod.trained_guard` saves them afterwards as a guard (Receler's erasers).
4. :meth:`EditMethod.inference_guard` + :meth:`EditMethod.install_guard` -- **inference
   guard**: for methods that act while sampling (SLD, AdaVD), a serialisable
   :class:`~conceptedit.Guard` the run saves, and the classmethod that puts it on a pipeline
   (after the run's weight edits, and again in :func:`conceptedit.load`).

Every hook has a do-nothing default, so a method overrides only what it uses. Built-in
methods use exactly this API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from conceptedit.api.params import MethodParams, TrainingConfig

if TYPE_CHECKING:
    from torch import Tensor, nn

    from conceptedit.api.backbone import BackboneAdapter
    from conceptedit.api.context import EditContext
    from conceptedit.api.edits import Guard, KVEdit, PromptEncoding

MethodKind = Literal["closed_form", "training", "inference_time"]


#: The parameters class of one method (``class Uce(EditMethod[UceParams])``).
P = TypeVar("P", bound=MethodParams)


class EditMethod(Generic[P]):
    """One edit technique. The engine makes one instance per recipe edit.

    Generic in its parameters: ``class Uce(EditMethod[UceParams])`` makes ``self.params`` a
    ``UceParams`` for the type checker (set ``Params = UceParams`` too: that is what recipes
    are validated against).

    Class attributes a subclass sets:
        name: What recipes write after ``method:`` (lower case, ``[a-z0-9_]``).
        summary: One line for ``conceptedit methods``.
        kind: ``closed_form``, ``training`` or ``inference_time`` (acts while sampling, through
            :meth:`inference_guard`; changes no weights).
        paper: Citation or URL of the method's paper, if any.
        backbones: Backbone families it supports (``sd1``, ``sd2``, ...); a recipe running it on
            another family is refused before anything runs (``validate`` for built-in models,
            ``apply`` once the model is loaded).
        unsupported_backbones: For families it does not support, the reason (shown when refused
            and by ``conceptedit methods``).
        Params: Its pydantic parameters (subclass of :class:`MethodParams`).
        Training: For training methods, its :class:`TrainingConfig` subclass with its defaults.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[MethodKind]
    paper: ClassVar[str | None] = None
    backbones: ClassVar[frozenset[str]] = frozenset({"sd1", "sd2"})
    unsupported_backbones: ClassVar[Mapping[str, str]] = {}
    Params: ClassVar[type[MethodParams]] = MethodParams
    Training: ClassVar[type[TrainingConfig]] = TrainingConfig

    def __init__(self, params: P) -> None:
        self.params: P = params

    @classmethod
    def backbone_problem(cls, family: str) -> str | None:
        """Why this method cannot run on a ``family`` model, or None when it supports it."""
        if family in cls.backbones:
            return None
        reason = cls.unsupported_backbones.get(family)
        message = f"method {cls.name!r} supports {', '.join(sorted(cls.backbones))}, but the model is {family}"
        return f"{message}: {reason}" if reason else message

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

    def added_modules(self, ctx: EditContext) -> AbstractContextManager[Mapping[str, nn.Module]]:
        """New modules this training method puts on the pipeline for the loop to train (adapters), by name.

        The engine enters the returned context before :meth:`trainable_parameters` and leaves it
        after the last step, also when training fails: attach the modules (forward hooks,
        attention processors) on entry and take them off on exit. Every parameter of the yielded
        modules trains, besides :meth:`trainable_parameters` (which may then be empty), and is
        checkpointed as ``added.<member>.<name>.<path>``. They are not base tensors: the weight
        ledger never records them, ``edit.safetensors`` never holds them, and
        ``ctx.reference_weights`` does not take them off (switch them off yourself for frozen
        passes). Make them the run's artifact with :meth:`trained_guard`. Not for runs of several
        processes (they train outside the data-parallel wrapper). The default adds nothing.
        """
        nothing: dict[str, nn.Module] = {}
        return nullcontext(nothing)

    def prepare_training(self, ctx: EditContext) -> None:
        """Build what the loss needs (cached trajectories, embeddings) before step 1."""

    def gradient_masks(self, ctx: EditContext) -> Mapping[str, Tensor]:
        """Which entries of the trained parameters may change: full name -> boolean mask of its shape.

        Called once, right after :meth:`prepare_training`; the default, no masks, trains every
        entry. For each parameter named here the engine zeroes the gradient where the mask is
        False (before clipping and the optimiser step) and, after every optimiser step, puts those
        entries back to their values at the start of the edit, so that no optimiser setting
        (weight decay, momentum) moves them: they stay bit for bit. A name must be one of
        :meth:`trainable_parameters`. In a training group, the masks several members give for one
        parameter combine with AND: an entry trains only where every mask allows it.
        """
        return {}

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

    def trained_guard(self, ctx: EditContext) -> Guard | None:
        """For a training method whose result is not base tensors: the guard that carries it, or None.

        Called once after the last training step, while the :meth:`added_modules` are still
        attached (their trained values, e.g. as ``Guard.tensors``). The engine saves it exactly
        like an :meth:`inference_guard` (``guards/NNN-<label>.safetensors``, listed in the
        manifest), and :meth:`install_guard` puts it on the pipeline once every weight edit of the
        run is done, and again in :func:`conceptedit.load`.
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
