"""STEREO on builtin:tiny-sd: APG's normalised guidance by hand, one REO step's loss by hand, stage one's
rounds (the shared concept_inversion adversary on the erased working weights, the exact restore), a run
end to end with its reload, and the recipe errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conceptedit_builtin.stereo import SHAPES_ANCHORS, Stereo, StereoDraw, StereoParams, stratified
from diffusers import DDIMScheduler
from hand import double_tiny_sd, encode_plainly
from safetensors.torch import load_file
from torch import Tensor
from typer.testing import CliRunner

import conceptedit
from conceptedit.cli.app import app
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe
from conceptedit.toolkit import (
    ConceptInversion,
    MomentumBuffer,
    compositional_guidance,
    encode_with_rows,
    normalized_guidance,
    normalized_update,
    project_guidance,
)

STEPS = 4  # DDIM steps of a full sampling run in these tests (k ~ U{1, 2})
SMALL = {"sampling_steps": STEPS, "ste_steps": 2, "inversion_steps": 3, "gallery_size": 2}


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _stereo(training: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    return {
        "method": "stereo",
        "params": {"concept": "red", "parameters": "x", **SMALL, **params},
        "training": {"steps": 2, "lr": 1e-3, **(training or {})},
    }


def _v(*values: float) -> Tensor:
    """A [1, len, 1, 1] tensor: one sample whose (C, H, W) vector is ``values``."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, -1, 1, 1)


# ------------------------------------------------------------------------ (a) APG by hand


def test_normalized_guidance_splits_against_the_conditional_scales_the_parallel_part_and_thresholds() -> None:
    cond, uncond = _v(3, 4), _v(2, 2)  # Δ = (1, 2); ĉ = (0.6, 0.8); ⟨Δ, ĉ⟩ = 2.2
    parallel, orthogonal = project_guidance(cond - uncond, cond)
    assert torch.allclose(parallel, _v(1.32, 1.76)) and torch.allclose(orthogonal, _v(-0.32, 0.24))
    # U = Δ⊥ + η Δ∥ with η = 0.5; APG = c + (w − 1) U with w = 3.
    assert torch.allclose(normalized_update(cond, uncond, eta=0.5), _v(0.34, 1.12))
    assert torch.allclose(normalized_guidance(cond, uncond, 3.0, eta=0.5), _v(3.68, 6.24))
    assert torch.allclose(normalized_guidance(cond, uncond, 3.0, eta=0.0), _v(3 - 0.64, 4 + 0.48))  # APG's η = 0
    # The threshold scales Δ to length r when it is longer (‖Δ‖ = √5), per sample, and leaves shorter ones.
    shrunk = normalized_update(cond, uncond, eta=0.5, norm_threshold=1.0)
    assert torch.allclose(shrunk, _v(0.34, 1.12) / math.sqrt(5))
    assert torch.equal(
        normalized_update(cond, uncond, eta=0.5, norm_threshold=5.0), normalized_update(cond, uncond, eta=0.5)
    )
    batch_c, batch_u = torch.cat([_v(3, 4), _v(0, 2)]), torch.cat([_v(2, 2), _v(1, 2)])  # 2nd: Δ = (−1, 0) ⊥ c
    both = normalized_update(batch_c, batch_u, eta=0.5, norm_threshold=2.0)
    assert torch.allclose(both[:1], _v(0.34, 1.12) * 2 / math.sqrt(5)) and torch.allclose(both[1:], _v(-1, 0))
    # η = 1, no threshold, no momentum: ordinary CFG, and ESD's target is c − (1 + η_esd) U.
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(normalized_guidance(c, u, 7.5), u + 7.5 * (c - u), atol=1e-5)
    assert torch.allclose(c - 1.7 * normalized_update(c, u), u - 0.7 * (c - u), atol=1e-5)
    # A zero conditional prediction has no direction: everything is orthogonal to it.
    assert torch.equal(normalized_update(_v(0, 0), _v(1, 2), eta=0.0), _v(-1, -2))


