"""Choosing parameters by name: the trainable subsets training methods declare (each backbone adapter
names its denoiser's sets, ``BackboneAdapter.parameter_sets``)."""

from __future__ import annotations

from collections.abc import Sequence

from conceptedit.api.backbone import BackboneAdapter
from conceptedit.errors import TrainingError


def select_parameters(
    adapter: BackboneAdapter, include: Sequence[str], exclude: Sequence[str] = (), component: str | None = None
) -> list[str]:
    """Full names of ``component`` parameters (default: the denoiser's) containing any ``include``
    substring and no ``exclude`` one.

    Raises:
        TrainingError: when nothing matches (a typo would otherwise train nothing).
    """
    component = component or adapter.denoiser_name
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


def select_parameter_set(adapter: BackboneAdapter, name: str) -> list[str]:
    """Full names of the denoiser parameters in the named set, as the adapter defines its sets
    (``BackboneAdapter.parameter_sets``: the UNet's names for SD and SDXL, FLUX's transformer's).

    Raises:
        TrainingError: for an unknown name or a set the model has no parameters for.
    """
    sets = adapter.parameter_sets()
    if name not in sets:
        raise TrainingError(f"unknown parameter set {name!r}; use one of {', '.join(sets)}")
    include, exclude = sets[name]
    prefix = adapter.denoiser_name + "."
    names = [
        full
        for full, _ in adapter.named_parameters()
        if full.startswith(prefix)
        and (include is None or any(part in full for part in include))
        and not any(part in full for part in exclude)
    ]
    if not names:
        raise TrainingError(f"parameter set {name!r} matches no {adapter.denoiser_name} parameter of this model")
    return names
