"""The one closed-form solver for cross-attention key/value edits (TRCE stage 1, UCE, RECE...).

For each edited projection ``W`` (a ``to_k`` or ``to_v`` of a cross-attention layer) it finds

    W' = argmin  Σ_i w_i ||W' k_i − v_i||²            move these keys to these values
               + s  Σ_j ||W' p_j − W p_j||²           keep these embeddings' outputs
               + η  tr((W' − W) C (W' − W)ᵀ)           keep a prior's outputs, C = Σ h hᵀ
               + λ  ||W' − W||²_F                      stay near W

whose normal equations are ``W' B = R`` with

    B = Σ w k kᵀ + s P Pᵀ + η C + λ I
    R = Σ w v kᵀ + W (s P Pᵀ + η C + λ I).

``B`` does not depend on the layer, so it is factorised once (Cholesky, float64) and reused
for every projection. When each target value is the original projection of an embedding,
``v_i = W t_i``, then ``R = W Q`` with ``Q = Σ w t kᵀ + s P Pᵀ + η C + λ I`` and every layer's
answer is ``W' = W M`` with one ``M = Q B⁻¹`` -- a single solve for all layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from conceptedit.api.edits import KVEdit
from conceptedit.errors import EditError, SingularSystemError

#: Smallest pivot ratio accepted by the Cholesky factorisation before a system counts as singular.
RCOND = 1e-12


class KVSolver:
    """Solves one :class:`KVEdit` for any number of projection matrices."""

    def __init__(self, edit: KVEdit, dim: int) -> None:
        edit.validate(dim)
        self.edit = edit
        f64 = torch.float64
        keys = edit.keys.to(f64)
        weights = (edit.weights if edit.weights is not None else torch.ones(keys.shape[0])).to(f64)
        keep = edit.ridge * torch.eye(dim, dtype=f64)
        if edit.preserve is not None and edit.preserve_scale > 0:
            p = edit.preserve.to(f64)
            keep += edit.preserve_scale * p.T @ p
        if edit.prior is not None and edit.prior_scale > 0:
            keep += edit.prior_scale * edit.prior.to(f64)
        self._keep = keep
        self._weighted_keys = keys * weights[:, None]
        lhs = keys.T @ self._weighted_keys + keep  # B (symmetric)
        chol, info = torch.linalg.cholesky_ex(lhs)
        pivots = chol.diagonal() ** 2 if info.item() == 0 else None
        # Positive but vanishing pivots mean directions no key or preserve term pins down; solving
        # anyway would blow rounding noise in those directions up into huge weights.
        if pivots is None or pivots.min() <= RCOND * pivots.max():
            rank = int(torch.linalg.matrix_rank(lhs, rtol=RCOND**0.5).item())
            raise SingularSystemError(
                f"{edit.label}: the {dim}x{dim} system is singular (rank {rank}); "
                f"{keys.shape[0]} key rows cannot pin down every direction. Add preservation "
                "(a prior or preserve prompts with a scale > 0) or a ridge term > 0."
            )
        self._chol = chol
        self._shared: Tensor | None = None
        if edit.targets is not None:
            # W' = W · M with M = Q B⁻¹ for every layer; B symmetric so M = (B⁻¹ Qᵀ)ᵀ.
            q = edit.targets.to(f64).T @ self._weighted_keys + keep
            self._shared = torch.cholesky_solve(q.T, chol).T

    def solve(self, name: str, weight: Tensor) -> Tensor:
        """The edited version of ``weight`` (``[d_out, D]``), in ``weight``'s dtype."""
        w = weight.detach().to(torch.float64)
        if self._shared is not None:
            new = w @ self._shared
        else:
            assert self.edit.target_fn is not None
            values = self.edit.target_fn(name, weight.detach()).to(torch.float64)
            if tuple(values.shape) != (self.edit.keys.shape[0], w.shape[0]):
                raise EditError(
                    f"{self.edit.label}: target_fn gave {tuple(values.shape)} for {name}, "
                    f"expected [{self.edit.keys.shape[0]}, {w.shape[0]}]"
                )
            rhs = values.T @ self._weighted_keys + w @ self._keep
            new = torch.cholesky_solve(rhs.T, self._chol).T
        return new.to(weight.dtype)


def matching_inputs(current: Sequence[Tensor], original: Sequence[Tensor], inputs: Tensor, reg: float) -> Tensor:
    """Embeddings that make the *current* projections reproduce what the *original* ones made of ``inputs``.

    For each row ``c`` of ``inputs`` it returns

        c' = argmin_x  Σ_l ||W'_l x − W_l c||²  +  reg ||x||²  =  (Σ W'ᵀW' + reg I)⁻¹ (Σ W'ᵀ W) c,

    summed over the pairs ``(W'_l, W_l)`` of ``current`` and ``original``. After an erasure
    edit this is the closed-form adversarial embedding of RECE: an input that still brings the
    erased concept's keys and values back. One ``D x D`` Cholesky factorisation in float64
    serves every row.
    """
    if len(current) != len(original) or not current:
        raise EditError(f"need matching, non-empty weight lists, got {len(current)} current and {len(original)}")
    if reg < 0:
        raise EditError(f"reg must be >= 0, got {reg}")
    f64 = torch.float64
    dim = current[0].shape[1]
    gram = reg * torch.eye(dim, dtype=f64)
    cross = torch.zeros(dim, dim, dtype=f64)
    for new, old in zip(current, original, strict=True):
        if new.shape != old.shape or new.shape[1] != dim:
            raise EditError(f"weights must all be [d_out, {dim}] in pairs of equal shape, got {tuple(new.shape)}")
        w_new = new.detach().to("cpu", f64)
        gram += w_new.T @ w_new
        cross += w_new.T @ old.detach().to("cpu", f64)
    chol, info = torch.linalg.cholesky_ex(gram)
    pivots = chol.diagonal() ** 2 if info.item() == 0 else None
    if pivots is None or pivots.min() <= RCOND * pivots.max():
        raise SingularSystemError(
            f"the {dim}x{dim} system for matching inputs is singular; the projections do not pin down every "
            "input direction. Use reg > 0."
        )
    rows = inputs.detach().to("cpu", f64).reshape(-1, dim)
    solved = torch.cholesky_solve(cross @ rows.T, chol).T
    return solved.reshape(inputs.shape).to(inputs.dtype)
