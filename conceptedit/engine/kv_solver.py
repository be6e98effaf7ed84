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

**Null-space edits** (SPEED, AlphaEdit). An edit with a projector ``Π`` and/or invariant rows
``E`` restricts the change to ``W' = W + ΔΠ`` and asks ``ΔΠ e_j = 0`` exactly for every
invariant row. With ``D = ΔΠ`` the same objective (every term on ``D``) gives, through Lagrange
multipliers, :func:`null_space_delta`. Inputs that ``Π`` sends to zero -- the retained keys --
keep their outputs exactly, so the ridge is the only thing holding ``D`` elsewhere. ``Π`` may
differ per layer (``projector_fn``); each layer then costs one ``D x D`` LU factorisation.
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
        self._shared: Tensor | None = None
        if edit.constrained:
            # Null-space mode: no shared factorisation; every layer solves null_space_delta (on the CPU).
            cpu = torch.device("cpu")
            self._key_gram = (keys.T @ self._weighted_keys).to(cpu)  # Σ w k kᵀ
            self._gram = (lhs - edit.ridge * torch.eye(dim, dtype=f64, device=lhs.device)).to(cpu)  # A = B − λ I
            self._weighted_keys = self._weighted_keys.to(cpu)
            self._projector = None if edit.projector is None else edit.projector.detach().to(cpu, f64)
            self._invariant = None if edit.invariant is None else edit.invariant.detach().to(cpu, f64)
            self._goal_map: Tensor | None = None
            if edit.targets is not None:
                # R₀ = Σ w (v − W k) kᵀ = W Σ w (t − k) kᵀ when v = W t.
                self._goal_map = ((edit.targets.to(f64) - keys).T @ (keys * weights[:, None])).to(cpu)
            return
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
        if edit.targets is not None:
            # W' = W · M with M = Q B⁻¹ for every layer; B symmetric so M = (B⁻¹ Qᵀ)ᵀ.
            q = edit.targets.to(f64).T @ self._weighted_keys + keep
            self._shared = torch.cholesky_solve(q.T, chol).T

    @property
    def shared_map(self) -> Tensor:
        """``M`` with ``W' = W M`` for every layer (edits with ``targets`` and no projector/invariant)."""
        if self._shared is None:
            raise EditError(f"{self.edit.label}: only an unconstrained edit with `targets` has one map for every layer")
        return self._shared

    def solve(self, name: str, weight: Tensor) -> Tensor:
        """The edited version of ``weight`` (``[d_out, D]``), in ``weight``'s dtype."""
        if self.edit.constrained:
            return self._solve_constrained(name, weight)
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

    def _solve_constrained(self, name: str, weight: Tensor) -> Tensor:
        f64 = torch.float64
        w = weight.detach().to("cpu", f64)
        if self._goal_map is not None:
            residual = w @ self._goal_map
        else:
            assert self.edit.target_fn is not None
            values = self.edit.target_fn(name, weight.detach()).to("cpu", f64)
            if tuple(values.shape) != (self.edit.keys.shape[0], w.shape[0]):
                raise EditError(
                    f"{self.edit.label}: target_fn gave {tuple(values.shape)} for {name}, "
                    f"expected [{self.edit.keys.shape[0]}, {w.shape[0]}]"
                )
            residual = values.T @ self._weighted_keys - w @ self._key_gram
        projector = self._projector
        if self.edit.projector_fn is not None:
            projector = self.edit.projector_fn(name, weight.detach()).detach().to("cpu", f64)
            dim = w.shape[1]
            if tuple(projector.shape) != (dim, dim) or not torch.isfinite(projector).all():
                raise EditError(
                    f"{self.edit.label}: projector_fn gave {tuple(projector.shape)} for {name}, expected a finite "
                    f"[{dim}, {dim}] matrix"
                )
        delta = null_space_delta(
            residual,
            self._gram,
            projector,
            self.edit.ridge,
            self._invariant,
            self.edit.invariant_ridge,
            label=f"{self.edit.label} ({name})",
        )
        return (w + delta).to(device=weight.device, dtype=weight.dtype)


