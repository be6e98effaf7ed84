"""Output formats of a run folder, registered as a core plugin through the public hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from conceptedit.api.hooks import hookimpl
from conceptedit.api.results import Exporter


def _export_delta(pipeline: Any, run_dir: Path) -> None:
    """The engine always writes ``edit.safetensors``; listing ``delta`` just asks for it."""


def _export_diffusers(pipeline: Any, run_dir: Path) -> None:
    pipeline.save_pretrained(str(run_dir / "pipeline"), safe_serialization=True)


@hookimpl
def conceptedit_register_exporters(register: Callable[[Exporter], None]) -> None:
    register(Exporter("delta", "edit.safetensors: only the changed tensors (always written)", _export_delta))
    register(
        Exporter("diffusers", "pipeline/: a full diffusers folder StableDiffusionPipeline loads", _export_diffusers)
    )
