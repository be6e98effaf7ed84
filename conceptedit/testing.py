"""Helpers for testing edit methods, for plugin authors and for conceptedit's own tests.

``isolated_host`` gives a plugin host holding only the core plugins plus the ones you pass,
so installed third-party plugins cannot change a test's outcome; ``tiny_recipe`` writes the
smallest recipe that runs on ``builtin:tiny-sd``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from conceptedit.plugins import PluginHost, get_host, new_host, set_host


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
