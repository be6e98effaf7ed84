"""Robust TRCE: stage 1 maps closed-form adversarial embeddings too, stage 2 steers the prediction under
the shared adversary's prompts. Formulas by hand on builtin:tiny-sd."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COCO_30K
from test_trce import PAIRS, TEMPLATES, _eot_embeddings, _kv_weights, _prior, _recipe, _stage1, _stage2

import conceptedit
from conceptedit.attacks import registry
from conceptedit.data.prompt_files import read_prompts
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.toolkit import ConceptInversion, SoftPromptPGD


def test_adversarial_rounds_map_the_closed_form_adversarial_eot_rows_too(tmp_path: Path) -> None:
    """W₂ solves TRCE's objective over the prompts' own [EoT] rows and, with weight w, the rows
    c' = (Σ W₁ᵀW₁ + λI)⁻¹ Σ W₁ᵀW₀ e_m that make the mapped weights W₁ give what W₀ gave e_m, all
    mapped to the safe rows as W₁ projects them; the prior keeps W₁'s outputs on the captions."""
    base = build_tiny_sd(dtype=torch.float64)
    w0 = _kv_weights(base)
    plain = conceptedit.apply(
        _recipe(_stage1()), pipeline=build_tiny_sd(dtype=torch.float64), out=tmp_path / "a", quiet=True
    )
    w1 = _kv_weights(plain.pipeline)
    reg, weight = 0.1, 0.5
    robust = _stage1(adversarial={"rounds": 1, "regular_scale": reg, "weight": weight})
    result = conceptedit.apply(
        _recipe(robust), pipeline=build_tiny_sd(dtype=torch.float64), out=tmp_path / "b", quiet=True
    )
    w2 = _kv_weights(result.pipeline)

    prompts_m = [t.replace("{}", m) for m, _ in PAIRS for t in TEMPLATES]
    prompts_s = [t.replace("{}", s) for _, s in PAIRS for t in TEMPLATES]
    e_m, e_s = _eot_embeddings(base, prompts_m), _eot_embeddings(base, prompts_s)
    dim, n, eta = e_m.shape[1], len(prompts_m), 0.2
    gram = reg * torch.eye(dim, dtype=torch.float64) + sum(w1[k].T @ w1[k] for k in w1)
    cross = sum(w1[k].T @ w0[k] for k in w1)
    adversarial = torch.linalg.solve(gram, cross @ e_m.T).T  # c' for every [EoT] row
    # The rows do bring the concept back on W₁ better than the prompts themselves (what makes them adversarial).
    back = sum(float((w1[k] @ adversarial.T - w0[k] @ e_m.T).norm()) for k in w1)
    plain_back = sum(float((w1[k] @ e_m.T - w0[k] @ e_m.T).norm()) for k in w1)
    assert back < plain_back

    keys = torch.cat([e_m, adversarial])
    goals = torch.cat([e_s, e_s])
    row_weights = torch.cat([torch.full((n,), 1 / n), torch.full((n,), weight / n)]).double()
    prior = _prior(base, read_prompts(COCO_30K, limit=40))
    for name, start in w1.items():

        def grad(x: torch.Tensor, start: torch.Tensor = start) -> torch.Tensor:
            return ((x @ keys.T - start @ goals.T) * row_weights) @ keys + eta * (x - start) @ prior

        assert not torch.equal(w2[name], start), name
        assert grad(w2[name]).norm() / grad(start).norm() < 1e-6, name


def test_adversarial_rounds_are_refused_when_out_of_range() -> None:
    for bad in ({"rounds": 0}, {"regular_scale": -1.0}, {"weight": 0.0}, {"round": 2}):
        with pytest.raises(conceptedit.RecipeError, match="adversarial"):
            conceptedit.load_recipe(_recipe(_stage1(adversarial=bad)))


# ------------------------------------------------------------------------------------ stage 2

CALLS: list[tuple[str, str, dict[str, Any]]] = []


class _SpiedSoft(SoftPromptPGD):
    def attack(self, prompt: str, objective: Any, **kw: Any) -> Any:
        found = super().attack(prompt, objective, **kw)
        CALLS.append(("soft_prompt", prompt, {"losses": found.losses, "tokens": self.tokens, "steps": self.steps}))
        return found


class _SpiedInversion(ConceptInversion):
    def attack(self, prompt: str, objective: Any, **kw: Any) -> Any:
        found = super().attack(prompt, objective, **kw)
        CALLS.append(("concept_inversion", prompt, {"losses": found.losses, "init": self.init}))
        return found


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(registry.ADVERSARIES, "soft_prompt", _SpiedSoft)
    monkeypatch.setitem(registry.ADVERSARIES, "concept_inversion", _SpiedInversion)
    CALLS.clear()
    yield


def _robust_stage2(tmp_path: Path, **adversarial: Any) -> tuple[Any, list[dict[str, Any]]]:
    edit = _stage2(steps=12)
    edit["params"]["adversarial"] = {"every": 4, "steps": 3, **adversarial}
    result = conceptedit.apply(_recipe(_stage1(), edit), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "trce_steer.jsonl").read_text().splitlines()]
    return result, log


def test_stage2_attacks_each_drawn_prompt_once_per_refresh_and_steers_its_prediction(
    spied: None, tmp_path: Path
) -> None:
    base = build_tiny_sd()
    result, log = _robust_stage2(tmp_path, tokens=2)
    # Steps 1-4, 5-8, 9-12 are three refreshes; each attacks every malicious prompt drawn in it, once.
    attacked = [c for c in CALLS if c[0] == "soft_prompt"]
    assert 3 <= len(attacked) <= 3 * len(PAIRS)
    assert {c[1] for c in attacked} <= {f"a photo of {m}" for m, _ in PAIRS}
    assert all(c[2]["tokens"] == 2 and c[2]["steps"] == 3 for c in attacked)
    # The attack lowers its objective (the trained model predicting the original's malicious noise).
    assert sum(c[2]["losses"][-1] < c[2]["losses"][0] for c in attacked) >= len(attacked) / 2
    assert len(log) == 12 and all(row["erase_adversarial"] >= 0 for row in log)
    assert any(row["erase_adversarial"] > 0 for row in log)
    originals = dict(base.unet.named_parameters())
    for name, param in result.pipeline.unet.named_parameters():
        declared = "attn1." in name or any(f"attn2.to_{w}." in name for w in "qkv")
        assert torch.equal(param, originals[name]) != declared, name
    assert all(
        torch.equal(a, b)
        for a, b in zip(base.text_encoder.parameters(), result.pipeline.text_encoder.parameters(), strict=True)
    )


def test_stage2_concept_inversion_puts_its_token_in_the_concepts_place(spied: None, tmp_path: Path) -> None:
    _robust_stage2(tmp_path, attack="concept_inversion", tokens=1, step_size=0.01)
    attacked = [c for c in CALLS if c[0] == "concept_inversion"]
    assert attacked and all(c[1] == "a photo of {}" for c in attacked)
    assert {c[2]["init"] for c in attacked} <= {m for m, _ in PAIRS}


def test_stage2_without_the_option_never_attacks(spied: None, tmp_path: Path) -> None:
    conceptedit.apply(_recipe(_stage1(), _stage2(steps=3)), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "trce_steer.jsonl").read_text().splitlines()]
    assert CALLS == [] and all("erase_adversarial" not in row for row in log)