def test_momentum_runs_a_sum_of_differences_before_the_threshold_and_the_split() -> None:
    buffer = MomentumBuffer(-0.5)
    first = normalized_update(_v(3, 4), _v(2, 2), momentum=buffer)
    assert torch.allclose(first, _v(1, 2)) and torch.allclose(buffer.running, _v(1, 2))
    second = normalized_update(_v(1, 0), _v(0, 0), eta=0.0, momentum=buffer)  # running: (1, 0) − 0.5 (1, 2)
    assert torch.allclose(buffer.running, _v(0.5, -1.0)) and torch.allclose(second, _v(0.0, -1.0))


def test_compositional_guidance_averages_each_side_with_stereos_minus_one() -> None:
    u, n1, n2, a = _v(1, 1), _v(3, 1), _v(1, 5), _v(2, 3)
    # η = 1: u + (g − 1)(a − u) + (−g − 1) mean(n_i − u), here g = 2: 1 and −3.
    plain = compositional_guidance(u, [n1, n2, a], [-2.0, -2.0, 2.0])
    assert torch.allclose(plain, u + (a - u) - 3 * ((n1 - u) + (n2 - u)) / 2)
    # η = 0: each difference loses its part along its own condition: (2, 0) along (3, 1) is 6/10 (3, 1), (0, 4)
    # along (1, 5) is 20/26 (1, 5), (1, 2) along (2, 3) is 8/13 (2, 3).
    along_n1, along_n2, along_a = _v(1.8, 0.6), _v(20 / 26, 100 / 26), _v(16 / 13, 24 / 13)
    dropped = compositional_guidance(u, [n1, n2, a], [-2.0, -2.0, 2.0], eta=0.0)
    expected = u + ((a - u) - along_a) - 3 * (((n1 - u) - along_n1) + ((n2 - u) - along_n2)) / 2
    assert torch.allclose(dropped, expected)
    assert torch.allclose(compositional_guidance(u, [a], [3.0]), u + 2 * (a - u))  # one side only
    with pytest.raises(ValueError, match="one scale per condition"):
        compositional_guidance(u, [a], [2.0, -2.0])


