"""Concept Ablation on builtin:tiny-sd: the concept's prediction moves onto the anchor's, and nothing else trains."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conceptedit_builtin.ca import ConceptAblation
from diffusers import DDIMScheduler

import conceptedit
from conceptedit.engine.context import derive_seed
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

PAIRS = [["Grumpy Cat", "a cat"]]
TEMPLATES = ["a photo of {}", "{} on a sofa"]
GEN_STEPS = 4


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _recipe(training: dict[str, Any] | None = None, concepts: dict[str, Any] | None = None, **params: Any) -> Any:
    edit = {
        "method": "ca",
        "params": {"concepts": "cat", "anchor_samples": 6, "generation_steps": GEN_STEPS, "batch_size": 2, **params},
        "training": {"steps": 2, "lr": 1e-3, **(training or {})},
    }
    return tiny_recipe(edit, concepts=concepts or {"cat": {"pairs": PAIRS, "templates": TEMPLATES}})


def _hidden(pipe: Any, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def test_concept_prediction_moves_onto_the_anchors_and_only_kv_trains(tmp_path: Path) -> None:
    base = build_tiny_sd()
    result = conceptedit.apply(_recipe({"steps": 30}), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    originals = dict(base.unet.named_parameters())
    moved = {n for n, p in result.pipeline.unet.named_parameters() if not torch.equal(p, originals[n])}
    assert moved == {n for n in originals if _kv(n)}
    assert all(n.startswith("unet.") for n in result.changed)

    # Probe on latents and timesteps the run never drew: concept vs the original's anchor prediction.
    g = torch.Generator().manual_seed(99)
    x, t = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    concept = _hidden(base, [tpl.format(PAIRS[0][0]) for tpl in TEMPLATES]).repeat(4, 1, 1)
    anchor = _hidden(base, [tpl.format(PAIRS[0][1]) for tpl in TEMPLATES]).repeat(4, 1, 1)
    with torch.no_grad():
        goal = base.unet(x, t, encoder_hidden_states=anchor).sample
        before = F.mse_loss(base.unet(x, t, encoder_hidden_states=concept).sample, goal)
        after = F.mse_loss(result.pipeline.unet(x, t, encoder_hidden_states=concept).sample, goal)
    assert after < 0.5 * before, (float(before), float(after))

    log = [json.loads(line)["ablate"] for line in (tmp_path / "run" / "logs" / "ca.jsonl").read_text().splitlines()]
    assert len(log) == 30 and sum(log[-5:]) < 0.5 * sum(log[:5]), log


@pytest.mark.parametrize(
    "params",
    [
        {"parameters": "attn", "prior_weight": 0.5},
        {"parameters": "attn", "loss": "noise"},
        {"parameters": "attn", "reference": "current"},
    ],
)
def test_attention_set_trains_only_attention_projections(params: dict[str, Any], tmp_path: Path) -> None:
    base = build_tiny_sd()
    result = conceptedit.apply(_recipe(**params), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    originals = dict(base.unet.named_parameters())
    moved = {n for n, p in result.pipeline.unet.named_parameters() if not torch.equal(p, originals[n])}
    attention = {
        n
        for n in originals
        if any(f".{a}.{p}." in n for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out"))
    }
    assert moved == attention
    row = json.loads((tmp_path / "run" / "logs" / "ca.jsonl").read_text().splitlines()[-1])
    assert ("prior" in row) == ("prior_weight" in params)
    assert row["total"] == pytest.approx(row["ablate"] + row.get("prior", 0.0), rel=1e-5)


def test_anchor_latents_are_finished_generations_of_the_base_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods: list[ConceptAblation] = []
    real = ConceptAblation.prepare_training
    monkeypatch.setattr(ConceptAblation, "prepare_training", lambda self, ctx: methods.append(self) or real(self, ctx))
    conceptedit.apply(_recipe(), out=tmp_path / "run", quiet=True)
    kept = methods[0].anchors.kept
    assert set(kept.index[:, 1].tolist()) == {GEN_STEPS} and set(kept.timesteps.tolist()) == {0}

    base = build_tiny_sd()
    anchors = [tpl.format(PAIRS[0][1]) for tpl in TEMPLATES]  # generation j uses anchor prompt j % 2
    scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(GEN_STEPS)
    for row, (j, _) in enumerate(kept.index.tolist()[:2]):
        cond, empty = _hidden(base, [anchors[j % 2]]), _hidden(base, [""])
        x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(derive_seed(0, 0, "ca", "anchor", j)))[None]
        with torch.no_grad():
            for t in scheduler.timesteps:
                e_c = base.unet(x, t, encoder_hidden_states=cond).sample
                e_0 = base.unet(x, t, encoder_hidden_states=empty).sample
                x = scheduler.step(e_0 + 6.0 * (e_c - e_0), t, x, eta=0.0).prev_sample
        torch.testing.assert_close(kept.latents[row].float(), x[0], atol=2e-3, rtol=2e-3)


def test_a_concept_without_an_anchor_is_refused(tmp_path: Path) -> None:
    no_anchor = {"cat": {"concepts": ["Grumpy Cat"], "templates": TEMPLATES}}
    with pytest.raises(conceptedit.EditError, match=r"without an anchor.*\[\[Grumpy Cat, a cat\]\]"):
        conceptedit.apply(_recipe(concepts=no_anchor), out=tmp_path / "run", quiet=True)
