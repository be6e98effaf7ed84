"""Core plugin: registers the built-in backbone adapters through the public hook."""

from __future__ import annotations

from collections.abc import Callable

from conceptedit.hookspecs import hookimpl
from conceptedit.models.backbone import BackboneAdapter, StableDiffusionAdapter


@hookimpl
def conceptedit_register_backbones(register: Callable[[type[BackboneAdapter]], None]) -> None:
    register(StableDiffusionAdapter)
