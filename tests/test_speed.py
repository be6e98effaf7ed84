"""SPEED: the null-space closed form against hand-written maths, IPF/DPA/IEC, the retain set, errors.

The hand computations follow the reference's matrix expression (Ouxiang-Li/SPEED@6d3df0c,
``train_erase_null.py``, ``edit_model``) written out here with explicit inverses in float64:

    Δ = W (ΣaTᵀ − ΣtTᵀ) P (I − M K₂ (K₂ᵀ P M K₂ + λ I)⁻¹ K₂ᵀ P) M,   M = (ΣtTᵀ P + α I)⁻¹

with sums averaged over the erased prompts, ``P = U[:, S < t] U[:, S < t]ᵀ`` from the SVD of the
retain rows' ``(1/N) Σ c cᵀ`` and ``K₂`` the invariant rows as columns. None of it uses the
engine's solver. Measured values are in the comments; tolerances hold on any BLAS (float64).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conceptedit_builtin.speed import SpeedParams, auto_retain_rows, refine_retain, retain_texts
from hand import double_tiny_sd, encode_plainly
from torch import Tensor

import conceptedit
from conceptedit import EditError, KVEdit, SingularSystemError
from conceptedit.engine.kv_solver import KVSolver
from conceptedit.testing import isolated_host, tiny_recipe
from conceptedit.toolkit import edit_map, kmeans_centers, null_space_delta, null_space_projector, second_moment

F64 = torch.float64
ARTISTS = ["Van Gogh", "Picasso"]
RETAIN = ["Monet", "a dog", "a house", "Rembrandt", "a cat", "a tree"]
CONCEPTS = {"art": {"concepts": ARTISTS, "target": "art", "templates": ["{}", "a painting by {}"]}}


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


# --------------------------------------------------------------------------- hand maths


def _reference_projector(rows: Tensor, threshold: float) -> Tensor:
    """The reference's null space: SVD of (1/N) Σ c cᵀ, columns of U with singular value below the threshold."""
    u, s, _ = torch.svd(rows.T @ rows / rows.shape[0])
    return u[:, s < threshold] @ u[:, s < threshold].T


def _reference_delta(
    w: Tensor, erase: Tensor, anchor: Tensor, p: Tensor, k2: Tensor | None, alpha: float, lamb: float
) -> Tensor:
    """The reference's Δ for one weight (rows of ``erase``/``anchor`` paired, averaged over prompts)."""
    n, dim = erase.shape[0], erase.shape[1]
    eye = torch.eye(dim, dtype=F64)
    tt, at = erase.T @ erase / n, anchor.T @ erase / n
    m = torch.linalg.inv(tt @ p + alpha * eye)
    if k2 is None:
        return w @ (at - tt) @ p @ m
    kk = k2.T  # [D, E], the invariant rows as columns
    inner = torch.linalg.inv(kk.T @ p @ m @ kk + lamb * torch.eye(kk.shape[1], dtype=F64))
    return w @ (at - tt) @ p @ (eye - m @ kk @ inner @ kk.T @ p) @ m


def _problem(seed: int = 0, dim: int = 8, out: int = 6) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    retain = torch.randn(5, dim, generator=g, dtype=F64)  # rank 5 < 8: an exact null space of dim 3
    return {
        "w": torch.randn(out, dim, generator=g, dtype=F64),
        "erase": torch.randn(3, dim, generator=g, dtype=F64),
        "anchor": torch.randn(3, dim, generator=g, dtype=F64),
        "retain": retain,
        "invariant": torch.randn(2, dim, generator=g, dtype=F64),
    }


def _edit(x: dict[str, Tensor], **fields: Any) -> KVEdit:
    n = x["erase"].shape[0]
    base: dict[str, Any] = dict(
        keys=x["erase"], targets=x["anchor"], weights=torch.full((n,), 1.0 / n, dtype=F64), ridge=0.7
    )
    base.update(fields)
    return KVEdit(**base)


