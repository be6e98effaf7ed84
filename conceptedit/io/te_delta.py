"""``te-delta``: a run that changed only the text encoder, as one file ``load_state_dict`` reads.

AdvUnlearn and other text-encoder edits leave the UNet and VAE alone, so their whole edit is a
handful of CLIP tensors. ``text_encoder_delta.safetensors`` holds their edited values (whole
tensors, not differences) under the names of the installed transformers' ``CLIPTextModel``
state dict, so::

    pipe.text_encoder.load_state_dict(load_file("text_encoder_delta.safetensors"), strict=False)

puts the edit into any pipeline whose text encoder is the base's. ``strict=False`` because the
file holds only the changed tensors; the call's ``unexpected_keys`` must be empty (transformers
versions before the flattened ``CLIPTextModel`` prefix every name with ``text_model.``).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from conceptedit.api.export import Exporter, ExportReport, ExportSource
from conceptedit.errors import ExportError
from conceptedit.io.atomic import atomic_write_bytes
from conceptedit.io.edit_file import TEXT_ENCODER_SCOPE, canonical_safetensors, edit_scope

DELTA_FILE = "text_encoder_delta.safetensors"
FORMAT = "conceptedit.te_delta"
FORMAT_VERSION = 1
PREFIX = TEXT_ENCODER_SCOPE + "."
_WRAPPER = "text_model."


def _available(source: ExportSource) -> str | None:
    scope = edit_scope(source.edited)
    if scope["scope"] == TEXT_ENCODER_SCOPE:
        return None
    if scope["scope"] == "none":
        return "the edit changes no tensor, so there is no text-encoder delta to write"
    others = [c for c in scope["components"] if c != TEXT_ENCODER_SCOPE]
    count = sum(not name.startswith(PREFIX) for name in source.edited)
    return (
        f"the edit changes {count} {'/'.join(others)} tensor(s) besides the text encoder, which a text-encoder "
        "delta cannot hold; export `lora` (low-rank factors of every changed matrix) or `single-file` "
        "(a full checkpoint) instead"
    )


def _export(source: ExportSource, folder: Path) -> ExportReport:
    tensors = {
        name.removeprefix(PREFIX): value.detach().to("cpu").contiguous()
        for name, value in sorted(source.edited.items())
    }
    atomic_write_bytes(folder / DELTA_FILE, canonical_safetensors(save(tensors, metadata=_metadata(source))))
    snippet = usage(str(source.base_model.get("id", "BASE")))
    report = ExportReport(
        files=[DELTA_FILE],
        details={
            "tensors": len(tensors),
            "parameters": sum(v.numel() for v in tensors.values()),
            "names": sorted(tensors),
            "usage": snippet,
        },
        notes=[
            f"{DELTA_FILE} holds the edited values (whole tensors, not differences) of the {len(tensors)} text-encoder "
            "tensors the run changed, under CLIPTextModel's state-dict names: load it with "
            "pipe.text_encoder.load_state_dict(delta, strict=False) into a pipeline whose text encoder is the base's; "
            "the UNet may be any fine-tune of that base.",
            "Check that load_state_dict's unexpected_keys is empty: older transformers name the same weights "
            "with a text_model. prefix (add it to each key there).",
        ],
    )
    return report


def _metadata(source: ExportSource) -> dict[str, str]:
    try:
        transformers = version("transformers")
    except PackageNotFoundError:  # only the writer's version is recorded; nothing depends on it
        transformers = "unknown"
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base_model": json.dumps(source.base_model, sort_keys=True, default=str),
        "base_model_id": str(source.base_model.get("id", "")),
        "run": source.run_dir.resolve().name,
        "names": "transformers CLIPTextModel state_dict names: load_state_dict(delta, strict=False)",
        "transformers_version": transformers,
    }


def usage(base_id: str) -> str:
    """Loading the delta into a pipeline of the base model."""
    if base_id.startswith("builtin:"):
        head = ["import conceptedit", "from safetensors.torch import load_file", ""]
        load = f'pipe = conceptedit.load_model("{base_id}").pipeline  # the built-in base'
    else:
        head = ["from diffusers import StableDiffusionPipeline", "from safetensors.torch import load_file", ""]
        how = "from_single_file" if base_id.endswith(".safetensors") else "from_pretrained"
        load = f'pipe = StableDiffusionPipeline.{how}("{base_id}")  # the base, or any fine-tune of its UNet'
    return "\n".join(
        [
            *head,
            load,
            f'delta = load_file("{DELTA_FILE}")',
            "result = pipe.text_encoder.load_state_dict(delta, strict=False)",
            "assert not result.unexpected_keys, result.unexpected_keys  # names must match this CLIPTextModel",
        ]
    )


def matching_names(delta: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """``delta`` under the text encoder's own names: adds or strips the ``text_model.`` prefix
    that transformers versions disagree on, where only that makes a name match."""
    out = {}
    for key, value in delta.items():
        other = key.removeprefix(_WRAPPER) if key.startswith(_WRAPPER) else _WRAPPER + key
        out[other if key not in names and other in names else key] = value
    return out


def reload(base_pipeline: Any, folder: Path) -> Any:
    """Load the delta into ``base_pipeline.text_encoder`` with ``load_state_dict(strict=False)``."""
    encoder = base_pipeline.text_encoder
    delta = matching_names(load_file(str(folder / DELTA_FILE)), set(encoder.state_dict()))
    result = encoder.load_state_dict(delta, strict=False)
    if result.unexpected_keys:
        raise ExportError(
            f"{folder / DELTA_FILE}: {len(result.unexpected_keys)} names are not in this text encoder "
            f"({result.unexpected_keys[:3]}); it was written for another text encoder"
        )
    return base_pipeline


TE_DELTA = Exporter(
    name="te-delta",
    description="text_encoder_delta.safetensors: a text-encoder-only edit for text_encoder.load_state_dict",
    export=_export,
    available=_available,
    reload=reload,
)