def test_stratified_order_uses_every_item_equally_then_distinct_extras() -> None:
    order = stratified(11, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(order, minlength=4)
    assert len(order) == 11 and sorted(counts.tolist()) == [2, 3, 3, 3]
    assert sorted(order[:8].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3] and len(set(order[8:].tolist())) == 3
    assert len(set(stratified(3, 5, torch.Generator().manual_seed(0)).tolist())) == 3  # fewer draws than items


# ------------------------------------------------------------------ (b) one REO step by hand


def ddim_timesteps_of(pipe: Any) -> Tensor:
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(STEPS)
    return scheduler.timesteps


def _hand_update(cond: Tensor, uncond: Tensor, eta: float, threshold: float) -> Tensor:
    """U = Δ⊥ + η Δ∥ of Δ = cond − uncond, shortened to ``threshold``: dot products written out."""
    d, c = (cond - uncond).double(), cond.double()
    length = float(d.flatten().norm())
    if threshold > 0 and length > threshold:
        d = d * (threshold / length)
    parallel = float((d * c).sum()) / float((c * c).sum()) * c
    return (d - parallel) + eta * parallel


def test_one_reo_step_is_the_compositional_objective_computed_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[Stereo, StereoDraw, dict[str, Tensor]]] = []
    real_draw = Stereo.draw

    def draw(self: Stereo, ctx: Any, d: int) -> StereoDraw:
        weights = {n: p.detach().clone() for n, p in ctx.pipeline.unet.named_parameters()}
        s = real_draw(self, ctx, d)
        seen.append((self, s, weights))
        return s

    monkeypatch.setattr(Stereo, "draw", draw)
    eta, threshold, g = 0.5, 0.05, 2.5
    edit = _stereo(iterations=1, apg_eta=eta, apg_norm_threshold=threshold, compositional_guidance_scale=g)
    conceptedit.apply(tiny_recipe(edit), pipeline=double_tiny_sd(), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "stereo.jsonl").read_text().splitlines()]
    assert len(log) == len(seen) == 2

    frozen, trained = double_tiny_sd(), double_tiny_sd()
    method = seen[0][0]
    concept, empty = encode_plainly(frozen, ["red", ""]).chunk(2)
    token = encode_with_rows(StableDiffusionAdapter(frozen), "{}", method.rows[0])
    assert torch.equal(method.erase_hidden[:1], concept) and torch.equal(method.erase_hidden[1:], token)
    anchors = encode_plainly(frozen, list(SHAPES_ANCHORS))
    timesteps = ddim_timesteps_of(frozen)
    assert sorted(s.erase for _, s, _ in seen) == [0, 1] and len({s.anchor for _, s, _ in seen}) == 2  # stratified
    longer = 0
    for row, (_, s, weights) in zip(log, seen, strict=True):
        assert 1 <= s.k <= STEPS - 2 and int(s.t) == int(timesteps[s.k])
        trained.unet.load_state_dict(weights)
        x = s.x.double()

        def eps(unet: Any, hidden: Tensor, x: Tensor = x, t: Tensor = s.t) -> Tensor:
            with torch.no_grad():
                return unet(x, t, encoder_hidden_states=hidden.double()).sample

        e_0, e_a = eps(frozen.unet, empty), eps(frozen.unet, anchors[s.anchor : s.anchor + 1])
        negatives = [eps(frozen.unet, concept), eps(frozen.unet, token)]
        longer += sum(float((e - e_0).norm()) > threshold for e in [*negatives, e_a])
        push = sum(_hand_update(e_n, e_0, eta, threshold) for e_n in negatives) / 2
        target = e_0 + (g - 1) * _hand_update(e_a, e_0, eta, threshold) + (-g - 1) * push
        prediction = eps(trained.unet, method.erase_hidden[s.erase : s.erase + 1])
        assert row["erase"] == pytest.approx(float(((prediction - target) ** 2).mean()), rel=1e-5)
    assert longer > 0  # the threshold took part


# ------------------------------------------------------------------------- (c) stage one


class _SpiedInversion(ConceptInversion):
    calls: ClassVar[list[dict[str, Any]]] = []

    def attack(self, prompt: str, objective: Any, **kw: Any) -> Any:
        unet = self.adapter.unet
        weights = {n: p.detach().clone() for n, p in unet.named_parameters() if ".attn2." in n}
        found = super().attack(prompt, objective, **kw)
        rows = found.embeddings[0, list(found.slots)]
        _SpiedInversion.calls.append(
            {"prompt": prompt, "weights": weights, "rows": rows, "steps": found.steps, "protocol": self.protocol()}
        )
        return found


