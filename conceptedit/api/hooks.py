"""Every pluggy hook conceptedit calls, with its contract.

Two kinds of hooks live here:

* **Registration hooks** run once when plugins load. They receive a ``register`` callback
  (the pattern of simonw/llm), so the host, not pluggy, decides what a duplicate name means.
* **Lifecycle hooks** observe (or, as wrappers, time and guard) a run. They never decide
  the order of edits: pluggy calls implementations last-registered-first, while a recipe's
  edits run strictly in recipe order, driven by the engine.

The per-edit math (prompt encoding, attention edit, trajectory loss) is not a pluggy hook
but a method of :class:`conceptedit.EditMethod`, one object per recipe edit; see
``docs/hooks.md`` for how the two fit together. ``tests/test_hookspecs.py`` fails when a hook
here has no section in ``docs/hooks.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from conceptedit.api.backbone import BackboneAdapter
    from conceptedit.api.concepts import ConceptSource
    from conceptedit.api.context import EditContext, RunContext
    from conceptedit.api.evaluator import Evaluator
    from conceptedit.api.export import Exporter
    from conceptedit.api.method import EditMethod
    from conceptedit.api.recipe import EditBase, RecipeBase
    from conceptedit.api.results import EditOutcome, RunResult
    from conceptedit.api.suite import PromptSuite

PROJECT_NAME = "conceptedit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------- registration


@hookspec
def conceptedit_register_methods(register: Callable[[type[EditMethod[Any]]], None]) -> None:
    """Add edit methods.

    Call ``register(MethodClass)`` once per :class:`~conceptedit.EditMethod` subclass. The
    class's ``name`` is what recipes write after ``method:``. If two plugins register the same
    name, the one registered later wins and ``conceptedit plugins`` warns, naming both. A
    plugin whose hook raises (or registers something that is not a method class) is listed as
    failed and switched off as a whole; other plugins are unaffected.

    Args:
        register: Adds one method class to the registry.
    """


@hookspec
def conceptedit_register_backbones(register: Callable[[type[BackboneAdapter]], None]) -> None:
    """Add backbone adapters: classes that know where a pipeline keeps its parts.

    An adapter says whether it handles a pipeline (``matches``), and where its text
    encoder, tokenizer, UNet, cross-attention layers, scheduler and VAE are. Built-ins cover
    Stable Diffusion 1.x and 2.x; an SDXL adapter is registered the same way.

    Args:
        register: Adds one adapter class; adapters registered later are tried first.
    """


@hookspec
def conceptedit_register_exporters(register: Callable[[Exporter], None]) -> None:
    """Add output formats for a finished run (``conceptedit export --format``, ``output.formats``).

    An exporter writes an :class:`~conceptedit.api.export.ExportSource` (the base and edited
    values of the changed tensors, the edited pipeline, the recipe) into a staging folder;
    :func:`conceptedit.export` loads it back with the exporter's ``reload`` to check it, adds the
    model card, and publishes it. Built-ins: ``delta``, ``diffusers``, ``lora``, ``kohya``,
    ``single-file``, ``te-delta``.

    Args:
        register: Adds one :class:`~conceptedit.api.export.Exporter`.
    """


@hookspec
def conceptedit_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    """Add evaluators: scorers of generated images (concept detectors, judges, distances).

    Call ``register(EvaluatorClass)`` for each :class:`~conceptedit.api.evaluator.Evaluator`
    subclass; its ``name`` is how benchmarks and evaluation suites refer to it.

    Args:
        register: Adds one evaluator class to the registry.
    """


@hookspec
def conceptedit_register_suites(register: Callable[[type[PromptSuite]], None]) -> None:
    """Add prompt suites: what an evaluation generates, which evaluator scores it, its metrics.

    Call ``register(SuiteClass)`` for each :class:`~conceptedit.api.suite.PromptSuite` subclass;
    recipes' ``evaluate:`` entries and ``conceptedit eval --suite`` name it by ``name``.

    Args:
        register: Adds one suite class to the registry.
    """


@hookspec
def conceptedit_register_concept_sources(register: Callable[[type[ConceptSource[Any]]], None]) -> None:
    """Add concept sources: generators of a concept set's prompt pairs.

    Call ``register(SourceClass)`` for each :class:`~conceptedit.ConceptSource` subclass. A
    recipe's concept set names it with ``generate: {source: NAME, ...options}``; the loader
    validates the options against the class's ``Options`` and calls ``pairs()`` once, when the
    recipe loads. If two plugins register the same name, the one registered later wins. A
    plugin whose hook raises (or registers something that is not a concept source class) is
    listed as failed and switched off as a whole.

    Args:
        register: Adds one concept source class to the registry.
    """


@hookspec
def conceptedit_register_commands(app: typer.Typer) -> None:
    """Add subcommands to the ``conceptedit`` command line.

    Args:
        app: The root typer application; call ``app.command()`` on it.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def conceptedit_recipe_loaded(recipe: RecipeBase, source: str | None) -> None:
    """Called after a recipe validated, before any model is loaded.

    Raise :class:`~conceptedit.errors.RecipeError` to reject a recipe for a reason of your
    own (a lab policy, say); the CLI reports it like any validation error.

    Args:
        recipe: The validated recipe, defaults filled in and overrides applied.
        source: The recipe file, or ``None`` for a recipe given as data.
    """


@hookspec
def conceptedit_before_edit(ctx: RunContext, edit: EditBase, index: int) -> None:
    """Called before each edit of a recipe runs, in recipe order.

    Args:
        ctx: The run: pipeline, backbone adapter, seed, device, output folder.
        edit: The edit about to run (for a training group, called once per member).
        index: The edit's position in ``recipe.edits``.
    """


@hookspec
def conceptedit_after_edit(ctx: RunContext, edit: EditBase, index: int, outcome: EditOutcome) -> None:
    """Called after each edit ran and its weight changes are in the pipeline.

    Args:
        ctx: The run.
        edit: The edit that ran.
        index: Its position in ``recipe.edits``.
        outcome: What it changed (parameter names), how long it took, its peak memory.
    """


@hookspec
def conceptedit_on_train_step(ctx: EditContext, step: int, losses: dict[str, float], lr: float) -> None:
    """Called after every optimiser step of the engine's training loop.

    Use it for logging, live plots or early-stop checks (raise
    :class:`~conceptedit.errors.TrainingError` to stop). Only the main process calls it when
    training runs on several processes.

    Args:
        ctx: The edit being trained (``ctx.edit`` is its spec).
        step: The 1-based optimiser step just taken.
        losses: Every loss term of this step, already reduced to Python floats, plus ``total``.
        lr: The learning rate used for the step.
    """


@hookspec
def conceptedit_after_run(ctx: RunContext, result: RunResult) -> None:
    """Called once the run folder is complete and in place.

    Args:
        ctx: The run.
        result: What the run produced: run folder, changed parameters, timings.
    """
