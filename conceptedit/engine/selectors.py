"""Choosing parameters by name: the trainable subsets training methods declare."""

from __future__ import annotations

from collections.abc import Sequence

from conceptedit.errors import TrainingError
from conceptedit.models.backbone import BackboneAdapter


def select_parameters(
    adapter: BackboneAdapter, include: Sequence[str], exclude: Sequence[str] = (), component: str = "unet"
) -> list[str]:
    """Full names of ``component`` parameters containing any ``include`` substring and no ``exclude`` one.

    Raises:
        TrainingError: when nothing matches (a typo would otherwise train nothing).
    """
    prefix = component + "."
    names = [
        name
        for name, _ in adapter.named_parameters()
        if name.startswith(prefix)
        and any(part in name for part in include)
        and not any(part in name for part in exclude)
    ]
    if not names:
        raise TrainingError(f"no {component} parameter name contains any of {list(include)}")
    return names
