"""``export``: write a finished run in another format, checked by loading it back, published atomically.

    read the run     manifest, edit file, the base model it names (or ``base``)
    build a source   base values of the changed tensors, then the edit and its guards applied
    write            the format into ``<out>.partial``: the exporter's files, ``recipe.yaml``,
                     ``manifest.json``, then (after the check) ``export.json`` and the model card
    check            the format loaded back the way its users load it; its weights and images
                     against the edit's (no reloader: said so in the report)
    publish          one rename to ``<out>``

A recipe's ``output.formats`` and ``conceptedit export`` both end here, so a format behaves the
same whichever way it is asked for.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from conceptedit.api.export import Exporter, ExportOptions, ExportReport, ExportSource
from conceptedit.engine.reload import load, load_guards, read_manifest
from conceptedit.errors import ExportError, ModelLoadError, did_you_mean
from conceptedit.evaluation.sampling import Sampling, generate
from conceptedit.io.atomic import atomic_write_text, publish_dir
from conceptedit.io.edit_file import EDIT_FILE, read_edit
from conceptedit.io.manifest import MANIFEST_FILE
from conceptedit.io.model_card import model_card, named_concepts
from conceptedit.models.backbone import resolve_backbone
from conceptedit.models.loading import load_model
from conceptedit.plugins import PluginHost, get_host

#: What a check generates: few steps, fixed seeds; the images are compared, not judged.
CHECK_SAMPLING = Sampling(steps=10, guidance=5.0)
CHECK_SEEDS = (0, 1)
EXPORTS_DIR = "exports"


@dataclass
class ExportResult:
    """A published export.

    Attributes:
        folder: The export folder.
        format: The format's name.
        report: What the exporter wrote and could not carry.
        check: The round trip: weight and image differences between the loaded-back export and the edit.
    """

    folder: Path
    format: str
    report: ExportReport
    check: dict[str, Any] = field(default_factory=dict)


def export(
    run_dir: str | Path,
    fmt: str,
    *,
    options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    base: str | None = None,
    check_prompts: Sequence[str] | None = None,
    overwrite: bool = False,
    host: PluginHost | None = None,
) -> ExportResult:
    """Write the run in ``run_dir`` in format ``fmt`` to ``out`` (default ``<run>/exports/<fmt>``).

    Args:
        run_dir: A finished run folder.
        fmt: An exporter's name (``conceptedit export --list`` names them).
        options: The format's options, e.g. ``{"rank": 16}`` or ``{"max_error": 1e-3}``.
        out: The export folder; it must not exist unless ``overwrite``.
        base: The base model, when the one the manifest names cannot be found (moved folder...).
        check_prompts: Prompts of the image check (default: the edits' concepts, and an empty prompt).
        overwrite: Replace an existing export folder.
        host: Plugin host (exporters, backbones, the methods that installed guards).

    Raises:
        ExportError: unknown format or option, base model not loadable, a run the format cannot hold.
        RunDirError: ``run_dir`` is not a finished run folder.
    """
    host = host or get_host()
    folder = Path(run_dir)
    exporter = _exporter(host, fmt)
    target = Path(out) if out is not None else folder / EXPORTS_DIR / fmt
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite (overwrite=True) or another --out")
    source = read_source(folder, exporter, options or {}, base, host)
    reason = exporter.unavailable_reason(source)
    if reason:
        raise ExportError(f"{folder}: cannot export as {fmt}: {reason}")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        report = exporter.export(source, staging)
        _write_run_record(source, staging)
        carry_guards(source, staging, report)
        check = check_export(exporter, source, staging, check_prompts or default_check_prompts(source), host)
        _write_summary(source, exporter, report, check, staging)
        publish_dir(staging, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(target, fmt, report, check)


def export_formats(
    run_dir: str | Path, *, base: str | None = None, host: PluginHost | None = None
) -> dict[str, str | None]:
    """Every installed format and, for this run, None (available) or why it is not."""
    host = host or get_host()
    exporters = host.registry.exporters
    source = read_source(Path(run_dir), None, {}, base, host)
    return {name: e.unavailable_reason(source) for name, e in sorted(exporters.items())}


def _exporter(host: PluginHost, fmt: str) -> Exporter:
    exporters = host.registry.exporters
    if fmt not in exporters:
        raise ExportError(f"unknown export format {fmt!r}; {did_you_mean(fmt, list(exporters), label='formats')}")
    return exporters[fmt]


# --------------------------------------------------------------------------- read the run


def read_source(
    folder: Path, exporter: Exporter | None, options: Mapping[str, Any], base: str | None, host: PluginHost
) -> ExportSource:
    """The run as an exporter reads it: base values of the changed tensors, the edited pipeline."""
    manifest = read_manifest(folder)
    edited, meta = read_edit(folder / EDIT_FILE)
    base_model = dict(manifest.get("base_model") or meta.get("base_model") or {})
    model_id = base or base_model.get("id")
    if not model_id:
        raise ExportError(f"{folder}: the run does not name its base model; pass --base MODEL (a folder or hub id)")
    validated = _options(exporter, options)

    def load_base() -> Any:
        try:
            return load_model(model_id, dtype=manifest.get("dtype") or "float32").pipeline
        except ModelLoadError as exc:
            raise ExportError(
                f"{folder}: the run's base model {model_id!r} cannot be loaded ({exc}); pass --base with the "
                "same model's folder or file"
            ) from exc

    pipeline = load_base()
    adapter = resolve_backbone(pipeline, host.registry.backbones)
    base_values = {name: adapter.get_parameter(name).detach().clone() for name in edited}
    load(pipeline, folder, host=host)
    return ExportSource(
        run_dir=folder,
        manifest=manifest,
        recipe=json.loads(meta["recipe"]) if isinstance(meta.get("recipe"), str) else dict(meta.get("recipe") or {}),
        base_model={**base_model, "id": model_id},
        edited=edited,
        base=base_values,
        pipeline=pipeline,
        guards=list(manifest.get("guards", [])),
        load_base=load_base,
        options=validated,
    )


def _options(exporter: Exporter | None, options: Mapping[str, Any]) -> ExportOptions:
    if exporter is None:
        return ExportOptions()
    try:
        return exporter.Options.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors())
        known = ", ".join(exporter.Options.model_fields) or "none"
        raise ExportError(f"format {exporter.name}: {problems} (its options: {known})") from exc


# --------------------------------------------------------------------------- check


def default_check_prompts(source: ExportSource) -> list[str]:
    """Up to three of the edits' concept prompts (a concept set's first pair, or the word itself),
    then an empty prompt: where an export that lost the edit shows it."""
    sets = source.recipe.get("concepts") or {}
    prompts = []
    for name in named_concepts(source.recipe):
        pairs = sets[name].get("pairs") if isinstance(sets.get(name), dict) else None
        prompts.append(pairs[0][0] if pairs else name)
    return [*list(dict.fromkeys(prompts))[:3], ""]


def check_export(
    exporter: Exporter, source: ExportSource, staging: Path, prompts: Sequence[str], host: PluginHost
) -> dict[str, Any]:
    """Load the export back the way its users will; its changed weights and its images against the edit's."""
    if exporter.reload is None:
        return {"checked": False, "why": f"the {exporter.name} format has no loader to check it with"}
    reloaded = load_guards(exporter.reload(source.load_base(), staging), staging, host=host)
    reloaded.set_progress_bar_config(disable=True)  # a plain diffusers load shows a bar per image otherwise
    adapter = resolve_backbone(reloaded, host.registry.backbones)
    errors = {}
    for name, value in source.edited.items():
        loaded = adapter.get_parameter(name).detach().float()
        errors[name] = float((loaded - value.float()).norm() / value.float().norm().clamp_min(1e-12))
    pixels = []
    for prompt in prompts:
        for seed in CHECK_SEEDS:
            (want,) = generate(source.pipeline, prompt, seed, CHECK_SAMPLING, host=host)
            (image,) = generate(reloaded, prompt, seed, CHECK_SAMPLING, host=host)
            diff = np.abs(np.asarray(want, dtype=np.float64) - np.asarray(image, dtype=np.float64))
            pixels.append((float(diff.mean()), float(diff.max())))
    return {
        "checked": True,
        "weights_max_relative_error": max(errors.values(), default=0.0),
        "weights_worst_tensor": max(errors, key=lambda name: errors[name], default=None),
        "weights_relative_error": errors,
        "images": len(pixels),
        "prompts": list(prompts),
        "seeds": list(CHECK_SEEDS),
        "sampling": {"steps": CHECK_SAMPLING.steps, "guidance": CHECK_SAMPLING.guidance},
        "pixel_mean_abs_diff": sum(m for m, _ in pixels) / len(pixels) if pixels else 0.0,
        "pixel_max_abs_diff": max((x for _, x in pixels), default=0.0),
    }


