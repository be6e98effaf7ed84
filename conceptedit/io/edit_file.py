"""``edit.safetensors``: only the tensors a run changed, with what is needed to check a reload."""

from __future__ import annotations

import json
import struct
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


def save_edit(
    path: Path,
    tensors: dict[str, Tensor],
    *,
    recipe: dict[str, Any],
    base_model: dict[str, Any],
    base_digests: dict[str, str],
) -> None:
    """Write changed tensors (diffusers key names, ``component.`` prefix) and their provenance."""
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "recipe": json.dumps(recipe, sort_keys=True),
        "base_model": json.dumps(base_model, sort_keys=True),
        "base_digests": json.dumps(base_digests, sort_keys=True),
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
    """Tensors and decoded metadata of an edit file; :class:`RunDirError` if it is not one."""
    if not path.is_file():
        raise RunDirError(f"{path} does not exist; is this a finished conceptedit run folder?")
    tensors, raw = read_tagged(path, FORMAT, FORMAT_VERSION, "edit file")
    meta: dict[str, Any] = {key: json.loads(raw[key]) for key in ("recipe", "base_model", "base_digests") if key in raw}
    meta["format_version"] = int(raw.get("format_version", "0"))
    return tensors, meta
