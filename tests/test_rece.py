"""RECE on builtin:tiny-sd: the closed-form adversarial embedding and rounds that build on each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conceptedit_builtin.rece as rece_module
import pytest
import torch

import conceptedit
import conceptedit.toolkit
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

CONCEPTS = {"n": {"concepts": ["nudity", "a naked body"], "target": " "}}
UCE = {"method": "uce", "params": {"concepts": "n", "rows": "last_word_to_end", "preserve_rows": "all"}}


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _rece(**params: Any) -> dict[str, Any]:
    return {"method": "rece", "params": {"concepts": "n", **params}}


def _kv_names(pipe: Any) -> list[str]:
    return [n for n, _ in pipe.unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]


def _weights(pipe: Any) -> list[torch.Tensor]:
    return [pipe.unet.get_parameter(n).detach().double().clone() for n in _kv_names(pipe)]


def _run(tmp_path: Path, label: str, *edits: dict[str, Any]) -> Any:
    return conceptedit.apply(
        tiny_recipe(*edits, concepts=CONCEPTS), pipeline=build_tiny_sd(), out=tmp_path / label, quiet=True
    ).pipeline


def _mismatch(current: list[torch.Tensor], original: list[torch.Tensor], x: torch.Tensor, c: torch.Tensor) -> Any:
    return sum(((x @ a.T - c @ b.T) ** 2).sum() for a, b in zip(current, original, strict=True))


def test_adversarial_embedding_is_the_closed_form_minimiser(tmp_path: Path) -> None:
    """300 plain gradient steps on the same objective from a random start land on the closed form."""
    base = build_tiny_sd()
    w0, w1 = _weights(base), _weights(_run(tmp_path, "uce", UCE))
    concept = StableDiffusionAdapter(base).encode_prompts(["nudity"]).hidden[0, :6].double()
    reg = 0.1
    closed = conceptedit.toolkit.matching_inputs(w1, w0, concept, reg)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return _mismatch(w1, w0, x, concept) + reg * (x**2).sum()

    hessian = sum(a.T @ a for a in w1) + reg * torch.eye(concept.shape[-1], dtype=torch.float64)
    x = torch.randn(concept.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()
    # condition number ~350 here: Nesterov momentum at step 1/L converges in a few hundred steps
    opt = torch.optim.SGD([x], lr=0.5 / float(torch.linalg.eigvalsh(hessian).max()), momentum=0.9, nesterov=True)
    with torch.no_grad():
        start = float(objective(x))
    for _ in range(300):
        opt.zero_grad()
        objective(x).backward()
        opt.step()
    found = x.detach()
    best = float(objective(closed))
    assert start > 5 * best  # a random start is far from the optimum ...
    assert float(objective(found)) - best < 1e-9 * (start - best)  # ... and the descent closed the gap
    assert best <= float(objective(found)) * (1 + 1e-12)
    torch.testing.assert_close(closed, found, rtol=1e-6, atol=1e-6)  # measured 7e-15 relative
    # and it is not a trivial answer: the concept itself does worse on the edited weights
    assert float(objective(concept)) > 1.01 * float(objective(closed))


def test_each_round_starts_from_the_previous_rounds_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = []
    real = rece_module.matching_inputs

    def spy(current: list[torch.Tensor], original: list[torch.Tensor], inputs: torch.Tensor, reg: float) -> Any:
        out = real(current, original, inputs, reg)
        calls.append(([w.double().clone() for w in current], [w.double().clone() for w in original], out.clone()))
        return out

    monkeypatch.setattr(rece_module, "matching_inputs", spy)
    two = _weights(_run(tmp_path, "two", UCE, _rece(rounds=2)))
    assert len(calls) == 2
    monkeypatch.setattr(rece_module, "matching_inputs", real)
    base = _weights(build_tiny_sd())
    after_uce = _weights(_run(tmp_path, "uce", UCE))
    after_one = _weights(_run(tmp_path, "one", UCE, _rece(rounds=1)))

    for got, want in zip(calls[0][0], after_uce, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # round 1 starts from the UCE model
    for got, want in zip(calls[1][0], after_one, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # round 2 from round 1's result
    for _, original, _ in calls:
        for got, want in zip(original, base, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # W0 is the model before the run
    assert not torch.equal(calls[0][2], calls[1][2])  # a new adversarial embedding each round
    assert any(not torch.equal(a, b) for a, b in zip(two, after_one, strict=True))


def test_a_round_erases_its_adversarial_embedding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After round 1 the embedding it found no longer reproduces the concept's original projections."""
    found: list[torch.Tensor] = []
    real = rece_module.matching_inputs
    monkeypatch.setattr(rece_module, "matching_inputs", lambda *a: found.append(real(*a)) or found[-1])
    after = _weights(_run(tmp_path, "one", UCE, _rece(rounds=1)))
    base = build_tiny_sd()
    before = _weights(_run(tmp_path, "uce", UCE))
    original = _weights(base)
    prompts = [p for p in CONCEPTS["n"]["concepts"]]  # templates default to "{}"
    concept = StableDiffusionAdapter(base).encode_prompts(prompts).hidden.double()
    adversarial = found[0].double()
    recovered_before = _mismatch(before, original, adversarial, concept)
    recovered_after = _mismatch(after, original, adversarial, concept)
    assert recovered_after > 3 * recovered_before, (float(recovered_before), float(recovered_after))


def test_preserve_per_concept_counts_the_preserve_prompts_once_per_erase_prompt(tmp_path: Path) -> None:
    """RECE's train.py keeps one ' ' per concept: with two concepts, twice the preserve weight."""
    per_concept = _weights(_run(tmp_path, "per", UCE, _rece(rounds=1, preserve_repeat="per_concept")))
    doubled = _weights(_run(tmp_path, "doubled", UCE, _rece(rounds=1, preserve_scale=0.2)))
    once = _weights(_run(tmp_path, "once", UCE, _rece(rounds=1)))
    assert len(CONCEPTS["n"]["concepts"]) == 2
    for a, b in zip(per_concept, doubled, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # 0.1 × 2 is exactly 0.2: the same system
    assert any(not torch.equal(a, b) for a, b in zip(per_concept, once, strict=True))


def test_bad_rece_settings_are_recipe_errors() -> None:
    with pytest.raises(conceptedit.RecipeError, match="rounds"):
        conceptedit.load_recipe(tiny_recipe(_rece(rounds=0), concepts=CONCEPTS))
    with pytest.raises(conceptedit.RecipeError, match="reference"):
        conceptedit.load_recipe(tiny_recipe(_rece(reference="original"), concepts=CONCEPTS))
    with pytest.raises(conceptedit.RecipeError, match=r"preserve_repeat.*'once' or 'per_concept'"):
        conceptedit.load_recipe(tiny_recipe(_rece(preserve_repeat="twice"), concepts=CONCEPTS))
    with pytest.raises(conceptedit.RecipeError, match="no concept set named 'm'"):
        conceptedit.load_recipe(tiny_recipe(_rece(concepts="m"), concepts=CONCEPTS))
