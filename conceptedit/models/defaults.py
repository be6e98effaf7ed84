"""Core plugin: registers the built-in backbone adapters through the public hook."""

from __future__ import annotations

from collections.abc import Callable

from conceptedit.api.backbone import BackboneAdapter
from conceptedit.api.hooks import hookimpl
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.flux import FluxAdapter
from conceptedit.models.sdxl import StableDiffusionXLAdapter


@hookimpl
def conceptedit_register_backbones(register: Callable[[type[BackboneAdapter]], None]) -> None:
    register(StableDiffusionAdapter)
    register(StableDiffusionXLAdapter)
    register(FluxAdapter)
