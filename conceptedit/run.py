"""``apply``: a recipe from file to run folder, as a short story of named steps.

plan (validate, pick the folder) → load the base model → run the edits (the engine) →
install the guards they saved → evaluate (the evaluation wing) → write the edit file,
exporters' formats and manifest into a staging folder → publish it in one rename. A run that
fails leaves nothing that looks finished. This module is the only one that calls both the
engine and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState

from conceptedit.api.backbone import BackboneAdapter
from conceptedit.api.paths import path_text_problem, shown
from conceptedit.api.results import EditOutcome, RunResult, SuiteResult
from conceptedit.engine.context import RunContext
from conceptedit.engine.edits import check_backbones, run_edits
from conceptedit.engine.guards import GUARDS_DIR, install_guards, saved_guard_files, suspend_guards
from conceptedit.engine.ledger import WeightLedger
from conceptedit.engine.reload import load, read_manifest
from conceptedit.errors import ConceptEditError, RunDirError
from conceptedit.evaluation.base_cache import BaseRenderCache
from conceptedit.evaluation.evaluate import evaluate_into
from conceptedit.evaluation.loss_curves import read_run_logs
from conceptedit.export_run import export
from conceptedit.io.atomic import atomic_write_text, publish_dir
from conceptedit.io.edit_file import EDIT_FILE, edit_scope, save_edit
from conceptedit.io.manifest import MANIFEST_FILE, build_manifest, plugin_versions
from conceptedit.io.progress import Reporter
from conceptedit.models.backbone import resolve_backbone
from conceptedit.models.loading import LoadedModel, load_model, state_digest
from conceptedit.plugins import PluginHost, get_host
from conceptedit.recipe.loader import LoadedRecipe, load_recipe

RESOLVED_FILE = "recipe.resolved.yaml"


@dataclass
class Plan:
    """What ``apply`` will do, worked out before any model loads."""

    loaded: LoadedRecipe
    run_dir: Path
    device: torch.device


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
    """Apply a recipe (a file or a dict) and write its run folder; the module docstring lists the steps.

    ``pipeline`` is edited in place instead of loading the recipe's model; ``overrides``, ``model``
    and ``device`` are ``--set``, ``--model`` and ``--device``; ``out`` replaces ``output.dir``;
    ``dry_run`` loads and checks, then stops with nothing written (``run_dir`` None); ``resume``
    continues ``<out>.partial``; ``host`` defaults to the process-wide plugin host.
    """
    host = host or get_host()
    the_plan = plan(recipe, overrides=overrides, model=model, device=device, out=out, resume=resume, host=host)
    processes = _processes(the_plan)
    base, adapter = _load_base(the_plan, pipeline, host)
    if dry_run:
        return RunResult(None, base.pipeline, [], [], {"plan": str(the_plan.run_dir), "backbone": adapter.family})
    run = _start_run(the_plan, base, adapter, host, processes, resume=resume, quiet=quiet)
    started = _now()
    try:
        outcomes = run_edits(run, resume=resume)
        guards = _install_guards(run)
        evaluation = _evaluate(run, processes)
        manifest = _write_outputs(run, base, outcomes, started, guards) if processes.is_main_process else {}
        _publish(run, the_plan, processes, resume=resume)
    except BaseException:
        _discard(run.run_dir)
        raise
    result = RunResult(the_plan.run_dir, base.pipeline, outcomes, sorted(run.ledger.changed()), manifest, evaluation)
    host.pm.hook.conceptedit_after_run(ctx=run, result=result)
    return result


# --------------------------------------------------------------------------- plan


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


def _processes(the_plan: Plan) -> PartialState:
    """Under ``accelerate launch`` / torchrun every process runs the edits (training is data
    parallel, one GPU per process); only the main process writes the run folder."""
    state = PartialState(cpu=the_plan.device.type == "cpu")
    if state.num_processes > 1 and the_plan.device.type == "cuda":
        the_plan.device = state.device
    return state


# --------------------------------------------------------------------------- load


def _load_base(the_plan: Plan, pipeline: Any, host: PluginHost) -> tuple[LoadedModel, BackboneAdapter]:
    """The recipe's base model (or the pipeline the caller handed in, edited in place) and its
    backbone adapter, once every method of the recipe is known to support that backbone."""
    recipe = the_plan.loaded.recipe
    torch.manual_seed(recipe.seed)
    if pipeline is None:
        spec = recipe.model
        base = load_model(
            spec.id, revision=spec.revision, variant=spec.variant, dtype=recipe.dtype, device=the_plan.device
        )
    else:
        pipeline.to(device=the_plan.device)
        base = LoadedModel(pipeline, "in_memory", recipe.model.id, file_hashes={"state": state_digest(pipeline)})
    adapter = resolve_backbone(base.pipeline, host.registry.backbones)
    check_backbones(recipe, adapter)
    return base, adapter


def load_target(target: str, *, device: torch.device, dtype: str = "float32") -> tuple[Any, Any | None]:
    """``(pipeline, base_pipeline_or_None)`` for a model id/path/built-in or a run folder.

    For a run folder the base model named in its manifest is loaded, and the edit applied to
    a second copy, so before/after images come from one load of the files.
    """
    if not is_run_dir(target):
        return load_model(target, dtype=dtype, device=device).pipeline, None
    base = read_manifest(target)["base_model"]
    if base.get("kind") == "in_memory":
        raise RunDirError(f"{target} was made from an in-memory pipeline; load it with conceptedit.load in Python")
    edited = load_model(base["id"], revision=base.get("revision"), dtype=dtype, device=device).pipeline
    original = load_model(base["id"], revision=base.get("revision"), dtype=dtype, device=device).pipeline
    load(edited, target)
    return edited, original


def is_run_dir(target: str | Path) -> bool:
    """Whether ``target`` is a finished run folder (it has a manifest)."""
    return path_text_problem(str(target)) is None and (Path(target) / MANIFEST_FILE).is_file()


# --------------------------------------------------------------------------- run


def _start_run(
    the_plan: Plan,
    base: LoadedModel,
    adapter: BackboneAdapter,
    host: PluginHost,
    processes: PartialState,
    *,
    resume: bool,
    quiet: bool,
) -> RunContext:
    """The run's context, writing into a staging folder (``<run>.partial``) on the main process."""
    staging = the_plan.run_dir.with_name(the_plan.run_dir.name + ".partial")
    if processes.is_main_process:
        _prepare_staging(staging, the_plan.loaded, resume)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f"conceptedit-rank{processes.process_index}-"))  # scratch only
    return RunContext(
        loaded=the_plan.loaded,
        pipeline=base.pipeline,
        adapter=adapter,
        device=the_plan.device,
        ledger=WeightLedger(adapter),
        host=host,
        run_dir=staging,
        reporter=Reporter(quiet=quiet or not processes.is_main_process),
        base_fingerprint=hashlib.sha256(json.dumps(base.describe(), sort_keys=True).encode()).hexdigest(),
        process_index=processes.process_index if processes.num_processes > 1 else None,
    )


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


