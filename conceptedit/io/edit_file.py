"""``edit.safetensors``: only the tensors a run changed, with what is needed to check a reload.

Its metadata also says which pipeline parts the edit touches (``components``) and what that
means for reuse (``scope``, ``portable``). An edit whose every tensor belongs to the text encoder
is a *text-encoder delta*: it loads into any pipeline whose text encoder is the base's (a
fine-tuned UNet of the same base, say), because a reload checks only the tensors it replaces.
Files written before these keys existed get them derived from their tensor names on reading, so
the format version did not change: old readers ignore the keys and load the same tensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from conceptedit.errors import RunDirError
from conceptedit.io.atomic import atomic_write_bytes

EDIT_FILE = "edit.safetensors"
FORMAT = "conceptedit.edit"
FORMAT_VERSION = 1

#: ``scope`` of an edit that changes only the text encoder.
TEXT_ENCODER_SCOPE = "text_encoder"


def edit_scope(names: Iterable[str]) -> dict[str, Any]:
    """What an edit touching the tensors ``names`` (``component.path``) may be loaded into.

    ``components``: the pipeline parts it changes; ``scope``: ``text_encoder`` for a text-encoder
    delta, ``none`` for an empty edit, else ``base_model``; ``portable``: the same, as a sentence.
    """
    components = sorted({name.split(".", 1)[0] for name in names})
    if components == [TEXT_ENCODER_SCOPE]:
        scope = TEXT_ENCODER_SCOPE
        portable = (
            "text-encoder delta: loads into any pipeline whose text encoder is the base model's "
            "(e.g. a fine-tuned UNet of the same base); only the text-encoder tensors it replaces are checked"
        )
    elif not components:
        scope, portable = "none", "changes no tensor: loads into any pipeline"
    else:
        scope = "base_model"
        parts = "/".join(components)
        portable = f"loads into the base model it was made from: every {parts} tensor it replaces is checked"
    return {"scope": scope, "components": components, "portable": portable}


def save_edit(
    path: Path,
    tensors: dict[str, Tensor],
    *,
    recipe: dict[str, Any],
    base_model: dict[str, Any],
    base_digests: dict[str, str],
) -> None:
    """Write changed tensors (diffusers key names, ``component.`` prefix), their provenance and scope."""
    scope = edit_scope(tensors)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "recipe": json.dumps(recipe, sort_keys=True),
        "base_model": json.dumps(base_model, sort_keys=True),
        "base_digests": json.dumps(base_digests, sort_keys=True),
        "scope": scope["scope"],
        "components": json.dumps(scope["components"]),
        "portable": scope["portable"],
    }
    ordered = {name: tensors[name].contiguous() for name in sorted(tensors)}
    atomic_write_bytes(path, canonical_safetensors(save(ordered, metadata=metadata)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header in sorted key order, so equal content means equal bytes.

    safetensors writes metadata in hash-map order, which changes between processes; tensor
    offsets are relative to the data section, so reordering the header leaves them valid.
    """
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def read_tagged(path: Path, form: str, newest: int, kind: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and raw metadata of a safetensors file whose ``format`` tag is ``form`` at a
    ``format_version`` this code reads (at most ``newest``); :class:`RunDirError` otherwise."""
    try:
        with safe_open(str(path), "pt") as fh:
            raw = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - no iterator
    except Exception as exc:
        raise RunDirError(f"{path} is not a readable safetensors file: {exc}") from exc
    if raw.get("format") != form:
        raise RunDirError(f"{path} is not a conceptedit {kind} (format {raw.get('format')!r})")
    version = int(raw.get("format_version", "0"))
    if version > newest:
        raise RunDirError(
            f"{path} has {kind} format version {version}; this conceptedit reads up to {newest}. Upgrade conceptedit."
        )
    return tensors, raw


def read_edit(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of an edit file; :class:`RunDirError` if it is not one.

    ``scope``, ``components`` and ``portable`` are always there: read, or for files written
    before they were recorded, derived from the tensor names (what the writer would have said).
    """
    if not path.is_file():
        raise RunDirError(f"{path} does not exist; is this a finished conceptedit run folder?")
    tensors, raw = read_tagged(path, FORMAT, FORMAT_VERSION, "edit file")
    meta: dict[str, Any] = {
        key: json.loads(raw[key]) for key in ("recipe", "base_model", "base_digests", "components") if key in raw
    }
    meta["format_version"] = int(raw.get("format_version", "0"))
    derived = edit_scope(tensors)
    meta.setdefault("components", derived["components"])
    meta["scope"] = raw.get("scope", derived["scope"])
    meta["portable"] = raw.get("portable", derived["portable"])
    return tensors, meta
