"""AdaVD's two formulations: the paper's per-branch edit and the authors' code ([uncond; cond] pairs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conceptedit_builtin.adavd import AdaVDParams, AdaVDSettings, _CfgBatch, _ValueEdit
from torch import Tensor

import conceptedit
from conceptedit.engine.guards import DenoisingState
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

HEADS, HEAD_DIM, LENGTH, IMAGES = 8, 40, 77, 2  # SD-1.x's first block: 8 heads × 40 = 320
DIM = HEADS * HEAD_DIM
CONCEPT_AT = 3  # the position of image 0's prompt that carries the concept


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


# ------------------------------------------------------------------ SD-shaped values, float64


def _values(concepts: int) -> tuple[Tensor, Tensor, Tensor]:
    """A CFG batch of values ``[2n, L, d]`` (uncond rows first), the concepts' values ``[K, d]``, and
    the uncond value ``[L, d]``. As in SD, every prompt's start row is the same, the padding rows of
    all prompts are alike, and image 0 has the first concept at one position."""
    g = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    start, padding = randn(DIM), randn(LENGTH, DIM)
    concept = randn(concepts, DIM)
    uncond = padding + 0.5 * randn(LENGTH, DIM)
    uncond[0] = start
    rows = [uncond.clone() for _ in range(IMAGES)]
    for image in range(IMAGES):
        cond = padding + 0.5 * randn(LENGTH, DIM)
        cond[0] = start
        cond[1:6] = randn(5, DIM)  # the prompt's words
        if image == 0:
            cond[CONCEPT_AT] = 1.1 * concept[0] + 0.1 * randn(DIM)
        rows.append(cond)
    return torch.stack(rows), concept, uncond


def _heads(values: Tensor) -> Tensor:
    """``[B, L, d]`` → ``[B·H, L, d/H]``, batch-major, the layout the reference's processor reads."""
    b = values.shape[0]
    return values.reshape(b, LENGTH, HEADS, HEAD_DIM).permute(0, 2, 1, 3).reshape(b * HEADS, LENGTH, HEAD_DIM)


def _unheads(heads: Tensor) -> Tensor:
    b = heads.shape[0] // HEADS
    return heads.reshape(b, HEADS, LENGTH, HEAD_DIM).permute(0, 2, 1, 3).reshape(b, LENGTH, DIM)


def _by_hand(current: Tensor, recorded: Tensor, concepts: int, shift: bool) -> Tensor:
    """The reference's edit written out position by position on head-split values.

    ``current``: ``[2n·H, L, dh]`` (n uncond images, then n prompt images). ``recorded``: what the
    reference records once, ``[2K·H, L, dh]``: K copies of the uncond value, then each concept's
    value spread over positions 1..76. For image j and position l ≥ 1 it stacks every head of the
    uncond row and then of the prompt row into one vector p of length 2d, and each target t_k the
    same way; b_k subtracts from t_k its projections on the raw t_i (i < k); the removed part is
    Σ_k (⟨b_k,p⟩/⟨b_k,b_k⟩) Σ_i P_ki g_i t_i with g_i = 2σ(100 (cos(t_i, p) − 0.93)) or 1.
    """

    def stack(block: Tensor, rows: list[int], pos: int) -> Tensor:
        return torch.cat([block[r, pos] for r in rows])

    n = current.shape[0] // (2 * HEADS)
    out = current.clone()
    for j in range(n):
        uncond_rows = [j * HEADS + h for h in range(HEADS)]
        cond_rows = [(n + j) * HEADS + h for h in range(HEADS)]
        for pos in range(1, LENGTH):
            p = torch.cat([stack(current, uncond_rows, pos), stack(current, cond_rows, pos)])
            t = [
                torch.cat(
                    [
                        stack(recorded, [k * HEADS + h for h in range(HEADS)], pos),
                        stack(recorded, [(concepts + k) * HEADS + h for h in range(HEADS)], pos),
                    ]
                )
                for k in range(concepts)
            ]
            mix = torch.eye(concepts, dtype=torch.float64)
            for a in range(1, concepts):
                for b in range(a):
                    mix[a, b] = -torch.dot(t[b], t[a]) / torch.dot(t[b], t[b])
            basis = [sum(mix[a, b] * t[b] for b in range(concepts)) for a in range(concepts)]
            gates = [
                2.0 / (1.0 + torch.exp(-100.0 * (torch.dot(tk, p) / (tk.norm() * p.norm()) - 0.93))) if shift else 1.0
                for tk in t
            ]
            removed = sum(
                (torch.dot(basis[a], p) / torch.dot(basis[a], basis[a]))
                * sum(mix[a, b] * gates[b] * t[b] for b in range(concepts))
                for a in range(concepts)
            )
            new = p - removed
            for i, r in enumerate(uncond_rows + cond_rows):
                out[r, pos] = new[i * HEAD_DIM : (i + 1) * HEAD_DIM]
    return out