# --------------------------------------------------------------------------- write


def _write_run_record(source: ExportSource, staging: Path) -> None:
    """The run's resolved recipe and manifest, so the export says what it was made from."""
    atomic_write_text(staging / "recipe.yaml", yaml.safe_dump(source.recipe, sort_keys=False, allow_unicode=True))
    atomic_write_text(staging / MANIFEST_FILE, (source.run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))


#: How an export's guards go back onto a pipeline loaded from its weights.
GUARD_SNIPPET = """\
import conceptedit

# pipe: the pipeline loaded from this export's weights (see above)
conceptedit.load_guards(pipe, "{folder}")  # installs {methods}, in recipe order
"""


def carry_guards(source: ExportSource, staging: Path, report: ExportReport) -> None:
    """Inference-time guards are code at sampling time, not weights: copy their files and the
    manifest that lists them, and say so, with the call that installs them again."""
    if not source.guards:
        return
    methods = [str(g.get("method", "?")) for g in source.guards]
    for guard in source.guards:
        target = staging / guard["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.run_dir / guard["file"], target)
        report.files.append(str(guard["file"]))
    report.hook_only += methods
    snippet = GUARD_SNIPPET.format(folder="path/to/this/export", methods=", ".join(methods))
    report.details["guards_usage"] = snippet
    report.notes.append(
        f"{', '.join(methods)} act at sampling time and cannot be merged into weights: the weights here are the "
        "edit without them. Their files are in guards/; conceptedit.load_guards(pipe, folder) installs them."
    )


def _write_summary(
    source: ExportSource, exporter: Exporter, report: ExportReport, check: dict[str, Any], staging: Path
) -> None:
    """``export.json`` (files, notes, measured figures, the check) and the model card."""
    record = {
        "format": exporter.name,
        "run": str(source.run_dir),
        "options": source.options.model_dump(),
        "files": report.files,
        "notes": report.notes,
        "hook_only": report.hook_only,
        "details": report.details,
        "check": check,
        "torch": torch.__version__,
    }
    atomic_write_text(staging / "export.json", json.dumps(record, indent=2, default=str) + "\n")
    metrics_path = source.run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    atomic_write_text(staging / "README.md", model_card(source, exporter, report, check, metrics))


def push_to_hub(folder: str | Path, repo: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an export folder to the Hugging Face Hub repository ``repo`` (created if missing);
    returns the commit's URL. The upload is ``huggingface_hub``'s own; this only names what to send."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "export.json").is_file():
        raise ExportError(f"{folder} is not a conceptedit export folder (no export.json); export the run first")
    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=f"conceptedit export {folder.name}"
        )
    except Exception as exc:  # the Hub's errors (auth, network, name) reach the user as one message
        raise ExportError(f"uploading {folder} to {repo} failed: {exc}") from exc
    return str(getattr(commit, "commit_url", commit))
