"""ESD on builtin:tiny-sd: the target, the timestep, which parameters move, groups with TRCE, the recipes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conceptedit_builtin.esd import Esd, EsdSample
from conftest import COCO_30K, REPO
from diffusers import DDIMScheduler
from typer.testing import CliRunner

import conceptedit
from conceptedit.cli.app import app
from conceptedit.engine.context import derive_seed
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

STEPS = 5  # DDIM steps of a full sampling run in these tests


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _esd(training: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    return {
        "method": "esd",
        "params": {"concept": "nudity", "sampling_steps": STEPS, **params},
        "training": {"steps": 3, "lr": 1e-3, **(training or {})},
    }


def _hidden(pipe: Any, prompt: str) -> torch.Tensor:
    """Text embeddings computed without the engine."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.mark.parametrize(("sample_with", "legacy"), [("current", False), ("base", True)])
def test_target_is_negative_guidance_of_the_frozen_model_at_the_right_timestep(
    sample_with: str, legacy: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[EsdSample, torch.Tensor]] = []
    real_sample, real_target = Esd.sample, Esd.esd_target
    samples: list[EsdSample] = []

    def sample(self: Esd, ctx: Any, draw: int) -> EsdSample:
        samples.append(real_sample(self, ctx, draw))
        return samples[-1]

    monkeypatch.setattr(Esd, "sample", sample)

    def target(self: Esd, ctx: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = real_target(self, ctx, x, t)
        seen.append((samples[-1], out.detach().clone()))
        return out

    monkeypatch.setattr(Esd, "esd_target", target)
    eta = 0.7
    edit = _esd(eta=eta, parameters="x", sample_with=sample_with, legacy_timestep_mapping=legacy)
    result = conceptedit.apply(tiny_recipe(edit), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    assert len(seen) == 3 and result.changed  # the trained model moved, the reference must not have

    base = build_tiny_sd()
    c, empty = _hidden(base, "nudity"), _hidden(base, "")
    scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(STEPS)
    for step, (s, got) in enumerate(seen, start=1):
        k, t = s.k, int(s.t)
        if legacy:  # the original code's mirrored timestep: U[1000k/S, 1000(k+1)/S)
            assert round(1000 * k / STEPS) <= t < round(1000 * (k + 1) / STEPS), (k, t)
        else:
            assert t == int(scheduler.timesteps[k]), (k, t)
        with torch.no_grad():
            e_c = base.unet(s.x, s.t, encoder_hidden_states=c).sample
            e_0 = base.unet(s.x, s.t, encoder_hidden_states=empty).sample
        torch.testing.assert_close(got, e_0 - eta * (e_c - e_0), atol=1e-5, rtol=1e-4)
        if sample_with == "base" or step == 1:  # x_t: k DDIM steps of the (still) original model, CFG 3 on c
            assert s.seed == derive_seed(0, 0, "esd", "noise", step - 1)
            x = torch.randn(s.x.shape[1:], generator=torch.Generator().manual_seed(s.seed))[None]
            with torch.no_grad():
                for tt in scheduler.timesteps[:k]:
                    e_c = base.unet(x, tt, encoder_hidden_states=c).sample
                    e_0 = base.unet(x, tt, encoder_hidden_states=empty).sample
                    x = scheduler.step(e_0 + 3.0 * (e_c - e_0), tt, x, eta=0.0).prev_sample
            tol = 2e-3 if sample_with == "base" else 1e-5  # cached latents are kept in float16
            torch.testing.assert_close(s.x, x, atol=tol, rtol=tol)


DECLARED = {
    "x": lambda n: ".attn2." in n,
    "x-strict": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
    "u": lambda n: ".attn2." not in n and not n.startswith(("time_embedding.", "conv_norm_out.", "conv_out.")),
}


@pytest.mark.parametrize("parameters", sorted(DECLARED))
def test_only_the_declared_parameters_move(parameters: str, tmp_path: Path) -> None:
    base = build_tiny_sd()
    edit = _esd(parameters=parameters, sample_with="base", training={"steps": 2})
    result = conceptedit.apply(tiny_recipe(edit), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    originals = dict(base.unet.named_parameters())
    moved = {name for name, p in result.pipeline.unet.named_parameters() if not torch.equal(p, originals[name])}
    declared = {name for name in originals if DECLARED[parameters](name)}
    assert declared and moved == declared
    assert all(n.startswith("unet.") for n in result.changed)  # the text encoder never trains


def test_a_bad_parameter_set_names_the_field_and_the_choices() -> None:
    with pytest.raises(conceptedit.RecipeError, match="parameters") as info:
        conceptedit.load_recipe(tiny_recipe(_esd(parameters="esd-u")))
    assert "'x-strict'" in str(info.value) and "'u'" in str(info.value)
    with pytest.raises(conceptedit.RecipeError, match="concept: nudity"):
        conceptedit.load_recipe(tiny_recipe(_esd(concept=" ")))


def _cli(recipe: str, out: Path, *sets: str) -> None:
    args = ["apply", str(REPO / "recipes" / recipe), "--model", "builtin:tiny-sd", "--device", "cpu"]
    args += ["--out", str(out), "--quiet"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_esd_nudity_recipe_runs_on_tiny_sd(tmp_path: Path) -> None:
    _cli("esd_nudity.yaml", tmp_path / "run", "edits.0.params.sampling_steps=4", "edits.0.training.steps=2")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [e["label"] for e in manifest["edits"]] == ["esd-u"]
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "esd-u.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(row["erase"] > 0 for row in log)
    resolved = (tmp_path / "run" / "recipe.resolved.yaml").read_text()
    assert "legacy_timestep_mapping: true" in resolved and "parameters: u" in resolved


def test_trce_plus_esd_trains_both_losses_as_one_sum(tmp_path: Path) -> None:
    _cli(
        "trce_plus_esd.yaml",
        tmp_path / "run",
        f"edits.0.params.prior.captions={COCO_30K}",
        "edits.0.params.prior.limit=20",
        "edits.1.edits.0.params.sampling_steps=6",
        "edits.1.edits.0.params.unconditional_trajectories=3",
        "edits.1.edits.0.params.trajectories_per_concept=1",
        "edits.1.edits.1.params.sampling_steps=4",
        "edits.1.training.steps=3",
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [e["label"] for e in manifest["edits"]] == ["stage1", "steer+esd"]
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "steer_esd.jsonl").read_text().splitlines()]
    assert len(log) == 3
    weight = 1.0  # the recipe's weight on the ESD member
    for row in log:
        assert {"steer/erase", "steer/preserve", "esd/erase"} <= set(row)
        expected = row["steer/erase"] + row["steer/preserve"] + weight * row["esd/erase"]
        assert row["total"] == pytest.approx(expected, rel=1e-5)
