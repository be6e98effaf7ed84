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
from hand import double_tiny_sd
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


def _spy_on_samples(monkeypatch: pytest.MonkeyPatch) -> list[EsdSample]:
    samples: list[EsdSample] = []
    real_sample = Esd.sample

    def sample(self: Esd, ctx: Any, draw: int) -> EsdSample:
        samples.append(real_sample(self, ctx, draw))
        return samples[-1]

    monkeypatch.setattr(Esd, "sample", sample)
    return samples


def _hand_ddim(
    base: Any, seed: int, shape: torch.Size, c: torch.Tensor, empty: torch.Tensor, steps: int
) -> torch.Tensor:
    """``steps`` DDIM steps (η = 0, CFG 3 on ``c``) of ``base`` from the seed's noise, in float64."""
    scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(STEPS)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None].double()
    with torch.no_grad():
        for tt in scheduler.timesteps[:steps]:
            e_c = base.unet(x, tt, encoder_hidden_states=c).sample
            e_0 = base.unet(x, tt, encoder_hidden_states=empty).sample
            x = scheduler.step(e_0 + 3.0 * (e_c - e_0), tt, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize(
    ("sample_with", "pairing"), [("current", "exact"), ("base", "compvis"), ("current", "compvis")]
)
def test_target_is_negative_guidance_of_the_frozen_model_at_the_right_timestep(
    sample_with: str, pairing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[EsdSample, torch.Tensor]] = []
    samples = _spy_on_samples(monkeypatch)
    real_target = Esd.esd_target

    def target(self: Esd, ctx: Any, s: EsdSample) -> torch.Tensor:
        out = real_target(self, ctx, s)
        seen.append((samples[-1], out.detach().clone()))
        return out

    monkeypatch.setattr(Esd, "esd_target", target)
    eta = 0.7
    edit = _esd(eta=eta, parameters="x", sample_with=sample_with, timestep_pairing=pairing)
    result = conceptedit.apply(tiny_recipe(edit), pipeline=double_tiny_sd(), out=tmp_path / "run", quiet=True)
    assert len(seen) == 3 and result.changed  # the trained model moved, the reference must not have

    base = double_tiny_sd()
    c, empty = _hidden(base, "nudity"), _hidden(base, "")
    scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(STEPS)
    for step, (s, got) in enumerate(seen, start=1):
        k, t = s.k, int(s.t)
        if pairing == "compvis":  # CompVis: t from the step's bucket, on the latent S+1-k steps in (S at most)
            assert round(1000 * k / STEPS) <= t < round(1000 * (k + 1) / STEPS), (k, t)
            assert s.steps == min(STEPS + 1 - k, STEPS), (k, s.steps)
        else:
            assert s.steps == k and t == int(scheduler.timesteps[k]), (k, s.steps, t)
        with torch.no_grad():
            e_c = base.unet(s.x.double(), s.t, encoder_hidden_states=c).sample
            e_0 = base.unet(s.x.double(), s.t, encoder_hidden_states=empty).sample
        # The plugin rounds the float64 predictions to float32 and combines them there: a few ulps
        # (measured: at most 1.2e-7, one ulp; the same check in float32 differed by 1.5e-6 to 2.3e-5).
        torch.testing.assert_close(got, (e_0 - eta * (e_c - e_0)).float(), atol=1e-6, rtol=1e-6)
        if sample_with == "base" or step == 1:  # x_t: DDIM steps of the (still) original model, CFG 3 on c
            assert s.seed == derive_seed(0, 0, "esd", "noise", step - 1)
            x = _hand_ddim(base, s.seed, s.x.shape[1:], c, empty, s.steps).float()
            if sample_with == "base":  # cached latents are kept in float16: at most one float16 ulp apart
                torch.testing.assert_close(s.x, x.half().float(), atol=1e-6, rtol=2**-10)
            else:  # the plugin's scheduler steps run in float32: a few ulps per step (measured: 1.9e-6)
                torch.testing.assert_close(s.x, x, atol=1e-5, rtol=1e-5)


def test_the_logged_loss_is_the_esd_formula_computed_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step's logged loss is MSE(ε_θ(x_t, t, c), ε*(∅) − η(ε*(c) − ε*(∅))), recomputed here with
    diffusers alone: ε* the untouched tiny-sd, ε_θ the weights the model held at that step."""
    samples = _spy_on_samples(monkeypatch)
    held: list[dict[str, torch.Tensor]] = []
    real_loss = Esd.trajectory_loss

    def loss(self: Esd, ctx: Any, step: int) -> dict[str, torch.Tensor]:
        held.append({name: p.detach().clone() for name, p in ctx.pipeline.unet.named_parameters()})
        return real_loss(self, ctx, step)

    monkeypatch.setattr(Esd, "trajectory_loss", loss)
    eta = 0.6
    # ε* recomputed at each step's latent: the stored float16 targets (frozen_targets: cached, the default)
    # are checked against this path in test_frozen_targets.py.
    edit = _esd(eta=eta, parameters="x", sample_with="base", training={"steps": 3, "frozen_targets": "recompute"})
    conceptedit.apply(tiny_recipe(edit), pipeline=double_tiny_sd(), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "esd.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and len(samples) == len(held) == 3

    frozen, trained = double_tiny_sd(), double_tiny_sd()
    c, empty = _hidden(frozen, "nudity"), _hidden(frozen, "")
    original = dict(frozen.unet.named_parameters())
    for step, (row, s, weights) in enumerate(zip(log, samples, held, strict=True), start=1):
        moved = any(not torch.equal(w, original[name]) for name, w in weights.items())
        assert moved == (step > 1)  # from step 2 on, ε_θ and ε* are different networks
        trained.unet.load_state_dict(weights)
        x = s.x.double()
        with torch.no_grad():
            uncond = frozen.unet(x, s.t, encoder_hidden_states=empty).sample
            cond = frozen.unet(x, s.t, encoder_hidden_states=c).sample
            goal = uncond - eta * (cond - uncond)
            prediction = trained.unet(x, s.t, encoder_hidden_states=c).sample
        by_hand = float(((prediction - goal) ** 2).mean())
        # The plugin averages float32 copies of these tensors: float32 rounding only (measured: at
        # most 2.4e-7 relative; the wrong sign of η is 70-90 % off, ε* in place of ε_θ 34-112 %).
        assert row["erase"] == pytest.approx(by_hand, rel=1e-5), step


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


def test_the_timestep_pairing_is_checked_and_the_old_mirrored_key_is_refused() -> None:
    with pytest.raises(conceptedit.RecipeError, match="timestep_pairing") as info:
        conceptedit.load_recipe(tiny_recipe(_esd(timestep_pairing="mirrored")))
    assert "'exact'" in str(info.value) and "'compvis'" in str(info.value)
    with pytest.raises(conceptedit.RecipeError, match=r"mirrored pairing .* Use timestep_pairing: compvis"):
        conceptedit.load_recipe(tiny_recipe(_esd(legacy_timestep_mapping=True)))
    with pytest.raises(conceptedit.RecipeError, match="false contradicts timestep_pairing"):
        conceptedit.load_recipe(tiny_recipe(_esd(legacy_timestep_mapping=False, timestep_pairing="compvis")))
    # `false` asked for what is still the default, so old recipes that spell it out keep loading
    loaded = conceptedit.load_recipe(tiny_recipe(_esd(legacy_timestep_mapping=False)))
    ((_, spec),) = loaded.recipe.flat_edits()
    assert spec.params.timestep_pairing == "exact" and "legacy_timestep_mapping" not in spec.params.model_dump()


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
    assert "timestep_pairing: compvis" in resolved and "parameters: u" in resolved


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