def test_solver_matches_the_reference_closed_form_with_null_space_and_invariants() -> None:
    x = _problem()
    p = _reference_projector(x["retain"], 1e-6)
    assert round(float(torch.trace(p))) == 3  # the three directions the retain rows do not use
    for lamb in (0.0, 0.3):
        edit = _edit(x, projector=p, invariant=x["invariant"], invariant_ridge=lamb)
        got = KVSolver(edit, 8).solve("layer", x["w"]) - x["w"]
        want = _reference_delta(x["w"], x["erase"], x["anchor"], p, x["invariant"], 0.7, lamb)
        assert float((got - want).norm() / want.norm()) < 1e-10, lamb  # measured ~1e-15
    # without the invariant rows it is the plain null-space (AlphaEdit-style) answer; with P = I and
    # no invariants the null-space solve is UCE's ridge solve
    plain = KVSolver(_edit(x, projector=p), 8).solve("layer", x["w"]) - x["w"]
    torch.testing.assert_close(plain, _reference_delta(x["w"], x["erase"], x["anchor"], p, None, 0.7, 0.0))
    identity = KVSolver(_edit(x, projector=torch.eye(8, dtype=F64)), 8).solve("layer", x["w"])
    torch.testing.assert_close(identity, KVSolver(_edit(x), 8).solve("layer", x["w"]), rtol=1e-10, atol=1e-10)
    assert float((plain - got).norm() / plain.norm()) > 1e-2  # the invariants do change the edit


def test_retained_and_invariant_rows_keep_their_outputs_and_the_answer_is_the_constrained_minimum() -> None:
    x = _problem(seed=3)
    p = _reference_projector(x["retain"], 1e-6)
    edit = _edit(x, projector=p, invariant=x["invariant"])
    w = x["w"]
    delta = KVSolver(edit, 8).solve("layer", w) - w
    scale = float(w.norm())
    assert float((delta @ x["retain"].T).norm()) < 1e-10 * scale  # retained rows: exact null space
    assert float((delta @ x["invariant"].T).norm()) < 1e-10 * scale  # IEC rows: exact equality
    erase_gap = lambda d: float(((w + d) @ x["erase"].T - w @ x["anchor"].T).norm())  # noqa: E731
    assert erase_gap(delta) < erase_gap(torch.zeros_like(w))  # erase rows moved toward their anchors
    # KKT: the objective's gradient in Δ lies in the span of the constraint normals (P e_j).
    d = delta.clone().requires_grad_(True)
    n = x["erase"].shape[0]
    objective = ((x["erase"] @ (w + d @ p).T - x["anchor"] @ w.T) ** 2).sum() / n + 0.7 * ((d @ p) ** 2).sum()
    objective.backward()
    assert d.grad is not None
    normals = p @ x["invariant"].T
    in_span = d.grad @ normals @ torch.linalg.pinv(normals)
    assert float((d.grad - in_span).norm()) < 1e-9 * float(d.grad.norm() + 1)
    # μ > 0 loosens the equality, so the invariant rows move
    loose = KVSolver(_edit(x, projector=p, invariant=x["invariant"], invariant_ridge=1.0), 8).solve("layer", w) - w
    assert float((loose @ x["invariant"].T).norm()) > 1e-3 * scale


def test_null_space_delta_checks_what_it_cannot_solve() -> None:
    x = _problem()
    p = _reference_projector(x["retain"], 1e-6)
    residual, gram = x["w"], torch.eye(8, dtype=F64)
    with pytest.raises(EditError, match="ridge > 0"):
        null_space_delta(residual, gram, p, 0.0)
    twice = torch.cat([x["invariant"][:1], x["invariant"][:1]])
    with pytest.raises(SingularSystemError, match="invariant_ridge > 0"):
        null_space_delta(residual, gram, p, 1.0, twice)
    null_space_delta(residual, gram, p, 1.0, twice, 0.1)  # loosened: solvable
    with pytest.raises(EditError, match="ridge > 0"):
        KVSolver(_edit(x, projector=p, ridge=0.0), 8)
    with pytest.raises(EditError, match="at most one"):
        KVSolver(_edit(x, projector=p, projector_fn=lambda name, w: p), 8)
    with pytest.raises(EditError, match="projector must be"):
        KVSolver(_edit(x, projector=torch.eye(3, dtype=F64)), 8)
    with pytest.raises(EditError, match="edit_map needs"):
        edit_map(_edit(x, projector=p), 8)


