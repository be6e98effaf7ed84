"""The erase-toward-guide K/V problem that UCE and RECE rounds both hand to the shared solver.

Given erase rows ``k_i`` and guide rows ``g_i`` (already aligned, see :mod:`conceptedit.engine.rows`)
it builds the :class:`~conceptedit.KVEdit` of

    min_W'  s_e Σ_i ||W' k_i − v_i*||²  +  s_p Σ_j ||W' p_j − W p_j||²  +  λ ||W' − W||²

with ``v_i*`` either the guide's current output ``W g_i`` (``replace``) or that output with its
component along the erase row's own output ``W k_i`` removed (``tensor``), so the edit only
takes away what the concept adds. Living here rather than in a plugin lets every method that
erases "toward a guide" share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from conceptedit.engine.kv_solver import KVEdit, TargetFn
from conceptedit.errors import EditError

Technique = Literal["replace", "tensor"]


def tensor_targets(keys: Tensor, guides: Tensor) -> TargetFn:
    """Per layer: ``W g_i`` minus its projection on ``W k_i`` (UCE's ``tensor`` technique, row by row)."""
    keys64, guides64 = keys.to(torch.float64), guides.to(torch.float64)

    def target(name: str, weight: Tensor) -> Tensor:
        w = weight.to(torch.float64)
        old, new = keys64 @ w.T, guides64 @ w.T
        coeff = (old * new).sum(-1, keepdim=True) / (old * old).sum(-1, keepdim=True).clamp_min(1e-30)
        return new - coeff * old

    return target


def erase_edit(
    keys: Tensor,
    guides: Tensor,
    *,
    erase_scale: float = 1.0,
    preserve: Tensor | None = None,
    preserve_scale: float = 1.0,
    ridge: float = 0.0,
    technique: Technique = "replace",
    projections: Sequence[str] = ("k", "v"),
    label: str = "erase",
) -> KVEdit:
    """The K/V edit moving each erase row's outputs to its guide's (see the module docstring)."""
    if keys.shape != guides.shape:
        raise EditError(f"{label}: {tuple(keys.shape)} erase rows but {tuple(guides.shape)} guide rows")
    if erase_scale <= 0:
        raise EditError(f"{label}: erase_scale must be > 0, got {erase_scale}")
    weights = torch.full((keys.shape[0],), float(erase_scale))
    if technique == "replace":
        goal: dict[str, object] = {"targets": guides}
    elif technique == "tensor":
        goal = {"target_fn": tensor_targets(keys, guides)}
    else:
        raise EditError(f"{label}: unknown technique {technique!r}; use replace or tensor")
    return KVEdit(
        keys=keys,
        weights=weights,
        preserve=preserve,
        preserve_scale=preserve_scale,
        ridge=ridge,
        projections=tuple(projections),
        label=label,
        **goal,  # type: ignore[arg-type]
    )
