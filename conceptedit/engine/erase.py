"""The erase-toward-guide K/V problem that UCE and RECE rounds both hand to the shared solver.

Given erase rows ``k_i`` and guide rows ``g_i`` (already aligned, see :mod:`conceptedit.engine.rows`)
it builds the :class:`~conceptedit.KVEdit` of

    min_W'  s_e Σ_i ||W' k_i − v_i*||²  +  s_p Σ_j ||W' p_j − W p_j||²  +  λ ||W' − W||²

with ``v_i*`` either the guide's current output ``W g_i`` (``replace``) or that output with its
component along the erase row's own output ``W k_i`` removed (``tensor``), so the edit only
takes away what the concept adds. Living here rather than in a plugin lets every method that
erases "toward a guide" share it: :class:`ErasureParams` is the parameter block of such a method
(UCE's; RECE extends it), and :meth:`ErasureParams.erase_edit` the one call that turns it into
the edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator
from torch import Tensor

from conceptedit.api.edits import KVEdit, TargetFn
from conceptedit.api.params import MethodParams
from conceptedit.api.recipe import ConceptRef
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
    stream: Literal["rows", "pooled"] = "rows",
) -> KVEdit:
    """The K/V edit moving each erase row's outputs to its guide's (see the module docstring);
    ``stream="pooled"`` when the rows are pooled vectors (FLUX's pooled projection)."""
    if keys.shape != guides.shape:
        raise EditError(f"{label}: {tuple(keys.shape)} erase rows but {tuple(guides.shape)} guide rows")
    if erase_scale <= 0:
        raise EditError(f"{label}: erase_scale must be > 0, got {erase_scale}")
    weights = torch.full((keys.shape[0],), float(erase_scale))
    targets: Tensor | None = None
    target_fn: TargetFn | None = None
    if technique == "replace":
        targets = guides
    elif technique == "tensor":
        target_fn = tensor_targets(keys, guides)
    else:
        raise EditError(f"{label}: unknown technique {technique!r}; use replace or tensor")
    return KVEdit(
        keys=keys,
        targets=targets,
        target_fn=target_fn,
        weights=weights,
        preserve=preserve,
        preserve_scale=preserve_scale,
        ridge=ridge,
        projections=tuple(projections),
        label=label,
        stream=stream,
    )


class ErasureParams(MethodParams):
    """The parameters of an erase-toward-guide edit: UCE's, and the base of every method built on it.

    A method subclasses it and adds its own fields; redeclaring a field changes its default or
    description and keeps its place in the schema (RECE does that for its reference defaults).
    """

    concepts: ConceptRef = Field(
        description="Concept set to erase. Each entry's prompts move to its guide: the set's `target` "
        "('' = unconditional, the paper's choice for unsafe content; 'art' for artistic styles) or the pair's.",
    )
    preserve: list[str] = Field(
        [],
        description="Concepts/prompts whose outputs must not change (e.g. other artists when erasing one). "
        "The old script always adds '' (the empty prompt); list it here to reproduce that.",
    )
    preserve_scale: NonNegativeFloat = Field(
        1.0,
        description="s_p. New script: 1; old script: max(0.1, 1 / (1 + number of preserve concepts)), "
        "counting its implicit '' (1.0 when '' is the only one).",
    )
    erase_scale: PositiveFloat = Field(1.0, description="s_e: weight of every erase row (1 in the reference scripts).")
    ridge: NonNegativeFloat = Field(0.5, description="λ‖W'−W‖² (lamb; 0.5 in both reference scripts).")
    technique: Technique = Field(
        "replace",
        description="replace: erase rows take the guide's output; tensor: the guide's output minus its "
        "component along the concept's own output.",
    )
    projections: list[Literal["k", "v"]] = Field(["k", "v"], min_length=1, description="Projections to edit.")

    @model_validator(mode="after")
    def _solvable(self) -> ErasureParams:
        if self.ridge == 0 and not (self.preserve and self.preserve_scale > 0):
            raise ValueError(
                "ridge is 0 and nothing is preserved, so the closed-form system is singular; "
                "set ridge > 0 (UCE uses 0.5) or give `preserve` concepts with preserve_scale > 0"
            )
        return self

    def erase_edit(
        self,
        keys: Tensor,
        guides: Tensor,
        preserve: Tensor | None,
        *,
        label: str,
        preserve_scale: float | None = None,
        stream: Literal["rows", "pooled"] = "rows",
    ) -> KVEdit:
        """:func:`erase_edit` of ``keys`` toward ``guides`` with these settings.

        Args:
            keys: Erase rows, ``[N, D]``.
            guides: Their guide rows, aligned with ``keys``.
            preserve: Rows whose outputs stay (already selected), or None.
            label: The edit's name in logs.
            preserve_scale: s_p to use instead of ``self.preserve_scale`` (RECE counts its
                preserve prompts once per concept).
            stream: ``pooled`` when the rows are the prompts' pooled vectors (FLUX).
        """
        return erase_edit(
            keys,
            guides,
            erase_scale=self.erase_scale,
            preserve=preserve,
            preserve_scale=self.preserve_scale if preserve_scale is None else preserve_scale,
            ridge=self.ridge,
            technique=self.technique,
            projections=self.projections,
            label=label,
            stream=stream,
        )
