"""``load``: put a saved edit into a freshly loaded base pipeline (weights, then guards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from conceptedit.api.paths import path_text_problem, shown
from conceptedit.engine.guards import install_guards
from conceptedit.engine.ledger import tensor_digest
from conceptedit.errors import RunDirError
from conceptedit.io.edit_file import EDIT_FILE, read_edit
from conceptedit.io.manifest import MANIFEST_FILE
from conceptedit.models.backbone import resolve_backbone
from conceptedit.plugins import PluginHost, get_host


def load(pipeline: Any, run_dir: str | Path, *, check_base: bool = True, host: PluginHost | None = None) -> Any:
    """Apply the edit saved in ``run_dir`` to ``pipeline`` (in place) and return the pipeline.

    Args:
        pipeline: The base model the run started from, freshly loaded (for a text-encoder delta,
            any pipeline with that base's text encoder).
        run_dir: A finished run folder (it has ``manifest.json`` and ``edit.safetensors``).
        check_base: Refuse when a tensor the edit replaces differs from the base it was made
            from -- the sign of loading into the wrong model or loading twice.
        host: Plugin host (for backbone adapters, and the methods that install guards).

    Only the tensors the edit replaces are checked, so a text-encoder delta (``scope:
    text_encoder`` in the edit file's metadata, e.g. an AdvUnlearn run) loads into any pipeline
    whose text encoder is the base's, a fine-tuned UNet of the same base included; an edit that
    also changes the UNet still needs the base's UNet tensors where it replaces them.

    Inference-time edits (``guards`` in the manifest) are installed after the weights, in
    recipe order, by the methods that saved them, so the plugin that made the run must be
    installed here too.
    """
    problem = path_text_problem(str(run_dir))
    if problem is not None:
        raise RunDirError(f"run folder {shown(str(run_dir))}: the path {problem}")
    folder = Path(run_dir)
    if not (folder / MANIFEST_FILE).is_file():
        hint = (
            " (it is an unfinished run: resume it with `conceptedit apply --resume`)"
            if folder.name.endswith(".partial")
            else ""
        )
        raise RunDirError(f"{folder} is not a finished conceptedit run folder: no {MANIFEST_FILE}{hint}")
    tensors, meta = read_edit(folder / EDIT_FILE)
    host = host or get_host()
    adapter = resolve_backbone(pipeline, host.registry.backbones)
    params = _target_parameters(folder, adapter, tensors, meta, check_base)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    load_guards(pipeline, folder, host=host)
    return pipeline


def load_guards(pipeline: Any, folder: str | Path, *, host: PluginHost | None = None) -> Any:
    """Install the inference-time guards a run folder (or an export of it) lists in its manifest,
    in recipe order, and return the pipeline: what no weight file can hold (SLD, AdaVD, Receler's
    erasers) put back into a pipeline loaded from an exported format."""
    folder = Path(folder)
    host = host or get_host()
    guards = read_manifest(folder).get("guards", [])
    install_guards(
        pipeline,
        folder,
        [g["file"] for g in guards],
        host=host,
        adapter=resolve_backbone(pipeline, host.registry.backbones),
        digests=[g.get("digest") for g in guards],
    )
    return pipeline


def _target_parameters(
    folder: Path, adapter: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], check_base: bool
) -> dict[str, Any]:
    """The pipeline's parameter for each tensor of the edit, after checking name, shape and base."""
    base_model = meta.get("base_model", {}).get("id", "?")
    digests = meta.get("base_digests", {})
    params = {}
    for name, value in tensors.items():
        try:
            param = adapter.get_parameter(name)
        except Exception as exc:
            raise RunDirError(
                f"{folder}: the edit changes {name}, which this pipeline lacks; the edit was made for {base_model}"
            ) from exc
        if param.shape != value.shape:
            raise RunDirError(
                f"{folder}: {name} has shape {tuple(value.shape)} in the edit but "
                f"{tuple(param.shape)} in the pipeline; the edit was made for {base_model}"
            )
        if (
            check_base
            and param.dtype == value.dtype
            and name in digests
            and tensor_digest(param.detach()) != digests[name]
        ):
            raise RunDirError(
                f"{folder}: the pipeline's {name} is not the base this edit was made from ({base_model}). "
                f"Edit scope {meta.get('scope')}: {meta.get('portable')}. Load a matching model fresh, "
                "or pass check_base=False to apply it anyway"
            )
        params[name] = param
    return params


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished run folder."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a finished conceptedit run folder: no {MANIFEST_FILE}")
    return json.loads(path.read_text(encoding="utf-8"))