def test_null_space_projector_cuts_at_the_threshold() -> None:
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    values = torch.tensor([5.0, 2.0, 0.5, 0.09, 0.01, 0.0], dtype=F64)
    moment = q @ torch.diag(values) @ q.T
    p = null_space_projector(moment, 0.1)
    low = q[:, 3:]
    torch.testing.assert_close(p, low @ low.T, rtol=0, atol=1e-12)  # the eigenvalues 0.09, 0.01, 0
    torch.testing.assert_close(null_space_projector(moment, 0.3, "relative"), q[:, 2:] @ q[:, 2:].T, rtol=0, atol=1e-12)
    rows = torch.randn(10, 6, generator=g, dtype=F64)
    torch.testing.assert_close(second_moment(rows), rows.T @ rows / 10)
    torch.testing.assert_close(null_space_projector(second_moment(rows), 0.2), _reference_projector(rows, 0.2))


def test_kmeans_stops_at_centres_that_are_their_members_means() -> None:
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(40, 3, generator=g, dtype=F64) + torch.arange(40, dtype=F64)[:, None] / 4
    found = kmeans_centers(rows, 3, generator=torch.Generator().manual_seed(0), tol=1e-20)
    members = torch.cdist(rows, found).argmin(dim=1)
    assert sorted(set(members.tolist())) == [0, 1, 2]
    for i in range(3):  # Lloyd's fixed point: each centre is the mean of the rows nearest to it
        torch.testing.assert_close(found[i], rows[members == i].mean(0), rtol=1e-12, atol=1e-12)
    again = kmeans_centers(rows, 3, generator=torch.Generator().manual_seed(0), tol=1e-20)
    torch.testing.assert_close(found, again, rtol=0, atol=0)
    with pytest.raises(EditError, match="cannot take"):
        kmeans_centers(rows[:2], 3, generator=g)


# --------------------------------------------------------------------------- IPF and DPA


def _influence(erase: Tensor, anchor: Tensor) -> Tensor:
    """The reference's IPF map ``(ΣaTᵀ − ΣtTᵀ)(I + ΣtTᵀ)⁻¹`` (averaged over prompts)."""
    n, dim = erase.shape
    tt, at = erase.T @ erase / n, anchor.T @ erase / n
    return (at - tt) @ torch.linalg.inv(torch.eye(dim, dtype=F64) + tt)


