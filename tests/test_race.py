"""RACE on builtin:tiny-sd: the attack and the loss by hand, the embedding_pgd adversary, a recipe
esd → race end to end with its reload, and the recipe errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conceptedit_builtin.race import Race, RaceParams
from hand import double_tiny_sd, encode_plainly
from torch import Tensor
from typer.testing import CliRunner

import conceptedit
from conceptedit import AttackError
from conceptedit.cli.app import app
from conceptedit.engine.context import derive_seed
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe
from conceptedit.toolkit import EmbeddingPGD, EsdSample, make_adversary

STEPS = 4  # DDIM steps of a full sampling run in these tests


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _race(training: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    return {
        "method": "race",
        "params": {"concept": "nudity", "parameters": "x", "sampling_steps": STEPS, **params},
        "training": {"steps": 2, "lr": 1e-3, **(training or {})},
    }


def _hand_pgd(
    unet: Any, s: EsdSample, clean: Tensor, eps: float, steps: int, alpha: float, seed: int, distance: Callable
) -> Tensor:
    """The reference's pgd_attack, written out: random start in the ε-ball, clamp to [min, max] of the
    clean embedding, then sign steps that lower distance(ε_θ(x_t, t, c'), x_T), each projected back."""
    x_T = torch.randn(s.x.shape[1:], generator=torch.Generator().manual_seed(s.seed))[None]
    low, high = clean.min(), clean.max()
    start = torch.empty(clean.shape).uniform_(-eps, eps, generator=torch.Generator().manual_seed(seed))
    adv = torch.clamp(clean + start, low, high)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        pred = unet(s.x.double(), s.t, encoder_hidden_states=adv.double()).sample.float()
        (grad,) = torch.autograd.grad(distance(pred, x_T), adv)
        stepped = adv.detach() - alpha * grad.sign()
        adv = torch.clamp(clean + torch.clamp(stepped - clean, -eps, eps), low, high)
    return adv.detach()


def _inside_ball(hidden: Tensor, clean: Tensor, eps: float) -> bool:
    """‖hidden − clean‖∞ ≤ ε, up to the float32 rounding of clean + δ (one ulp of the largest value)."""
    ulp = torch.finfo(torch.float32).eps * float(clean.abs().max())
    return float((hidden - clean).abs().max()) <= eps + ulp


# ------------------------------------------------------------------------------------ (a) by hand


@pytest.mark.parametrize(("adv_loss", "lasso"), [("l2", False), ("l1", True)])
def test_the_attack_and_the_loss_are_the_reference_formulas_computed_by_hand(
    adv_loss: str, lasso: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[EsdSample, int, Tensor]] = []
    held: list[dict[str, Tensor]] = []
    real_attack, real_loss = Race.attack, Race.trajectory_loss

    def attack(self: Race, ctx: Any, s: EsdSample, draw: int) -> Any:
        found = real_attack(self, ctx, s, draw)
        seen.append((s, draw, found.hidden.clone()))
        return found

    def loss(self: Race, ctx: Any, step: int) -> dict[str, Tensor]:
        held.append({name: p.detach().clone() for name, p in ctx.pipeline.unet.named_parameters()})
        return real_loss(self, ctx, step)

    monkeypatch.setattr(Race, "attack", attack)
    monkeypatch.setattr(Race, "trajectory_loss", loss)
    eps, eta, attack_steps = 0.05, 0.7, 3
    edit = _race(eta=eta, epsilon=eps, attack_steps=attack_steps, adv_loss=adv_loss, lasso=lasso, lasso_lambda=0.3)
    conceptedit.apply(tiny_recipe(edit), pipeline=double_tiny_sd(), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "race.jsonl").read_text().splitlines()]
    assert len(log) == len(seen) == len(held) == 2

    frozen, trained = double_tiny_sd(), double_tiny_sd()
    c, empty = encode_plainly(frozen, ["nudity", ""]).chunk(2)
    original = {n: w.detach() for n, w in frozen.unet.named_parameters()}
    distance = F.mse_loss if adv_loss == "l2" else F.l1_loss
    for step, (row, (s, draw, hidden), weights) in enumerate(zip(log, seen, held, strict=True), start=1):
        assert draw == step - 1 and s.seed == derive_seed(0, 0, "race", "noise", draw)
        trained.unet.load_state_dict(weights)
        # The attack: the reference's PGD against the model as it is at this step, seeded per draw.
        by_hand = _hand_pgd(
            trained.unet, s, c, eps, attack_steps, eps / 4, derive_seed(0, 0, "race", "attack", draw), distance
        )
        assert torch.equal(hidden, by_hand), (step, float((hidden - by_hand).abs().max()))
        assert _inside_ball(hidden, c, eps) and not torch.equal(hidden, c)
        # The loss: MSE of the prediction on the attacked embedding to ESD's target of the frozen original.
        with torch.no_grad():
            x = s.x.double()
            e_c = frozen.unet(x, s.t, encoder_hidden_states=c.double()).sample
            e_0 = frozen.unet(x, s.t, encoder_hidden_states=empty.double()).sample
            prediction = trained.unet(x, s.t, encoder_hidden_states=hidden.double()).sample
        erase = float(((prediction - (e_0 - eta * (e_c - e_0))) ** 2).mean())
        assert row["erase"] == pytest.approx(erase, rel=1e-5), step
        if lasso:  # λ Σ mean|W − W₀| over the trained (attn2) tensors; W₀ = the edit's start, here the base
            l1 = sum(float((weights[n] - original[n]).abs().mean()) for n in weights if ".attn2." in n)
            assert row["lasso"] == pytest.approx(0.3 * l1, rel=1e-5, abs=1e-12)
            assert (row["lasso"] > 0) == (step > 1)
        assert row["total"] == pytest.approx(row["erase"] + row.get("lasso", 0.0), rel=1e-6)


# ------------------------------------------------------------------------------- (b) the adversary


@pytest.fixture(scope="module")
def tiny() -> Any:
    return StableDiffusionAdapter(build_tiny_sd())


def _denoising_objective(tiny: Any) -> Callable[[Tensor], Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tiny.latent_shape(1), generator=g)
    goal = torch.randn(x.shape, generator=g)
    t = torch.tensor([500])
    return lambda hidden: F.mse_loss(tiny.predict_noise(x, t, hidden).float(), goal)


def test_embedding_pgd_lowers_its_objective_inside_the_ball_and_the_range(tiny: Any) -> None:
    objective = _denoising_objective(tiny)
    clean = tiny.encode_prompts(["a red circle"]).hidden
    attack = make_adversary("embedding_pgd", tiny, radius=0.2, steps=12, seed=4)
    assert isinstance(attack, EmbeddingPGD) and attack.step_size == pytest.approx(0.05)  # ε/4 by default
    found = attack.attack("a red circle", objective)
    assert found.steps == 12 and len(found.losses) == 12
    with torch.no_grad():
        before, after = float(objective(clean)), float(objective(found.hidden))
    assert after < before and found.losses[-1] < found.losses[0], (before, after, found.losses)
    moved = (found.hidden - clean).abs()
    assert _inside_ball(found.hidden, clean, 0.2) and float(moved.max()) > 0.1  # it used the ball
    assert clean.min() <= found.hidden.min() and found.hidden.max() <= clean.max()  # and stayed in range
    # What it reports: the prompt's own ids and token embeddings, every position adversarial.
    assert found.text == "a red circle" and torch.equal(found.ids, tiny.tokenize(["a red circle"]))
    assert torch.equal(found.embeddings, tiny.token_embedding_table().detach()[found.ids])
    assert found.slots == tuple(range(77))
    # The model gets no gradient, from the prompt or from an encoding given directly.
    assert all(p.grad is None for p in [*tiny.unet.parameters(), *tiny.text_encoder.parameters()])
    protocol = attack.protocol()
    assert protocol["kind"] == "embedding_pgd" and protocol["radius"] == 0.2 and protocol["step_size"] == 0.05


def test_embedding_pgd_is_seeded_and_attack_hidden_is_what_attack_runs(tiny: Any) -> None:
    objective = _denoising_objective(tiny)
    clean = tiny.encode_prompts(["a red circle"]).hidden
    attack = EmbeddingPGD(tiny, radius=0.1, steps=4, seed=7)
    found = attack.attack("a red circle", objective)
    direct = attack.attack_hidden(clean, objective)
    assert torch.equal(found.hidden, direct.hidden) and found.losses == direct.losses
    assert direct.ids.shape == (1, 0) and direct.embeddings.shape == (1, 0, clean.shape[-1]) and direct.text == ""
    assert torch.equal(
        EmbeddingPGD(tiny, radius=0.1, steps=4, seed=7).attack_hidden(clean, objective).hidden, direct.hidden
    )
    other = attack.attack_hidden(clean, objective, seed=8)  # a per-call seed replaces the adversary's
    assert not torch.equal(other.hidden, direct.hidden)
    assert torch.equal(
        EmbeddingPGD(tiny, radius=0.1, steps=4, seed=8).attack_hidden(clean, objective).hidden, other.hidden
    )
    # Without a random start the first loss is the clean embedding's; without the clamp the range may grow.
    plain = EmbeddingPGD(tiny, radius=0.1, steps=2, random_start=False, clamp_to_range=False)
    first = plain.attack_hidden(clean, objective)
    with torch.no_grad():
        assert first.losses[0] == pytest.approx(float(objective(clean)), rel=1e-6)
    assert all(p.grad is None for p in tiny.unet.parameters())


def test_embedding_pgd_check_stops_early_and_bad_options_are_refused(tiny: Any) -> None:
    seen: list[int] = []

    def check(found: Any) -> bool:
        seen.append(found.steps)
        return found.steps >= 4

    found = EmbeddingPGD(tiny, steps=10).attack("a cat", lambda h: h.pow(2).mean(), check=check, check_every=2)
    assert seen == [2, 4] and found.steps == 4 and len(found.losses) == 4
    for bad in ({"radius": -0.1}, {"radius": 0.0}, {"steps": 0}, {"step_size": -1.0}):
        with pytest.raises(AttackError, match="embedding_pgd: steps must be at least 1"):
            make_adversary("embedding_pgd", tiny, **bad)
    with pytest.raises(AttackError, match="no option epsilon; its options: radius, steps, step_size"):
        make_adversary("embedding_pgd", tiny, epsilon=0.1)


# ---------------------------------------------------------------------------- (c) esd → race, reload


def test_esd_then_race_trains_only_declared_tensors_and_reloads_bit_for_bit(tmp_path: Path) -> None:
    esd = {
        "method": "esd",
        "params": {"concept": "nudity", "parameters": "x-strict", "sampling_steps": STEPS, "sample_with": "base"},
        "training": {"steps": 2, "lr": 1e-3},
    }
    race = _race(lasso=True, reference="base", sample_with="edit_start", trajectories=2)
    base = build_tiny_sd()
    result = conceptedit.apply(tiny_recipe(esd, race), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)

    originals = dict(base.unet.named_parameters())
    moved = {n for n, p in result.pipeline.unet.named_parameters() if not torch.equal(p, originals[n])}
    assert moved == {n for n in originals if ".attn2." in n}  # esd: to_k/to_v; race: all of attn2
    assert set(result.changed) == {f"unet.{n}" for n in moved}
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "race.jsonl").read_text().splitlines()]
    # The lasso's W₀ is where race started (the ESD model), not the base: nothing to pull at step 1.
    assert [row["lasso"] == 0.0 for row in log] == [True, False] and all(row["erase"] > 0 for row in log)

    fresh = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    edited = dict(result.pipeline.unet.named_parameters())
    assert all(torch.equal(p, edited[n]) for n, p in fresh.unet.named_parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.text_encoder.parameters(), base.text_encoder.parameters(), strict=True)
    )


