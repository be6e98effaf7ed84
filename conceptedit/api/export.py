"""The exporter contract: what an output format reads from a finished run, and what it reports.

A format is written from a finished run folder, never from a run in progress, so
``conceptedit export RUN --format X`` and a recipe's ``output.formats`` run the same code:
:func:`conceptedit.export` loads the base model the manifest names, applies the edit
(``conceptedit.load``), hands the exporter an :class:`ExportSource` and a staging folder, adds the
model card, the resolved recipe and the manifest, checks the result by loading it back
(:attr:`Exporter.reload`) and publishes the folder in one rename.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from torch import Tensor


class ExportOptions(BaseModel):
    """A format's options (``--rank``, ``--max-error``...); subclass it to add fields. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ExportSource:
    """A finished run, ready to be written in another format.

    Attributes:
        run_dir: The run folder (``manifest.json``, ``edit.safetensors``, ``guards/``, ``metrics.json``).
        manifest: Its manifest.
        recipe: The resolved recipe the run was made from.
        base_model: The base model's description (``id``, ``kind``, ``revision``, ``file_hashes``).
        edited: Each changed tensor's edited value, under the edit file's names
            (``unet.down_blocks…attn2.to_k.weight``, ``text_encoder.text_model…``).
        base: The same tensors' values in the base model.
        pipeline: The edited pipeline: the base model with the edit applied and its guards installed.
        guards: The manifest's inference-time guards (``method``, ``file``...), in install order.
        load_base: Loads a fresh copy of the base pipeline (for round trips and comparisons).
        options: The format's validated options.
    """

    run_dir: Path
    manifest: dict[str, Any]
    recipe: dict[str, Any]
    base_model: dict[str, Any]
    edited: dict[str, Tensor]
    base: dict[str, Tensor]
    pipeline: Any
    guards: list[dict[str, Any]]
    load_base: Callable[[], Any]
    options: ExportOptions


@dataclass
class ExportReport:
    """What an exporter wrote and what it could not carry.

    Attributes:
        files: Paths written, relative to the export folder.
        notes: Plain sentences for the user: what the format leaves out and what to do about it
            (an inference-time guard that no weight can hold, a bias a LoRA cannot carry...).
        details: Measured figures (per-matrix rank and reconstruction error...), kept in the
            export's ``export.json`` and summarised in its model card.
        hook_only: Parts of the edit that only run as code (guards), written with a loader snippet.
    """

    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    hook_only: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Exporter:
    """One output format.

    Attributes:
        name: What ``--format`` and ``output.formats`` name.
        description: One line for ``conceptedit export --list`` and the docs.
        export: ``(source, folder) -> ExportReport``: write the format into ``folder`` (a staging
            folder that becomes the export folder only once everything is written).
        Options: The format's options model (none: :class:`ExportOptions`, which takes no keys).
        available: ``source -> None`` when this run can be written in this format, else the
            reason it cannot (shown by ``--list`` and raised by an export).
        reload: ``(fresh base pipeline, folder) -> pipeline``: loads the export back the way its
            users will (``load_lora_weights``, ``from_single_file``...), so the export is checked
            against the edit it came from; None when the format has no such loader.
    """

    name: str
    description: str
    export: Callable[[ExportSource, Path], ExportReport]
    Options: type[ExportOptions] = ExportOptions
    available: Callable[[ExportSource], str | None] | None = None
    reload: Callable[[Any, Path], Any] | None = None

    def unavailable_reason(self, source: ExportSource) -> str | None:
        """Why ``source`` cannot be written in this format, or None."""
        return None if self.available is None else self.available(source)