def test_ipf_keeps_the_rows_an_unconstrained_erasure_moves_most() -> None:
    x = _problem(seed=4)
    n = x["erase"].shape[0]
    unconstrained = KVEdit(
        keys=x["erase"], targets=x["anchor"], weights=torch.full((n,), 1.0 / n, dtype=F64), ridge=1.0
    )
    influence = edit_map(unconstrained, 8) - torch.eye(8, dtype=F64)
    torch.testing.assert_close(influence, _influence(x["erase"], x["anchor"]), rtol=1e-12, atol=1e-12)
    rows = torch.randn(12, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    kept = refine_retain(
        rows, x["w"], influence, ipf=True, augment=0, scale=1.0, group=None, generator=torch.Generator()
    )
    moved = (rows @ (x["w"] @ _influence(x["erase"], x["anchor"])).T).norm(dim=1)
    want = rows[moved > moved.mean()]
    assert 0 < want.shape[0] < rows.shape[0]
    torch.testing.assert_close(kept, want, rtol=0, atol=0)
    everything = refine_retain(
        rows, x["w"], influence, ipf=False, augment=0, scale=1.0, group=None, generator=torch.Generator()
    )
    torch.testing.assert_close(everything, rows, rtol=0, atol=0)


def test_dpa_adds_copies_along_the_least_seen_direction_and_keeps_the_most_influenced() -> None:
    x = _problem(seed=6)
    w = x["w"]
    influence = _influence(x["erase"], x["anchor"])
    rows = torch.randn(7, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    got = refine_retain(
        rows, w, influence, ipf=False, augment=4, scale=0.5, group=3, generator=torch.Generator().manual_seed(9)
    )
    # by hand: groups of 3, 3 and 1 rows; 4 copies each, c + z v with z ~ N(0, 0.5²) drawn in group order
    v = torch.svd(w).V[:, -1]  # right singular vector of the smallest singular value
    g = torch.Generator().manual_seed(9)
    erase_weight = w @ influence
    want = [rows]
    for start in (0, 3, 6):
        copies = rows[start : start + 3].repeat(4, 1)
        copies = copies + 0.5 * torch.randn(copies.shape[0], generator=g, dtype=F64)[:, None] * v[None, :]
        score = (copies @ erase_weight.T).norm(dim=1)
        want.append(copies[score > score.mean()])
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-12, atol=1e-12)
    assert rows.shape[0] < got.shape[0] < rows.shape[0] * 5
    # every copy differs from some row by a multiple of v, which W shrinks to its smallest singular value
    extra = got[rows.shape[0] :]
    offsets = extra[:, None, :] - rows[None, :, :]
    off_v = offsets - (offsets @ v)[..., None] * v
    assert bool((off_v.norm(dim=-1).min(dim=1).values < 1e-12).all())
    sigma_min = float(torch.linalg.svdvals(w).min())
    assert float((w @ v).norm()) == pytest.approx(sigma_min, rel=1e-12)


# --------------------------------------------------------------------------- retain set and params


def test_retain_set_defaults_file_columns_and_exclusion(tmp_path: Path) -> None:
    ctx: Any = SimpleNamespace(cache_dir=tmp_path, base_dir=tmp_path, label="speed")

    def texts(**params: Any) -> list[str]:
        return retain_texts(ctx, SpeedParams(concepts="art", **params), ["Van Gogh", "cat"])

    assert texts() == [""]  # the reference keeps only the empty prompt when given nothing
    assert auto_retain_rows([""]) == "after_sot" and auto_retain_rows(["", "a dog"]) == "last_word"
    (tmp_path / "retain.csv").write_text(
        "id,concept,other\n1,Monet,a dog\n2,Van Gogh,a van\n3,Monet,\n4,a Cat sitting,catalogue\n", encoding="utf-8"
    )
    # a file replaces the default '' ; whole words only, any case; each prompt once; empty cells skipped
    assert texts(retain_file="retain.csv") == ["Monet"]
    assert texts(retain_file="retain.csv", retain_columns=["concept", "other"]) == [
        "Monet",
        "a dog",
        "a van",
        "catalogue",
    ]
    assert texts(retain=["", "a dog"], retain_file="retain.csv") == ["", "a dog", "Monet"]
    assert texts(retain=["Van Gogh's sunflowers"], exclude_erased=False) == ["Van Gogh's sunflowers"]
    with pytest.raises(EditError, match="retain set is empty"):
        texts(retain=["Van Gogh's sunflowers", "a CAT"])


def test_bad_params_are_recipe_errors() -> None:
    for bad in (
        {"threshold": 0},
        {"retain_scale": 0},
        {"threshold_rule": "energy"},
        {"rows": "last_token"},
        {"retain_rows": "middle"},
        {"augment": -1},
        {"projections": []},
        {"iec_ridge": -0.1},
        {"retain_scale_typo": 1.0},
    ):
        with pytest.raises(conceptedit.RecipeError):
            conceptedit.load_recipe(
                tiny_recipe({"method": "speed", "params": {"concepts": "art", **bad}}, concepts=CONCEPTS)
            )


# --------------------------------------------------------------------------- on builtin:tiny-sd


def _kv(pipe: Any) -> dict[str, Tensor]:
    return {
        name: module.weight.detach().to(F64).clone()
        for name, module in pipe.unet.named_modules()
        if "attn2" in name and (name.endswith("to_k") or name.endswith("to_v"))
    }


def _last_word(pipe: Any, prompts: list[str]) -> Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = encode_plainly(pipe, prompts).to(F64)
    eot = (ids == pipe.tokenizer.eos_token_id).int().argmax(1)
    return hidden[torch.arange(len(prompts)), (eot - 1).clamp(min=0)]


def _speed(tmp_path: Path, label: str, seed: int = 0, **params: Any) -> dict[str, Tensor]:
    recipe = tiny_recipe({"method": "speed", "params": {"concepts": "art", **params}}, concepts=CONCEPTS, seed=seed)
    result = conceptedit.apply(recipe, pipeline=double_tiny_sd(), out=tmp_path / label, quiet=True)
    return _kv(result.pipeline)


def test_speed_on_tiny_sd_matches_the_reference_formula(tmp_path: Path) -> None:
    """IPF and DPA off (they draw random numbers) and IEC on [SOT] alone (k-means starts at random):
    everything else is the reference's expression, layer by layer, with the reference's SVD."""
    base_pipe = double_tiny_sd()
    base = _kv(base_pipe)
    prompts = [t.format(a) for a in ARTISTS for t in ("{}", "a painting by {}")]
    erase = _last_word(base_pipe, prompts)
    anchor = _last_word(base_pipe, [t.format("art") for _ in ARTISTS for t in ("{}", "a painting by {}")])
    retain = _last_word(base_pipe, RETAIN)
    sot = encode_plainly(base_pipe, [""])[0, :1].to(F64)
    p = _reference_projector(retain, 1e-3)  # eigenvalues: 26 below 1e-14, the next 0.15
    assert round(float(torch.trace(p))) == 32 - len(RETAIN)
    params = dict(retain=RETAIN, threshold=1e-3, ipf=False, augment=0, iec_clusters=0, projections=["k", "v"])
    got = _speed(tmp_path, "speed", **params)
    assert got.keys() == base.keys()
    for name, w in base.items():
        want = _reference_delta(w, erase, anchor, p, sot, 1.0, 0.0)
        delta = got[name] - w
        # measured 4e-15; an encoding rounded to the other float32 neighbour on another BLAS would give ~1e-7
        assert float((delta - want).norm() / want.norm()) < 1e-6, name
        assert float((delta @ sot.T).norm() / (w @ sot.T).norm()) < 1e-10, name  # [SOT] output kept exactly
        assert float((delta @ retain.T).norm() / (w @ retain.T).norm()) < 1e-8, name  # retained concepts kept
        before = (w @ erase.T - w @ anchor.T).norm()
        assert float((got[name] @ erase.T - w @ anchor.T).norm()) < 0.7 * float(before), name  # measured 0.44-0.49
    # the reference's defaults: only to_v; α and λ enter as the formula says
    only_v = _speed(tmp_path, "v", **{**params, "projections": ["v"], "retain_scale": 0.05, "iec_ridge": 0.5})
    for name, w in only_v.items():
        if name.endswith("to_k"):
            torch.testing.assert_close(w, base[name], rtol=0, atol=0)
        else:
            want = _reference_delta(base[name], erase, anchor, p, sot, 0.05, 0.5)
            assert float((w - base[name] - want).norm() / want.norm()) < 1e-6, name


def test_speed_defaults_keep_the_invariant_rows_and_repeat_with_the_seed(tmp_path: Path) -> None:
    """Defaults: IPF, DPA (10 copies), IEC with 3 k-means centres of the empty prompt, retain '' (76 rows)."""
    base_pipe = double_tiny_sd()
    base = _kv(base_pipe)
    empty = encode_plainly(base_pipe, [""])[0].to(F64)
    first, again, other = (_speed(tmp_path, f"run{i}", seed=s) for i, s in enumerate((0, 0, 1)))
    assert all(name.endswith("to_v") for name, w in first.items() if not torch.equal(w, base[name]))
    for name, w in base.items():
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)  # the same seed, the same edit
        if name.endswith("to_k"):
            continue
        delta = first[name] - w
        assert float(delta.norm() / w.norm()) > 0.05, name  # an edit happened (measured 0.23)
        assert float((delta @ empty[:1].T).norm() / (w @ empty[:1].T).norm()) < 1e-10, name  # [SOT] kept
        # the empty prompt's other rows are retained (null space) and constrained through their centres
        kept = float((delta @ empty[1:].T).norm() / (w @ empty[1:].T).norm())
        assert kept < 0.06, (name, kept)  # measured 0.018-0.032 (the null space is approximate: t = 0.1)
    assert any(not torch.equal(first[n], other[n]) for n in first)  # DPA draws from the run's seed