def _identity_to_v() -> torch.nn.Linear:
    to_v = torch.nn.Linear(DIM, DIM, bias=False).double()
    with torch.no_grad():
        to_v.weight.copy_(torch.eye(DIM, dtype=torch.float64))
    return to_v


def _run(values: Tensor, concept: Tensor, half: int | None, **settings: Any) -> Tensor:
    batch = _CfgBatch(pipeline=None, state=DenoisingState())
    batch.half = half
    edit = _ValueEdit(concept, AdaVDParams(erase=["x"] * len(concept), **settings).resolved(), batch)
    with torch.no_grad():
        out = edit(_identity_to_v(), (values,), values.clone())
    return values if out is None else out


def _change(before: Tensor, after: Tensor) -> float:
    return float((after - before).norm() / before.norm())


# Both sides are float64 and differ only in summation order and layout (≈1e-15 relative); 1e-10 leaves
# five orders of magnitude of margin, while any change to the formula moves the result by ≥ 1e-3.
TOL = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("concepts", [1, 2])
@pytest.mark.parametrize("shift", [False, True])
def test_reference_formulation_reproduces_the_authors_code(concepts: int, shift: bool) -> None:
    values, concept, uncond = _values(concepts)
    spread = concept[:, None, :].expand(-1, LENGTH, -1).clone()
    spread[:, 0] = values[0, 0]  # the spread prompt keeps its own start row (never edited anyway)
    recorded = _heads(torch.cat([uncond.expand(concepts, -1, -1), spread]))
    expected = _unheads(_by_hand(_heads(values), recorded, concepts, shift))
    got = _run(values, concept, IMAGES, formulation="reference", adaptive_shift=shift)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(("shift", "at_least"), [(False, 0.3), (True, 0.05)])
def test_reference_edits_the_unconditional_branch_and_the_paper_does_not(shift: bool, at_least: float) -> None:
    values, concept, _ = _values(1)
    uncond, cond = values[:IMAGES], values[IMAGES:]
    reference = _run(values, concept, IMAGES, formulation="reference", adaptive_shift=shift)
    paper = _run(values, concept, IMAGES)
    # Measured on these values: the uncond rows change by 53 % without the shift and by 16 % with it
    # (23 % for image 0, whose prompt has the concept, 0 for image 1); the audit saw 66 % / 23 % on its
    # values. With the shift, image 0's concept token changes by 1.90 (reference) and 1.99 (paper).
    assert _change(uncond, reference[:IMAGES]) > at_least
    assert torch.equal(paper[:IMAGES], uncond)
    if shift:
        # The gate fires only where the prompt carries the concept: image 0's uncond row at that
        # position flips sign ((1 − w) u with w ≈ 2); the other image's uncond rows stay as they were.
        flipped = reference[0, CONCEPT_AT] @ uncond[0, CONCEPT_AT] / uncond[0, CONCEPT_AT].norm() ** 2
        assert -1.3 < float(flipped) < -0.7  # measured -1.09
        assert _change(uncond[1], reference[1]) < 1e-6
        token = (cond[0, CONCEPT_AT], reference[IMAGES, CONCEPT_AT], paper[IMAGES, CONCEPT_AT])
        assert _change(token[0], token[1]) > 1.5 and _change(token[0], token[2]) > 1.5


def test_reference_without_guidance_edits_each_row_on_its_own() -> None:
    # No unconditional half to pair with: the formula with u = 0, i.e. v − g ⟨v, c⟩/⟨c, c⟩ c per token.
    values, concept, _ = _values(1)
    got = _run(values, concept, None, formulation="reference", adaptive_shift=True)
    c = concept[0]
    cos = (values @ c) / (values.norm(dim=-1) * c.norm())
    weight = 2.0 * torch.sigmoid(100.0 * (cos - 0.93)) * (values @ c) / (c @ c)
    weight[:, 0] = 0.0
    torch.testing.assert_close(got, values - weight[..., None] * c, **TOL)


