"""The shared closed-form key/value solver: its answer is the objective's minimiser."""

from __future__ import annotations

import pytest
import torch

from conceptedit import EditError, KVEdit, SingularSystemError
from conceptedit.engine.kv_solver import KVSolver

D, OUT = 16, 12


def _objective(new: torch.Tensor, w: torch.Tensor, edit: KVEdit) -> torch.Tensor:
    keys = edit.keys.double()
    values = (w @ edit.targets.double().T).T if edit.targets is not None else edit.target_fn("x", w).double()
    weights = edit.weights.double() if edit.weights is not None else torch.ones(len(keys), dtype=torch.float64)
    total = (weights * ((keys @ new.T - values) ** 2).sum(1)).sum()
    delta = new - w
    if edit.preserve is not None:
        total = total + edit.preserve_scale * ((edit.preserve.double() @ delta.T) ** 2).sum()
    if edit.prior is not None:
        total = total + edit.prior_scale * torch.trace(delta @ edit.prior.double() @ delta.T)
    return total + edit.ridge * (delta**2).sum()


def _problem(seed: int = 0, **overrides: object) -> tuple[torch.Tensor, KVEdit]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, D, generator=g, dtype=torch.float64)
    h = torch.randn(200, D, generator=g)
    fields: dict[str, object] = dict(
        keys=torch.randn(5, D, generator=g),
        targets=torch.randn(5, D, generator=g),
        weights=torch.rand(5, generator=g) + 0.5,
        preserve=torch.randn(3, D, generator=g),
        preserve_scale=0.7,
        prior=h.T @ h,
        prior_scale=0.01,
        ridge=0.1,
    )
    fields.update(overrides)
    return w, KVEdit(**fields)  # type: ignore[arg-type]


def test_solution_satisfies_normal_equations() -> None:
    w, edit = _problem()
    new = KVSolver(edit, D).solve("layer", w).detach().requires_grad_(True)
    _objective(new, w, edit).backward()
    assert new.grad is not None
    # the gradient at the minimiser vanishes (relative to the gradient at the start)
    start = w.clone().requires_grad_(True)
    _objective(start, w, edit).backward()
    assert start.grad is not None and start.grad.norm() > 1.0
    assert new.grad.norm() / start.grad.norm() < 1e-9


def test_shared_and_per_layer_paths_agree() -> None:
    w, edit = _problem()
    fast = KVSolver(edit, D).solve("layer", w)
    targets = edit.targets
    assert targets is not None
    explicit = KVEdit(
        keys=edit.keys,
        target_fn=lambda name, weight: targets.double() @ weight.double().T,
        weights=edit.weights,
        preserve=edit.preserve,
        preserve_scale=edit.preserve_scale,
        prior=edit.prior,
        prior_scale=edit.prior_scale,
        ridge=edit.ridge,
    )
    slow = KVSolver(explicit, D).solve("layer", w)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_moves_keys_toward_targets_and_keeps_preserved_outputs() -> None:
    w, edit = _problem(preserve_scale=1e4, prior=None, ridge=1e-6)
    new = KVSolver(edit, D).solve("layer", w)
    assert edit.targets is not None and edit.preserve is not None
    before = (edit.keys.double() @ w.T - edit.targets.double() @ w.T).norm()
    after = (edit.keys.double() @ new.T - edit.targets.double() @ w.T).norm()
    assert after < 0.2 * before
    kept = (edit.preserve.double() @ (new - w).T).norm() / (edit.preserve.double() @ w.T).norm()
    assert kept < 1e-3


def test_singular_system_is_refused_with_advice() -> None:
    w, edit = _problem(preserve=None, prior=None, ridge=0.0)
    with pytest.raises(SingularSystemError, match="ridge"):
        KVSolver(edit, D).solve("layer", w)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("keys", torch.randn(4, D + 1), "keys must be"),
        ("targets", torch.randn(4, D), "targets must be"),
        ("weights", torch.ones(3), "weights must be"),
        ("prior", torch.eye(D + 2), "prior must be"),
        ("ridge", -1.0, "ridge must be >= 0"),
        ("projections", ("q",), "projections"),
        ("keys", torch.full((5, D), float("nan")), "NaN"),
    ],
)
def test_bad_inputs_are_named(field: str, value: object, message: str) -> None:
    _w, edit = _problem(**{field: value})
    with pytest.raises(EditError, match=message):
        KVSolver(edit, D)
