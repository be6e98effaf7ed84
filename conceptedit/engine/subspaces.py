"""Subspaces and representatives of sets of text embeddings, for null-space key/value edits.

A null-space edit (SPEED; AlphaEdit before it) changes a projection only along directions that
the embeddings it must keep do not use. :func:`null_space_projector` finds those directions from
the keys' second-moment matrix; :class:`~conceptedit.KVEdit`'s ``projector`` takes the result.
:func:`kmeans_centers` condenses many similar rows (the 76 padding rows of the empty prompt) into
a few representatives, so equality constraints on them stay independent.

Both live here rather than in a plugin because neither is specific to one method: any edit that
keeps a retained set exactly, or constrains a handful of invariant rows, needs them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from conceptedit.errors import EditError

ThresholdRule = Literal["absolute", "relative"]


def second_moment(rows: Tensor) -> Tensor:
    """``(1/N) Σ c cᵀ`` over the rows of ``rows`` (float64, ``[D, D]``)."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise EditError(f"need a non-empty [N, D] set of rows, got {tuple(rows.shape)}")
    x = rows.to(torch.float64)
    return x.T @ x / x.shape[0]


def null_space_projector(moment: Tensor, threshold: float, rule: ThresholdRule = "absolute") -> Tensor:
    """Projector onto the eigenvectors of ``moment`` whose eigenvalues are below ``threshold``.

    ``moment`` is a symmetric positive semi-definite ``[D, D]`` matrix, normally the
    :func:`second_moment` of the keys to keep. An exact null space rarely exists once the kept set
    is large (its rank reaches ``D``), so "null" means "too little energy to matter": SPEED and
    AlphaEdit cut at an absolute eigenvalue (``rule: absolute``, SPEED's default 0.1); ``relative``
    cuts at ``threshold`` times the largest eigenvalue, which does not depend on the scale of the
    text encoder's outputs. The answer is ``U₀ U₀ᵀ`` in float64; a kept key ``c`` then has
    ``‖P c‖² = Σ_{λ_i < t} (u_iᵀ c)²``, small by construction.
    """
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise EditError(f"the second-moment matrix must be square, got {tuple(moment.shape)}")
    if threshold <= 0:
        raise EditError(f"the null-space threshold must be > 0, got {threshold}")
    m = moment.to(torch.float64)
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    cut = threshold if rule == "absolute" else threshold * float(values.abs().max())
    basis = vectors[:, values < cut]
    return basis @ basis.T


def kmeans_centers(
    rows: Tensor, k: int, *, generator: torch.Generator, tol: float = 1e-4, max_iter: int = 1000
) -> Tensor:
    """``k`` centres of ``rows`` by Lloyd's k-means (Euclidean), float64 ``[k, D]``.

    It follows the ``kmeans_pytorch`` package SPEED's reference uses: the centres start at ``k``
    distinct rows drawn at random (here from ``generator``), every row joins its nearest centre,
    each centre moves to its members' mean (a centre left with no member restarts at a random
    row), until the centres move less than ``tol`` in total (sum of their shifts, squared).
    """
    if rows.ndim != 2 or not 0 < k <= rows.shape[0]:
        raise EditError(f"cannot take {k} centres of {tuple(rows.shape)} rows")
    x = rows.detach().to("cpu", torch.float64)
    centers = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    for _ in range(max_iter):
        members = torch.cdist(x, centers).argmin(dim=1)
        moved = centers.clone()
        for index in range(k):
            mine = x[members == index]
            if mine.shape[0] == 0:
                mine = x[torch.randint(x.shape[0], (1,), generator=generator)]
            moved[index] = mine.mean(dim=0)
        shift = float(((moved - centers) ** 2).sum(dim=1).sqrt().sum())
        centers = moved
        if shift**2 < tol:
            break
    return centers