def edit_map(edit: KVEdit, dim: int) -> Tensor:
    """The ``D x D`` matrix ``M`` with ``W' = W M`` that solves ``edit`` for every layer at once.

    Defined for edits whose goals are ``targets`` (the current outputs of embeddings) and with no
    projector or invariant rows. ``M − I`` maps an input to the change the edit makes to its
    outputs through any ``W``: SPEED ranks retained concepts by ``‖W (M − I) c‖`` (how much an
    unconstrained erasure would move them) and keeps the most affected.
    """
    if edit.targets is None or edit.constrained:
        raise EditError(f"{edit.label}: edit_map needs `targets` and no projector or invariant rows")
    return KVSolver(edit, dim).shared_map


def null_space_delta(
    residual: Tensor,
    gram: Tensor,
    projector: Tensor | None,
    ridge: float,
    invariant: Tensor | None = None,
    invariant_ridge: float = 0.0,
    *,
    label: str = "null-space edit",
) -> Tensor:
    """The change ``D = ΔΠ`` of one weight under a null-space edit (float64, ``[d_out, D]``).

    It minimises ``tr(D A Dᵀ) − 2 tr(R₀ᵀ D) + λ ‖D‖²`` over ``D = ΔΠ`` subject to ``D E = 0``
    (``E``'s columns are the invariant rows). Stationarity gives ``D (A Π + λ I) = (R₀ − Λ Eᵀ) Π``,
    so with ``M = (A Π + λ I)⁻¹`` and ``X = R₀ Π M``:

        D = X − X E (Eᵀ Π M E + μ I)⁻¹ Eᵀ Π M

    (SPEED's closed form, with ``μ`` its ``lamb``; ``μ = 0`` makes ``D E = 0`` exact). Any input
    with ``Π c = 0`` has ``M c = c / λ``, so ``D c = 0``: the retained keys keep their outputs.

    Args:
        residual: ``R₀ = Σ w (v − W k) kᵀ``, ``[d_out, D]``.
        gram: ``A = Σ w k kᵀ`` plus any preserve/prior terms, ``[D, D]``.
        projector: ``Π`` (None: the identity, only invariant rows constrain the change).
        ridge: ``λ > 0``.
        invariant: ``[E, D]`` rows whose outputs stay, or None.
        invariant_ridge: ``μ ≥ 0``.
        label: Names the edit in errors.
    """
    if ridge <= 0:
        raise EditError(f"{label}: the null-space solve needs ridge > 0, got {ridge}")
    f64 = torch.float64
    dim = gram.shape[0]
    a = gram.to(f64)
    pi = torch.eye(dim, dtype=f64) if projector is None else projector.to(f64)
    lhs = a @ pi + ridge * torch.eye(dim, dtype=f64)  # A Π + λ I: eigenvalues ≥ λ for a projector Π
    lu, pivots, info = torch.linalg.lu_factor_ex(lhs)
    if info.item() != 0:
        raise SingularSystemError(f"{label}: A Π + λ I is singular; is the projector symmetric and idempotent?")
    rp = residual.to(f64) @ pi
    x = torch.linalg.lu_solve(lu, pivots, rp.T, adjoint=True).T  # X = R₀ Π M
    if invariant is None:
        return x
    e = invariant.to(f64).T  # [D, E]
    pe = pi @ e
    me = torch.linalg.lu_solve(lu, pivots, e)  # M E
    z = torch.linalg.lu_solve(lu, pivots, pe, adjoint=True).T  # Eᵀ Π M
    system = pe.T @ me + invariant_ridge * torch.eye(e.shape[1], dtype=f64)  # Eᵀ Π M E + μ I (symmetric)
    sym = 0.5 * (system + system.T)
    eig = torch.linalg.eigvalsh(sym)
    if eig.abs().max() == 0 or eig.abs().min() <= RCOND * eig.abs().max():
        raise SingularSystemError(
            f"{label}: the {e.shape[1]} invariant rows are (nearly) dependent once projected, so their "
            "equality constraints are singular; use fewer invariant rows or invariant_ridge > 0"
        )
    return x - (x @ e) @ torch.linalg.solve(system, z)


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
