"""Helpers for testing edit methods, for plugin authors and for conceptedit's own tests.

``isolated_host`` gives a plugin host holding only the core plugins plus the ones you pass,
so installed third-party plugins cannot change a test's outcome; ``tiny_recipe`` writes the
smallest recipe that runs on ``builtin:tiny-sd``; ``edit_context`` gives the context a method's
hooks receive, outside any run, to call engine pieces directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from conceptedit.engine.context import EditContext, RunContext
from conceptedit.engine.ledger import WeightLedger
from conceptedit.io.progress import Reporter
from conceptedit.models.backbone import resolve_backbone
from conceptedit.plugins import PluginHost, get_host, new_host, set_host
from conceptedit.recipe.loader import LoadedRecipe


@contextmanager
def isolated_host(*plugins: object, entry_points: bool = False) -> Iterator[PluginHost]:
    """A fresh process-wide plugin host with ``plugins`` registered; the old one comes back after."""
    try:
        previous: PluginHost | None = get_host()
    except Exception:  # a broken environment must not stop a test from isolating itself
        previous = None
    host = new_host(entry_points=entry_points)
    for plugin in plugins:
        host.register(plugin)
    set_host(host)
    try:
        yield host
    finally:
        set_host(previous)


def tiny_recipe(*edits: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A recipe dict on ``builtin:tiny-sd`` with CPU/float32 and the given edits."""
    recipe: dict[str, Any] = {
        "schema_version": 1,
        "model": "builtin:tiny-sd",
        "seed": 0,
        "device": "cpu",
        "edits": list(edits),
    }
    recipe.update(fields)
    return recipe


def edit_context(loaded: LoadedRecipe, pipeline: Any, run_dir: Path) -> EditContext:
    """An edit context on ``pipeline`` (CPU; its adapter the one the recipe's host resolves: SD-1.x/2.x,
    SDXL...) for ``loaded``, outside any run; its cache lives in ``run_dir / "cache"``."""
    adapter = resolve_backbone(pipeline, loaded.host.registry.backbones)
    run = RunContext(
        loaded=loaded,
        pipeline=pipeline,
        adapter=adapter,
        device=torch.device("cpu"),
        ledger=WeightLedger(adapter),
        host=loaded.host,
        run_dir=run_dir,
        reporter=Reporter(quiet=True),
        cache_dir=run_dir / "cache",
        base_fingerprint="test",
    )
    edit = SimpleNamespace(label="test")
    return EditContext(run=run, edit=edit, index=0, method=None, generator=torch.Generator())  # type: ignore[arg-type]