# -------------------------------------------------------------------------------- (d) recipe errors


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"epsilon": -0.1}, "epsilon", "greater than 0"),
        ({"epsilon": 0}, "epsilon", "greater than 0"),
        ({"attack_steps": 0}, "attack_steps", "greater than 0"),
        ({"attack_step_size": -0.01}, "attack_step_size", "greater than 0"),
        ({"lasso_lambda": -1}, "lasso_lambda", "greater than or equal to 0"),
        ({"adv_loss": "l3"}, "adv_loss", "'l2' or 'l1'"),
        ({"parameters": None}, "parameters", "'x', 'x-strict', 'u' or 'full'"),
        ({"concept": "  "}, "concept", "must name the concept"),
    ],
)
def test_bad_parameters_are_recipe_errors_that_name_the_field(params: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(conceptedit.RecipeError, match=field) as info:
        conceptedit.load_recipe(tiny_recipe(_race(**params)))
    assert says in str(info.value)


def test_parameters_has_no_default_as_in_the_reference() -> None:
    edit = _race()
    del edit["params"]["parameters"]
    with pytest.raises(conceptedit.RecipeError, match="parameters"):
        conceptedit.load_recipe(tiny_recipe(edit))


def test_methods_shows_race_with_its_paper_and_defaults() -> None:
    result = CliRunner().invoke(app, ["methods", "race", "--json"])
    assert result.exit_code == 0, result.output
    (info,) = json.loads(result.stdout)
    assert info["kind"] == "training" and "ECCV 2024" in info["paper"]
    params = {p["name"]: p for p in info["params"]}
    assert set(params) == set(RaceParams.model_fields)
    defaults = {name: params[name]["default"] for name in ("epsilon", "attack_steps", "adv_loss", "lasso_lambda")}
    assert defaults == {"epsilon": 0.1, "attack_steps": 10, "adv_loss": "l2", "lasso_lambda": 0.1}
    assert params["timestep_pairing"]["default"] == "compvis" and params["sample_with"]["default"] == "current"