def test_paper_without_the_shift_removes_the_whole_component_but_at_the_start_token() -> None:
    values, concept, _ = _values(2)
    got = _run(values, concept, IMAGES, adaptive_shift=False)
    q, _ = torch.linalg.qr(concept.T)  # orthonormal basis of the two concept values
    expected = values - (values @ q) @ q.T
    expected[:, 0] = values[:, 0]
    torch.testing.assert_close(got, expected, **TOL)


# ------------------------------------------------------------------------------- parameters


def test_settings_that_would_be_ignored_are_refused_with_the_field_named() -> None:
    def edit(**params: Any) -> Any:
        return tiny_recipe({"method": "adavd", "params": {"erase": ["cat"], **params}})

    for params, field in [
        ({"formulation": "reference", "cutoff": 1e-3}, "cutoff"),
        ({"adaptive_shift": False, "cutoff": 0.0}, "cutoff"),
        ({"formulation": "reference", "shift_slope": 50}, "shift_slope"),
        ({"adaptive_shift": False, "shift_center": 0.9}, "shift_center"),
    ]:
        with pytest.raises(conceptedit.RecipeError, match=field) as caught:
            conceptedit.load_recipe(edit(**params))
        assert any(issue.path.endswith(f"params.{field}") for issue in caught.value.issues), caught.value.issues
    with pytest.raises(conceptedit.RecipeError, match="formulation"):
        conceptedit.load_recipe(edit(formulation="authors"))
    conceptedit.load_recipe(edit(formulation="reference", adaptive_shift=True, shift_slope=50))


def test_resolved_settings_fill_in_each_formulations_defaults() -> None:
    paper = AdaVDParams(erase=["cat"]).resolved()
    assert (paper.formulation, paper.adaptive_shift, paper.cutoff) == ("paper", True, 1e-3)
    reference = AdaVDParams(erase=["cat"], formulation="reference").resolved()
    assert (reference.adaptive_shift, reference.cutoff) == (False, 0.0)
    assert AdaVDParams(erase=["cat"], formulation="reference", adaptive_shift=True).resolved().adaptive_shift
    # A guard written before the formulation existed holds only the paper's settings.
    old = {"erase": ["cat"], "shift_slope": 100.0, "shift_center": 0.93, "shift_max": 2.0, "cutoff": 1e-3}
    assert AdaVDSettings.model_validate(old) == paper


# --------------------------------------------------------------------------------- pipeline


def _image(pipe: Any, prompt: str | list[str], steps: int = 3) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, generator=generator, output_type="np")
    return out.images


def _seen_batches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    seen: list[tuple[int, int | None]] = []
    real = _ValueEdit.__call__

    def watch(self: _ValueEdit, module: Any, inputs: Any, output: Tensor) -> Tensor | None:
        if not self.busy:
            seen.append((output.shape[0], self.batch.half if self.batch is not None else None))
        return real(self, module, inputs, output)

    monkeypatch.setattr(_ValueEdit, "__call__", watch)
    return seen


def test_reference_formulation_in_the_pipeline_pairs_rows_and_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit = {"method": "adavd", "params": {"erase": ["cat"], "formulation": "reference"}}
    result = conceptedit.apply(tiny_recipe(edit), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    seen = _seen_batches(monkeypatch)
    images = _image(result.pipeline, ["a photo of a dog", "cat in a garden"])
    assert seen and set(seen) == {(4, 2)}  # two images: 4 value rows, uncond rows 0-1 pair with 2-3
    base = _image(build_tiny_sd(), ["a photo of a dog", "cat in a garden"])
    # Without the shift every token (and the uncond branch) loses part of the concept direction,
    # so even the unrelated prompt changes (measured: max 0.30 on a 0-1 scale).
    assert np.abs(images[0] - base[0]).max() > 0.01
    reloaded = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    assert np.array_equal(_image(reloaded, ["a photo of a dog", "cat in a garden"]), images)


def test_reference_formulation_finds_the_pairs_when_sld_adds_a_branch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sld = {"method": "sld", "params": {"safety_concept": "violence", "preset": "max"}}
    edit = {"method": "adavd", "params": {"erase": ["cat"], "formulation": "reference"}}
    for order, label in [((sld, edit), "sld-first"), ((edit, sld), "adavd-first")]:
        pipe = conceptedit.apply(tiny_recipe(*order), pipeline=build_tiny_sd(), out=tmp_path / label, quiet=True)
        seen = _seen_batches(monkeypatch)
        _image(pipe.pipeline, "cat in a garden", steps=2)
        assert set(seen) == {(3, 1)}, (label, set(seen))  # uncond, prompt, SLD's safety branch: 1 image
        monkeypatch.undo()
