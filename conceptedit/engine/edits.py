"""Running a recipe's edits in order: the engine's whole job, from validated recipe to outcomes.

Each recipe entry (an edit, or a training group) runs its hook points in this order:
attention edits (solved and written one by one), the inference guard (saved to ``guards/``,
installed later by :mod:`conceptedit.run`), then training, all members of a group together.
After each entry the weights it changed are checkpointed, so an interrupted run resumes at
the first unfinished entry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conceptedit.api.backbone import BackboneAdapter
from conceptedit.api.edits import KVEdit
from conceptedit.api.recipe import GroupBase, RecipeBase
from conceptedit.api.results import EditOutcome
from conceptedit.engine.context import EditContext, RunContext, derive_seed
from conceptedit.engine.guards import GUARDS_DIR, guard_file_name, write_guard
from conceptedit.engine.kv_solver import KVSolver
from conceptedit.engine.memory import PeakMemory, release_freed_memory
from conceptedit.engine.training import Member, train
from conceptedit.errors import BackboneError, EditError


def run_edits(run: RunContext, *, resume: bool = False) -> list[EditOutcome]:
    """Every entry of the run's recipe, in recipe order; the run's ledger holds what changed."""
    return [_run_item(run, index, item, resume) for index, item in enumerate(run.recipe.edits)]


def check_backbones(recipe: RecipeBase, adapter: BackboneAdapter) -> None:
    """Refuse, before any edit runs, a method that does not support the pipeline's backbone."""
    for index, spec in recipe.flat_edits():
        problem = spec.method_cls.backbone_problem(adapter.family)
        if problem is not None:
            raise BackboneError(f"edits.{index}: {problem}")


def _run_item(run: RunContext, index: int, item: Any, resume: bool) -> EditOutcome:
    """One recipe entry (an edit, or a training group of edits): hooks, work or resumed result, outcome."""
    members = item.edits if isinstance(item, GroupBase) else [item]
    done = run.run_dir / "checkpoints" / f"after-edit-{index:03d}.safetensors"
    for spec in members:
        run.host.pm.hook.conceptedit_before_edit(ctx=run, edit=spec, index=index)
    run.ledger.begin_edit()
    release_freed_memory()
    started = time.perf_counter()
    with PeakMemory() as memory:
        if resume and done.is_file():
            for name, value in load_file(str(done)).items():
                run.ledger.set(name, value.to(run.device))
            details: dict[str, Any] = {"resumed": "completed before the interruption"}
            names = sorted(load_file(str(done)))
        else:
            names, details = _execute(run, index, item, members, resume)
    seconds = time.perf_counter() - started
    done.parent.mkdir(parents=True, exist_ok=True)
    save_file(run.ledger.changed(), str(done))
    outcome = EditOutcome(
        item.label,
        "group" if isinstance(item, GroupBase) else item.method,
        names,
        seconds,
        memory.peak_rss_bytes,
        memory.peak_cuda_bytes,
        details,
    )
    for spec in members:
        run.host.pm.hook.conceptedit_after_edit(ctx=run, edit=spec, index=index, outcome=outcome)
    return outcome


def _execute(
    run: RunContext, index: int, item: Any, members: list[Any], resume: bool
) -> tuple[list[str], dict[str, Any]]:
    """Run each member's hook points in order: attention edits, guard, then training (together)."""
    contexts = []
    changed: list[str] = []
    guard_files: list[str] = []
    for k, spec in enumerate(members):
        method = spec.build()
        parts = (index, k) if run.process_index is None else (index, k, "process", run.process_index)
        generator = torch.Generator().manual_seed(derive_seed(run.seed, *parts))
        config = None
        if method.kind == "training":
            config = item.training if isinstance(item, GroupBase) else spec.training
        ctx = EditContext(run=run, edit=spec, index=index, method=method, generator=generator, training_config=config)
        for kv_edit in method.attention_edits(ctx):
            changed += apply_kv_edit(ctx, kv_edit)
        guard = method.inference_guard(ctx)
        if guard is not None:
            name = guard_file_name(index, spec.label)
            write_guard(run.run_dir / GUARDS_DIR / name, method=method.name, label=spec.label, guard=guard)
            guard_files.append(f"{GUARDS_DIR}/{name}")
        contexts.append(ctx)
    details: dict[str, Any] = {"guards": guard_files} if guard_files else {}
    trainers = [ctx for ctx in contexts if ctx.method.kind == "training"]
    if trainers:
        config = trainers[0].training
        report = train(
            [Member(ctx, ctx.method, float(ctx.edit.weight)) for ctx in trainers],
            config,
            run,
            item.label,
            resume=resume,
        )
        changed += report.trained
        details |= {
            "steps": report.steps,
            "resumed_from_step": report.resumed_from,
            "last_losses": report.last_losses,
            "log": str(report.log.relative_to(run.run_dir)),
        }
    return sorted(set(changed)), details


def apply_kv_edit(ctx: EditContext, edit: KVEdit) -> list[str]:
    """Solve ``edit`` for each selected linear map and write the new weights; returns their names."""
    jobs = text_maps(ctx.adapter, edit.projections, edit.stream, edit.layers, label=edit.label)
    dim = ctx.adapter.text_dim if edit.stream == "rows" else jobs[0][1].in_features
    solver = KVSolver(edit, dim)
    with ctx.progress.task(f"{ctx.label}: solve {edit.label}", len(jobs)) as bar:
        for name, linear in jobs:
            ctx.run.ledger.set(name, solver.solve(name, linear.weight))
            bar.advance()
    return [name for name, _ in jobs]


def text_maps(
    adapter: BackboneAdapter,
    projections: Sequence[str],
    stream: Literal["rows", "pooled"] = "rows",
    layers: Sequence[str] | None = None,
    *,
    label: str = "edit",
) -> list[tuple[str, nn.Linear]]:
    """The linear maps a K/V edit of ``projections`` solves on, by their weight's full name.

    ``rows``: the maps of every cross-attention layer (``layers`` picks some by name); ``pooled``:
    the adapter's maps of the pooled vector. A map carrying several of the projections (FLUX's
    ``context_embedder`` feeds keys and values alike) is listed once.
    """
    found = adapter.cross_attention_layers() if stream == "rows" else adapter.pooled_layers()
    if not found:
        raise EditError(f"{label}: this backbone ({adapter.family}) has no linear maps of the pooled vector")
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {layer.name for layer in found}
        if unknown:
            raise EditError(f"{label}: no cross-attention layer named {sorted(unknown)[0]!r}")
        found = [layer for layer in found if layer.name in wanted]
    return [job for layer in found for job in layer.linear_maps(projections)]
