"""The core output formats, registered as a core plugin through the public hook.

Each writes a finished run (an :class:`~conceptedit.api.export.ExportSource`) into a staging
folder that :func:`conceptedit.export` checks and publishes; the formats with a loader are
loaded back and compared with the edit before they are published.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from conceptedit.api.export import Exporter, ExportReport, ExportSource
from conceptedit.api.hooks import hookimpl
from conceptedit.io.edit_file import EDIT_FILE, read_edit

PIPELINE_DIR = "pipeline"

_DELTA_USAGE = """\
import conceptedit

pipe = conceptedit.load_model("{model}").pipeline  # the base model the edit was made from
conceptedit.load(pipe, "path/to/this/export")
"""

_DIFFUSERS_USAGE = """\
from diffusers import {cls}

pipe = {cls}.from_pretrained("path/to/this/export/pipeline")
"""


def _export_delta(source: ExportSource, folder: Path) -> ExportReport:
    """``edit.safetensors`` as the run wrote it: the changed tensors, with the base digests that
    let ``conceptedit.load`` refuse the wrong model."""
    shutil.copyfile(source.run_dir / EDIT_FILE, folder / EDIT_FILE)
    usage = _DELTA_USAGE.format(model=source.base_model.get("id", "BASE"))
    return ExportReport(files=[EDIT_FILE], details={"usage": usage})


def _reload_delta(base: Any, folder: Path) -> Any:
    """The edit's tensors copied into the base by name, as ``conceptedit.load`` does once its checks pass."""
    tensors, _ = read_edit(folder / EDIT_FILE)
    with torch.no_grad():
        for name, value in tensors.items():
            component, path = name.split(".", 1)
            param = getattr(base, component).get_parameter(path)
            param.copy_(value.to(param.device, param.dtype))
    return base


def _export_diffusers(source: ExportSource, folder: Path) -> ExportReport:
    """The whole edited pipeline as a diffusers folder (weights only: guards are carried beside it)."""
    source.pipeline.save_pretrained(str(folder / PIPELINE_DIR), safe_serialization=True)
    usage = _DIFFUSERS_USAGE.format(cls=type(source.pipeline).__name__)  # SD, SDXL or FLUX pipeline class
    return ExportReport(files=[f"{PIPELINE_DIR}/"], details={"usage": usage})


def _reload_diffusers(base: Any, folder: Path) -> Any:
    return type(base).from_pretrained(str(folder / PIPELINE_DIR), local_files_only=True)


@hookimpl
def conceptedit_register_exporters(register: Callable[[Exporter], None]) -> None:
    register(
        Exporter(
            "delta",
            "edit.safetensors: only the changed tensors; conceptedit.load puts them into the base model",
            _export_delta,
            reload=_reload_delta,
        )
    )
    register(
        Exporter(
            "diffusers",
            "pipeline/: the full edited pipeline as a diffusers folder (its pipeline class's from_pretrained)",
            _export_diffusers,
            reload=_reload_diffusers,
        )
    )
    from conceptedit.io.lora import KOHYA, LORA  # the LoRA formats: their own module

    register(LORA)
    register(KOHYA)
    from conceptedit.io.single_file import SINGLE_FILE  # a full checkpoint in the original SD layout
    from conceptedit.io.te_delta import TE_DELTA  # a text-encoder-only edit for load_state_dict

    register(SINGLE_FILE)
    register(TE_DELTA)