def test_stage_one_attacks_each_erased_working_copy_and_stage_two_starts_from_the_edit_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conceptedit.attacks import registry

    monkeypatch.setitem(registry.ADVERSARIES, "concept_inversion", _SpiedInversion)
    _SpiedInversion.calls = []
    rounds: list[dict[str, Any]] = []
    starts: list[dict[str, Tensor]] = []
    at_reo: list[dict[str, Any]] = []
    real_round, real_prepare, real_loss = Stereo.erase_round, Stereo.prepare_training, Stereo.trajectory_loss

    def attn2(ctx: Any) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in ctx.pipeline.unet.named_parameters() if ".attn2." in n}

    def erase_round(self: Stereo, ctx: Any, names: Any, hidden: Tensor, round_: int) -> None:
        real_round(self, ctx, names, hidden, round_)
        rounds.append({"hidden": hidden.clone(), "after": attn2(ctx)})

    def prepare(self: Stereo, ctx: Any) -> None:
        starts.append(attn2(ctx))
        real_prepare(self, ctx)

    def loss(self: Stereo, ctx: Any, step: int) -> dict[str, Tensor]:
        if step == 1:
            unet = ctx.pipeline.unet
            at_reo.append({"weights": attn2(ctx), "grads": [p.grad for p in unet.parameters()], "method": self})
        return real_loss(self, ctx, step)

    monkeypatch.setattr(Stereo, "erase_round", erase_round)
    monkeypatch.setattr(Stereo, "prepare_training", prepare)
    monkeypatch.setattr(Stereo, "trajectory_loss", loss)
    targets: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    real_target = Stereo.ste_target

    def ste_target(self: Stereo, ctx: Any, x: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
        out = real_target(self, ctx, x, t, hidden)
        targets.append((x.clone(), t.clone(), hidden.clone(), out.clone()))
        return out

    monkeypatch.setattr(Stereo, "ste_target", ste_target)
    esd = {  # an edit before: the edit start (ESD's result) is not the base
        "method": "esd",
        "params": {"concept": "red", "parameters": "x-strict", "sampling_steps": STEPS, "sample_with": "base"},
        "training": {"steps": 2, "lr": 1e-2},
    }
    conceptedit.apply(
        tiny_recipe(esd, _stereo(ste_lr=1e-2, ste_guidance=3.0, apg_eta=0.5, apg_norm_threshold=0.05)),
        pipeline=build_tiny_sd(),
        out=tmp_path / "run",
        quiet=True,
    )

    calls, (start,), ((reo,)) = _SpiedInversion.calls, starts, at_reo
    base = {n: p.detach() for n, p in build_tiny_sd().unet.named_parameters() if ".attn2." in n}
    assert any(not torch.equal(start[n], base[n]) for n in start)  # esd moved the keys and values
    assert len(calls) == len(rounds) == 2 and all(c["prompt"] == "{}" and c["steps"] == 3 for c in calls)
    assert calls[0]["protocol"]["optimiser"] == "AdamW lr 0.005, weight decay 0.01"
    assert calls[0]["protocol"]["start"] == "the embedding of 'object'" and calls[0]["protocol"]["tokens"] == 1
    for r, (call, erased) in enumerate(zip(calls, rounds, strict=True)):
        # Each attack ran on the weights its round's erase left: moved from the edit start, and from the round before.
        assert all(torch.equal(call["weights"][n], erased["after"][n]) for n in start), r
        before = start if r == 0 else rounds[r - 1]["after"]
        assert any(not torch.equal(erased["after"][n], before[n]) for n in start), r
    # Round 1 erases the concept, round 2 the token round 1 mined; the tokens are collected in order.
    method = reo["method"]
    assert torch.equal(rounds[0]["hidden"], method.concept)
    assert torch.equal(
        rounds[1]["hidden"], encode_with_rows(StableDiffusionAdapter(build_tiny_sd()), "{}", calls[0]["rows"])
    )
    assert len(method.rows) == 2 and all(torch.equal(a, c["rows"]) for a, c in zip(method.rows, calls, strict=True))
    assert method.erase_hidden.shape[0] == 3 and len(method.ste_losses) == 2
    # Stage two started from the edit-start weights bit for bit, with no gradient left over from stage one.
    assert all(torch.equal(reo["weights"][n], start[n]) for n in start)
    assert all(grad is None for grad in reo["grads"])
    # STE's target, by hand on the frozen base: ε*(c) − (s − 1) U(ε*(c), ε*(∅)), s = 3, η = 0.5, r = 0.05.
    frozen = build_tiny_sd()
    (empty,) = encode_plainly(frozen, [""]).chunk(1)
    assert len(targets) == 4  # two rounds of two steps
    for x, t, hidden, target in (targets[0], targets[-1]):
        with torch.no_grad():
            e_c, e_0 = (frozen.unet(x, t, encoder_hidden_states=h).sample for h in (hidden, empty))
        by_hand = e_c.double() - 2 * _hand_update(e_c, e_0, 0.5, 0.05)
        assert torch.allclose(target.double(), by_hand, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- (d) end to end


def test_apply_trains_only_the_declared_tensors_and_reloads_bit_for_bit(tmp_path: Path) -> None:
    base = build_tiny_sd()
    recipe = tiny_recipe(_stereo())
    result = conceptedit.apply(recipe, pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    originals = dict(base.unet.named_parameters())
    moved = {n for n, p in result.pipeline.unet.named_parameters() if not torch.equal(p, originals[n])}
    assert moved and all(".attn2." in n for n in moved)  # parameters: x
    assert set(result.changed) == {f"unet.{n}" for n in moved}
    assert all(
        torch.equal(a, b)
        for a, b in zip(result.pipeline.text_encoder.parameters(), base.text_encoder.parameters(), strict=True)
    )
    fresh = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    edited = dict(result.pipeline.unet.named_parameters())
    assert all(torch.equal(p, edited[n]) for n, p in fresh.unet.named_parameters())
    # The same recipe and seed give the same tensors (stage one included: every draw is seeded).
    conceptedit.apply(recipe, pipeline=build_tiny_sd(), out=tmp_path / "again", quiet=True)
    first, second = (
        load_file(str(tmp_path / "run" / "edit.safetensors")),
        load_file(str(tmp_path / "again" / "edit.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------- (e) recipe errors


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"iterations": 0}, "iterations", "greater than 0"),
        ({"ste_steps": 0}, "ste_steps", "greater than 0"),
        ({"inversion_steps": 0}, "inversion_steps", "greater than 0"),
        ({"gallery_size": 0}, "gallery_size", "greater than 0"),
        ({"sampling_steps": 2}, "sampling_steps", "greater than or equal to 3"),
        ({"ste_guidance": 0.5}, "ste_guidance", "greater than or equal to 1"),
        ({"apg_eta": -1}, "apg_eta", "greater than or equal to 0"),
        ({"apg_norm_threshold": -0.1}, "apg_norm_threshold", "greater than or equal to 0"),
        ({"compositional_guidance_scale": 0}, "compositional_guidance_scale", "greater than 0"),
        ({"anchors": []}, "anchors", "at least 1 item"),
        ({"anchors": ["a gray circle", "a red square"]}, "anchors", "'a red square' mentions the concept 'red'"),
        ({"anchors": ["  "]}, "anchors", "blank"),
        ({"adversarial_concepts": 3}, "adversarial_concepts", "2 STE round(s) mine only 2"),
        ({"inversion_template": "{} and {}"}, "inversion_template", "more than one {}"),
        ({"inversion_init": " "}, "inversion_init", "must not be blank"),
        ({"concept": "  "}, "concept", "must not be blank"),
        ({"parameters": "y"}, "parameters", "'x', 'x-strict', 'u' or 'full'"),
        ({"ste_step": 3}, "ste_step", "did you mean 'ste_steps'"),
    ],
)
def test_bad_parameters_are_recipe_errors_that_name_the_field(params: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(conceptedit.RecipeError, match=field) as info:
        conceptedit.load_recipe(tiny_recipe(_stereo(**params)))
    assert says in str(info.value)


def test_methods_shows_stereo_with_its_paper_and_defaults() -> None:
    result = CliRunner().invoke(app, ["methods", "stereo", "--json"])
    assert result.exit_code == 0, result.output
    (info,) = json.loads(result.stdout)
    assert info["kind"] == "training" and "CVPR 2025" in info["paper"]
    params = {p["name"]: p for p in info["params"]}
    assert set(params) == set(StereoParams.model_fields)
    defaults = {n: params[n]["default"] for n in ("iterations", "ste_steps", "inversion_steps", "gallery_size")}
    assert defaults == {"iterations": 2, "ste_steps": 50, "inversion_steps": 200, "gallery_size": 8}
    assert params["compositional_guidance_scale"]["default"] == 2.0 and params["parameters"]["default"] == "u"
