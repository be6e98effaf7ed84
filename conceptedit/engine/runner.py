"""``apply``: run a recipe's edits in order and write the run folder.

Order of work: validate the recipe (loading the plugins it names), pick the output folder,
load the base model, check every method supports its backbone, then for each edit in recipe
order call its hook points -- attention edits first, then training, then the inference guard
(saved to ``guards/``) -- install the saved guards on the pipeline once every weight edit is
done, and finally write ``edit.safetensors``, the exporters' formats and ``manifest.json`` into
a staging folder that becomes the run folder in one rename. A run that fails leaves nothing
that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from safetensors.torch import load_file, save_file

from conceptedit.engine.attention import apply_kv_edit
from conceptedit.engine.context import EditContext, RunContext, derive_seed
from conceptedit.engine.guards import (
    GUARDS_DIR,
    guard_file_name,
    install_guards,
    saved_guard_files,
    suspend_guards,
    write_guard,
)
from conceptedit.engine.ledger import WeightLedger
from conceptedit.engine.memory import PeakMemory, release_freed_memory
from conceptedit.engine.progress import Reporter
from conceptedit.engine.training import Member, train
from conceptedit.errors import BackboneError, ConceptEditError, RunDirError
from conceptedit.evaluation import evaluate, write_metrics
from conceptedit.io.atomic import atomic_write_text, publish_dir
from conceptedit.io.edit_file import EDIT_FILE, save_edit
from conceptedit.io.manifest import MANIFEST_FILE, build_manifest
from conceptedit.io.paths import path_text_problem, shown
from conceptedit.loss_curves import read_run_logs
from conceptedit.models.backbone import BackboneAdapter, resolve_backbone
from conceptedit.models.loading import LoadedModel, load_model, state_digest
from conceptedit.plugins import PluginHost, get_host
from conceptedit.recipe.loader import LoadedRecipe, load_recipe
from conceptedit.recipe.schema import GroupBase
from conceptedit.report import write_report
from conceptedit.results import EditOutcome, RunResult

RESOLVED_FILE = "recipe.resolved.yaml"


@dataclass
class Plan:
    """What ``apply`` will do, worked out before any edit runs."""

    loaded: LoadedRecipe
    run_dir: Path
    device: torch.device


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if present, else MPS if present, else CPU; other names as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConceptEditError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def plan(
    recipe: str | Path | dict[str, Any],
    *,
    overrides: list[str] | None = None,
    model: str | None = None,
    device: str | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    host: PluginHost | None = None,
) -> Plan:
    """Validate a recipe with CLI-style overrides and decide the run folder; loads no model."""
    host = host or get_host()
    extra = list(overrides or [])
    if model is not None:
        extra.append(f"model.id={json.dumps(model)}")
    if device is not None:
        extra.append(f"device={device}")
    loaded = load_recipe(recipe, overrides=extra, host=host)
    output = loaded.recipe.output
    if out is not None:
        problem = path_text_problem(str(out))
        if problem is not None:
            raise RunDirError(f"--out {shown(str(out))}: the path {problem}; give a folder path that can exist")
        run_dir = Path(out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        # Relative to where the command runs, like every output path of a CLI.
        run_dir = Path(output.dir.replace("{recipe}", loaded.stem).replace("{time}", stamp))
    if run_dir.exists() and not output.overwrite and not resume:
        raise RunDirError(f"run folder {run_dir} already exists; pass --out NEW_DIR or set output.overwrite: true")
    return Plan(loaded, run_dir, resolve_device(loaded.recipe.device))


def apply(
    recipe: str | Path | dict[str, Any],
    pipeline: Any = None,
    *,
    overrides: list[str] | None = None,
    model: str | None = None,
    device: str | None = None,
    out: str | Path | None = None,
    dry_run: bool = False,
    resume: bool = False,
    quiet: bool = False,
    host: PluginHost | None = None,
) -> RunResult:
    """Apply a recipe and write its run folder.

    Args:
        recipe: A recipe file, or the recipe as a dict.
        pipeline: Edit this pipeline (in place) instead of loading ``recipe.model``.
        overrides: ``path=value`` overrides, as ``--set`` takes them.
        model: Replace ``model.id``.
        device: Replace ``device``.
        out: Run folder (default: the recipe's ``output.dir``).
        dry_run: Validate, load the model and check backbones, then stop: nothing is written.
        resume: Continue an interrupted run whose staging folder (``<out>.partial``) exists.
        quiet: No progress bars.
        host: Plugin host (default: the process-wide one).

    Returns:
        The :class:`~conceptedit.RunResult`; ``run_dir`` is None for a dry run.
    """
    host = host or get_host()
    the_plan = plan(recipe, overrides=overrides, model=model, device=device, out=out, resume=resume, host=host)
    loaded, recipe_model = the_plan.loaded, the_plan.loaded.recipe
    # Under `accelerate launch` / torchrun every process runs the edits (training is data
    # parallel, one GPU per process); only the main process writes the run folder.
    state = PartialState(cpu=the_plan.device.type == "cpu")
    if state.num_processes > 1 and the_plan.device.type == "cuda":
        the_plan.device = state.device
    torch.manual_seed(recipe_model.seed)
    if pipeline is None:
        base = load_model(
            recipe_model.model.id,
            revision=recipe_model.model.revision,
            variant=recipe_model.model.variant,
            dtype=recipe_model.dtype,
            device=the_plan.device,
        )
    else:
        pipeline.to(device=the_plan.device)
        base = LoadedModel(pipeline, "in_memory", recipe_model.model.id, file_hashes={"state": state_digest(pipeline)})
    adapter = resolve_backbone(base.pipeline, host.registry.backbones)
    _check_backbones(loaded, adapter)
    if dry_run:
        return RunResult(None, base.pipeline, [], [], {"plan": str(the_plan.run_dir), "backbone": adapter.family})

    staging = the_plan.run_dir.with_name(the_plan.run_dir.name + ".partial")
    if state.is_main_process:
        _prepare_staging(staging, loaded, resume)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f"conceptedit-rank{state.process_index}-"))  # scratch only
    run = RunContext(
        loaded=loaded,
        pipeline=base.pipeline,
        adapter=adapter,
        device=the_plan.device,
        ledger=WeightLedger(adapter),
        host=host,
        run_dir=staging,
        reporter=Reporter(quiet=quiet or not state.is_main_process),
        base_fingerprint=hashlib.sha256(json.dumps(base.describe(), sort_keys=True).encode()).hexdigest(),
        process_index=state.process_index if state.num_processes > 1 else None,
    )
    started = _now()
    try:
        outcomes = [_run_item(run, index, item, resume) for index, item in enumerate(recipe_model.edits)]
        changed = run.ledger.changed()
        # Guards go on only now, from the files just written: no later edit trains through them,
        # and the returned pipeline is exactly what conceptedit.load rebuilds from the folder.
        guards = install_guards(
            run.pipeline,
            staging,
            [f"{GUARDS_DIR}/{path.name}" for path in saved_guard_files(staging)],
            host=host,
            adapter=adapter,
        )
        evaluation = []
        if recipe_model.evaluate:  # every process generates its share of the prompts; the main one writes
            evaluation = evaluate(
                run.pipeline,
                recipe_model.evaluate,
                host=host,
                base_weights=lambda: _base_model(run),
                reporter=run.reporter,
            )
            if state.is_main_process:
                write_metrics(staging / "metrics.json", evaluation)
                write_report(staging, evaluation, curves=read_run_logs(staging))
        manifest = _write_run(run, base, outcomes, changed, started, guards) if state.is_main_process else {}
        state.wait_for_everyone()
        if state.is_main_process:
            publish_dir(staging, the_plan.run_dir, overwrite=recipe_model.output.overwrite or resume)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if not any((staging / "checkpoints").glob("*/step-*")):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    result = RunResult(the_plan.run_dir, base.pipeline, outcomes, sorted(changed), manifest, evaluation)
    host.pm.hook.conceptedit_after_run(ctx=run, result=result)
    return result


@contextmanager
def _base_model(run: RunContext) -> Iterator[None]:
    """The model as it was before the run: base weights swapped in, guards passing through."""
    with run.ledger.reference("base"), suspend_guards(run.pipeline):
        yield


def _write_run(
    run: RunContext,
    base: LoadedModel,
    outcomes: list[EditOutcome],
    changed: dict[str, torch.Tensor],
    started: str,
    guards: list[dict[str, str]],
) -> dict[str, Any]:
    """Write the edit file, the exporters' formats and (last) the manifest into the staging folder."""
    loaded, recipe = run.loaded, run.loaded.recipe
    staging = run.run_dir
    base_info = base.describe()
    save_edit(
        staging / EDIT_FILE,
        changed,
        recipe=_resolved(loaded),
        base_model=base_info,
        base_digests=run.ledger.base_digests(changed),
    )
    exporters = run.host.registry.exporters
    for fmt in recipe.output.formats:
        exporters[fmt].export(base.pipeline, staging)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    manifest = build_manifest(
        host=run.host,
        base_model=base_info,
        seed=recipe.seed,
        device=run.device,
        dtype=recipe.dtype,
        edits=[o.as_dict() for o in outcomes],
        changed={name: list(t.shape) for name, t in changed.items()},
        recipe_source=str(loaded.source) if loaded.source else None,
        started=started,
        finished=_now(),
    )
    manifest["guards"] = guards  # installed by conceptedit.load, in this order
    atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _check_backbones(loaded: LoadedRecipe, adapter: BackboneAdapter) -> None:
    for index, spec in loaded.recipe.flat_edits():
        cls = spec.method_cls
        if adapter.family not in cls.backbones:
            raise BackboneError(
                f"edits.{index}: method {cls.name!r} supports {', '.join(sorted(cls.backbones))}, "
                f"but the model is {adapter.family}"
            )


def _resolved(loaded: LoadedRecipe) -> dict[str, Any]:
    return loaded.recipe.model_dump(mode="json")


def _prepare_staging(staging: Path, loaded: LoadedRecipe, resume: bool) -> None:
    resolved = yaml.safe_dump(_resolved(loaded), sort_keys=False)
    if resume:
        previous = staging / RESOLVED_FILE
        if not previous.is_file():
            raise RunDirError(f"nothing to resume: {staging} does not exist or holds no {RESOLVED_FILE}")
        if previous.read_text(encoding="utf-8") != resolved:
            raise RunDirError(f"cannot resume {staging}: it was started from a different recipe or overrides")
        return
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    text = loaded.text if loaded.text is not None else yaml.safe_dump(_resolved(loaded), sort_keys=False)
    atomic_write_text(staging / "recipe.yaml", text)
    atomic_write_text(staging / RESOLVED_FILE, resolved)


def _run_item(run: RunContext, index: int, item: Any, resume: bool) -> EditOutcome:
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
    contexts = []
    changed: list[str] = []
    guard_files: list[str] = []
    for k, spec in enumerate(members):
        method = spec.build()
        parts = (index, k) if run.process_index is None else (index, k, "process", run.process_index)
        generator = torch.Generator().manual_seed(derive_seed(run.seed, *parts))
        ctx = EditContext(run=run, edit=spec, index=index, method=method, generator=generator)
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
        config = item.training if isinstance(item, GroupBase) else trainers[0].edit.training
        for ctx in trainers:
            ctx.training = config
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
