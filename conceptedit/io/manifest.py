"""``manifest.json``: everything needed to say how a run folder came to be."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_PACKAGES = ("conceptedit", "torch", "diffusers", "transformers", "accelerate", "safetensors", "pydantic", "pluggy")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def plugin_versions(infos: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per loaded plugin (the host's ``infos.values()``): name, origin, version, failure."""
    return [
        {
            "name": i.name,
            "source": i.source,
            "distribution": i.distribution,
            "version": i.version,
            "provides": i.provides,
            "error": i.error,
        }
        for i in sorted(infos, key=lambda i: i.name)
    ]


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_commit(path: Path) -> str | None:
    """The commit of the git checkout holding ``path``, if it is one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_manifest(
    *,
    plugins: list[dict[str, Any]],
    base_model: dict[str, Any],
    seed: int,
    device: torch.device,
    dtype: str,
    edits: list[dict[str, Any]],
    changed: dict[str, list[int]],
    recipe_source: str | None,
    started: str,
    finished: str,
    command: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "versions": package_versions(),
        "plugins": plugins,
        "base_model": base_model,
        "seed": seed,
        "dtype": dtype,
        "device": device_info(device),
        "recipe_source": recipe_source,
        "recipe_git_commit": git_commit(Path(recipe_source).parent) if recipe_source else None,
        "command": command if command is not None else sys.argv,
        "started": started,
        "finished": finished,
        "edits": edits,
        "changed_tensors": changed,
    }