def _install_guards(run: RunContext) -> list[dict[str, str]]:
    """Guards go on only now, from the files just written: no edit trains through them, and the
    returned pipeline is exactly what :func:`conceptedit.load` rebuilds from the folder."""
    files = [f"{GUARDS_DIR}/{path.name}" for path in saved_guard_files(run.run_dir)]
    return install_guards(run.pipeline, run.run_dir, files, host=run.host, adapter=run.adapter)


def _evaluate(run: RunContext, processes: PartialState) -> list[SuiteResult]:
    """The recipe's ``evaluate:`` suites on the edited model and, same seeds, the base model;
    every process generates its share of the prompts, the main one writes the results."""
    if not run.recipe.evaluate:
        return []
    folder = run.run_dir if processes.is_main_process else None
    curves = read_run_logs(run.run_dir) if folder is not None else []
    return evaluate_into(
        folder,
        run.pipeline,
        run.recipe.evaluate,
        host=run.host,
        base_weights=lambda: _base_model(run),
        reporter=run.reporter,
        curves=curves,
        base_cache=BaseRenderCache(run.cache_dir / "evaluation", run.base_fingerprint),
    )


@contextmanager
def _base_model(run: RunContext) -> Iterator[None]:
    """The model as it was before the run: base weights swapped in, guards passing through."""
    with run.ledger.reference("base"), suspend_guards(run.pipeline):
        yield


# --------------------------------------------------------------------------- write and publish


def _write_outputs(
    run: RunContext, base: LoadedModel, outcomes: list[EditOutcome], started: str, guards: list[dict[str, str]]
) -> dict[str, Any]:
    """The edit file, the exporters' formats and (last) the manifest, into the staging folder."""
    loaded, recipe, staging = run.loaded, run.recipe, run.run_dir
    changed = run.ledger.changed()
    base_info = base.describe()
    save_edit(
        staging / EDIT_FILE,
        changed,
        recipe=_resolved(loaded),
        base_model=base_info,
        base_digests=run.ledger.base_digests(changed),
    )
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    manifest = build_manifest(
        plugins=plugin_versions(run.host.infos.values()),
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
    manifest["edit_scope"] = edit_scope(changed)  # what edit.safetensors may be loaded into
    atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _export_formats(the_plan: Plan, host: PluginHost) -> None:
    """The recipe's formats, each written from the published run folder as ``conceptedit export``
    writes it (``delta`` is the run folder itself)."""
    output = the_plan.loaded.recipe.output
    for fmt in output.formats:
        if fmt != "delta":
            export(the_plan.run_dir, fmt, options=output.export_options.get(fmt), overwrite=True, host=host)


def _publish(run: RunContext, the_plan: Plan, processes: PartialState, *, resume: bool) -> None:
    """The staging folder becomes the run folder in one rename, once every process is done; then
    the recipe's other formats are written from it, each published on its own."""
    processes.wait_for_everyone()
    if processes.is_main_process:
        publish_dir(run.run_dir, the_plan.run_dir, overwrite=run.recipe.output.overwrite or resume)
        _export_formats(the_plan, run.host)
    else:
        shutil.rmtree(run.run_dir, ignore_errors=True)


def _discard(staging: Path) -> None:
    """After a failure: drop the staging folder unless it holds training checkpoints to resume from."""
    if not any((staging / "checkpoints").glob("*/step-*")):
        shutil.rmtree(staging, ignore_errors=True)


def _resolved(loaded: LoadedRecipe) -> dict[str, Any]:
    return loaded.recipe.model_dump(mode="json")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
