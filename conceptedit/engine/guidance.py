"""Guidance arithmetic shared by training targets: APG's normalised guidance and its compositional sum.

Adaptive projected guidance (Sadat et al., "Eliminating Oversaturation and Artifacts of High
Guidance Scales in Diffusion Models", arXiv 2410.02416) rewrites the guidance difference of a
conditional prediction ``c`` and an unconditional one ``u`` before it is scaled:

    Δ   = c − u                                  (or, with momentum β, the running sum Δ + β·Δ_prev)
    Δ   ← Δ · min(1, r / ‖Δ‖)                     norm threshold r > 0 (r = 0: no threshold)
    Δ∥  = (⟨Δ, c⟩ / ‖c‖²) c,    Δ⊥ = Δ − Δ∥       split against c, per sample over (C, H, W), in float64
    U   = Δ⊥ + η Δ∥                              η = 1 keeps Δ; APG's η = 0 drops the parallel part
    APG = c + (w − 1) U                          :func:`normalized_guidance`

With η = 1, r = 0 and no momentum, ``U = Δ`` and APG is ordinary classifier-free guidance
``u + w (c − u)``. A training target built from ``U`` therefore reduces to the plain one at
those settings: ESD's ``ε(∅) − η_esd (ε(c) − ε(∅))`` is ``c − (1 + η_esd) U``. STEREO
(Srivatsan et al., CVPR 2025) writes its ESD target and its compositional target this way
(:func:`compositional_guidance`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class MomentumBuffer:
    """APG's running guidance difference: each :meth:`update` makes it ``Δ + β · previous`` (β may be negative;
    APG uses −0.75 when sampling). One buffer per guided condition, reset for every new image."""

    def __init__(self, momentum: float) -> None:
        self.momentum = float(momentum)
        self.running: Tensor | None = None

    def update(self, difference: Tensor) -> Tensor:
        """Fold ``difference`` into the running sum and return the sum."""
        previous = self.running
        self.running = difference if previous is None else difference + self.momentum * previous
        return self.running


def project(vector: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """``vector``'s parts parallel and orthogonal to ``onto``, per sample (all dims after the first), in float64,
    returned in ``vector``'s dtype. A zero ``onto`` has no direction: everything is orthogonal to it."""
    dims = tuple(range(1, vector.ndim))
    v, d = vector.double(), onto.double()
    unit = d / d.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)  # torch's normalize, over several dims
    parallel = (v * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(vector.dtype), (v - parallel).to(vector.dtype)


def normalized_update(
    cond: Tensor,
    uncond: Tensor,
    *,
    eta: float = 1.0,
    norm_threshold: float = 0.0,
    momentum: MomentumBuffer | None = None,
) -> Tensor:
    """APG's normalised guidance direction ``U = Δ⊥ + η Δ∥`` of ``Δ = cond − uncond`` (see the module)."""
    difference = cond - uncond
    if momentum is not None:
        difference = momentum.update(difference)
    if norm_threshold > 0:
        dims = tuple(range(1, difference.ndim))
        norm = difference.norm(p=2, dim=dims, keepdim=True)
        difference = difference * torch.clamp(norm_threshold / norm, max=1.0)
    parallel, orthogonal = project(difference, cond)
    return orthogonal + eta * parallel


def normalized_guidance(
    cond: Tensor,
    uncond: Tensor,
    scale: float,
    *,
    eta: float = 1.0,
    norm_threshold: float = 0.0,
    momentum: MomentumBuffer | None = None,
) -> Tensor:
    """APG: ``cond + (scale − 1) U``; a scale below 1 guides away from ``cond`` (negative guidance)."""
    update = normalized_update(cond, uncond, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
    return cond + (scale - 1) * update


def compositional_guidance(
    uncond: Tensor,
    conds: Sequence[Tensor],
    scales: Sequence[float],
    *,
    eta: float = 1.0,
    norm_threshold: float = 0.0,
) -> Tensor:
    """STEREO's compositional APG: ``uncond + mean_{w_i > 0} (w_i − 1) U_i + mean_{w_i ≤ 0} (w_i − 1) U_i``.

    ``U_i`` is :func:`normalized_update` of ``conds[i]`` against ``uncond``. Conditions with a positive
    scale pull toward themselves, the others push away; each group is averaged over its members, so
    adding anchors or erased concepts does not change the strength of either side. Note the ``− 1``
    on both sides, as STEREO has it: scale ``w`` pulls toward an anchor with weight ``w − 1`` and
    pushes from a concept given ``−w`` with weight ``w + 1``.
    """
    if len(conds) != len(scales) or not conds:
        raise ValueError(f"compositional_guidance needs one scale per condition, got {len(conds)} and {len(scales)}")
    sides: dict[bool, list[Tensor]] = {True: [], False: []}
    for cond, scale in zip(conds, scales, strict=True):
        update = normalized_update(cond, uncond, eta=eta, norm_threshold=norm_threshold)
        sides[scale > 0].append((scale - 1) * update)
    total = uncond
    for terms in sides.values():
        if terms:
            total = total + torch.stack(terms).mean(0)
    return total
