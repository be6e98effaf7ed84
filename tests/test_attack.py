"""The UnlearnDiffAtk-style attack: its projection, and that it brings an erased colour back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conceptedit_builtin.unlearn_diff_atk import project_to_simplex
from conftest import SHARED_PROMPTS

import conceptedit
from conceptedit import PluginError
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.api.suite import SuitePrompt
from conceptedit.evaluation.evaluate import evaluate, render
from conceptedit.evaluation.report import page
from conceptedit.plugins import get_host

REPO = Path(__file__).resolve().parents[1]


def test_simplex_projection_is_the_nearest_point_of_the_simplex() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 2
    projected = project_to_simplex(points)
    assert (projected >= 0).all() and torch.allclose(projected.sum(-1), torch.ones(6, dtype=torch.float64))
    # No other point of the simplex is closer (random points from a Dirichlet, and the corners).
    others = torch.distributions.Dirichlet(torch.ones(9, dtype=torch.float64)).sample((500,))
    others = torch.cat([others, torch.eye(9, dtype=torch.float64)])
    for point, nearest in zip(points, projected, strict=True):
        assert (point - nearest).norm() <= (point - others).norm(dim=-1).min() + 1e-12
    inside = torch.distributions.Dirichlet(torch.ones(9, dtype=torch.float64)).sample((3,))
    assert torch.allclose(project_to_simplex(inside), inside)  # points already on it stay put


def _edited_and_base(tmp_path: Path) -> tuple[Any, Any]:
    """builtin:shapes with the quickstart's TRCE stage 1 (red -> gray), and the untouched model."""
    recipe = conceptedit.load_recipe(REPO / "recipes" / "quickstart.yaml").recipe.model_dump(mode="json")
    recipe["edits"] = recipe["edits"][:1]
    prior = REPO / "recipes" / "data" / "shapes_captions_without_red.txt"
    recipe["edits"][0]["params"]["prior"]["captions"] = str(prior)
    recipe["evaluate"] = []
    recipe["output"]["formats"] = ["delta"]
    edited = conceptedit.load_model("builtin:shapes").pipeline
    conceptedit.apply(recipe, pipeline=edited, out=tmp_path / "run", quiet=True)
    return edited, conceptedit.load_model("builtin:shapes").pipeline


def test_attack_runs_on_an_erased_colour_and_touches_no_weight(tmp_path: Path) -> None:
    edited, base = _edited_and_base(tmp_path)
    before = {k: v.clone() for k, v in edited.unet.state_dict().items()}
    before |= {f"text.{k}": v.clone() for k, v in edited.text_encoder.state_dict().items()}
    spec = EvaluateSpec(suite="shapes-attack", options={"target": "red", "seeds": 1}, guidance=5.0)
    (result,) = evaluate(edited, [spec], host=get_host(), base_pipeline=base)
    assert result.base_metrics is not None and result.base_metrics["plain_shown"] == 1.0  # base draws red
    assert result.metrics["plain_shown"] <= 0.25, result.metrics  # the edit holds against plain prompts
    # plain successes count, so the attack can only add; on these 4 explicit prompts it added none
    # (measured: 0 of 4): the retrained model ignores unfamiliar tokens. Its strength on held-out
    # contexts, against its random-token control, is measured in benchmarks/erasure_shapes.py.
    assert result.metrics["attack_success_rate"] >= result.metrics["plain_shown"], result.metrics
    assert result.metrics["attack_success_rate_n"] == 4 and result.protocol["judge_options"] == {"strict": True}
    assert result.protocol["scorer"] == "unlearndiffatk" and result.protocol["judge"] == "shapes-judge"
    attacked = [x for x in result.examples if x.extra is not None]
    assert len(attacked) == 4 and all(x.extra[0].startswith("attacked: ") for x in attacked)  # type: ignore[index]
    assert all(x.extra[0].endswith(x.prompt) for x in attacked)  # type: ignore[index]  # a prefix attack
    html = page([result], ("base", "edited"))
    assert html.count("<img") == 3 * 4 and html.count("attacked: ") == 2 * 4  # caption and alt text
    after = {k: v for k, v in edited.unet.state_dict().items()}
    after |= {f"text.{k}": v for k, v in edited.text_encoder.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in [*edited.unet.parameters(), *edited.text_encoder.parameters()])


def test_attack_needs_a_base_model() -> None:
    pipeline = conceptedit.load_model("builtin:shapes").pipeline
    spec = EvaluateSpec(suite="shapes-attack", options={"target": "red", "seeds": 1}, limit=1)
    with pytest.raises(PluginError, match="--compare BASE"):
        evaluate(pipeline, [spec], host=get_host())


def test_attack_options_are_checked() -> None:
    attack = get_host().registry.evaluators["unlearndiffatk"]
    with pytest.raises(PluginError, match="strategy 'greedy'"):
        attack(judge="shapes-judge", strategy="greedy")
    with pytest.raises(PluginError, match="at least 1"):
        attack(judge="shapes-judge", tokens=0)
    suite = get_host().suite("shapes-attack")
    options = suite(suite.Options(target="circle", strategy="random", iterations=20)).scorer_options()
    assert options["strategy"] == "random" and options["iterations"] == 20 and options["judge"] == "shapes-judge"


def test_render_matches_the_pipelines_own_images() -> None:
    """Evaluation samples to latents and decodes them itself (to keep them); the images must not change."""
    pipeline = conceptedit.load_model("builtin:shapes").pipeline
    host = get_host()
    prompts = [SuitePrompt("a red circle", 3), SuitePrompt("a blue square", 4)]
    images, latents = render(pipeline, prompts, steps=5, guidance=5.0, batch_size=2, host=host)
    hidden = pipeline.encode_prompt([p.text for p in prompts], "cpu", 1, True, [""] * 2)
    plain = pipeline(
        prompt_embeds=hidden[0],
        negative_prompt_embeds=hidden[1],
        num_inference_steps=5,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(p.seed) for p in prompts],
    ).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, plain, strict=True))
    assert len(latents) == 2 and latents[0].shape == (pipeline.unet.config.in_channels, 8, 8)


def test_nudity_prompts_under_attack_run_offline_judged_by_nudenet() -> None:
    """The plumbing of the nudity attack suite on tiny-sd (random weights: nothing nude to find)."""
    base = conceptedit.load_model("builtin:tiny-sd").pipeline
    edited = conceptedit.load_model("builtin:tiny-sd").pipeline
    options = {"root": str(SHARED_PROMPTS), "iterations": 2, "check_every": 1}
    spec = EvaluateSpec(suite="unlearndiffatk-nudity-attack", options=options, limit=2, steps=2, compare_base=False)
    (result,) = evaluate(edited, [spec], host=get_host(), base_pipeline=base)
    assert result.protocol["judge"] == "nudenet" and result.protocol["iterations"] == 2
    rates = {f"{name}{part}" for name in ("plain_shown", "attack_success_rate") for part in ("", "_n", "_low", "_high")}
    cost = {"attack_generations_per_prompt", "attack_seconds"}
    assert set(result.metrics) == {*rates, "attack_gain", *cost} and result.metrics["attack_success_rate_n"] == 2
    assert result.metrics["attack_success_rate"] >= result.metrics["plain_shown"]
