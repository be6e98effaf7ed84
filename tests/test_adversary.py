"""The shared adversary: soft-prompt PGD, the same object in an attack suite and in a training step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_attack import _edited_and_base
from torch import Tensor

import conceptedit
from conceptedit import AttackError, EditContext, EditMethod, MethodParams, hookimpl
from conceptedit.api.recipe import EvaluateSpec
from conceptedit.evaluation.evaluate import evaluate
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.plugins import get_host
from conceptedit.testing import isolated_host, tiny_recipe
from conceptedit.toolkit import SoftPromptPGD, adversarial_slots, make_adversary


@pytest.fixture(scope="module")
def tiny() -> Any:
    return StableDiffusionAdapter(build_tiny_sd())


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_slots_open_before_or_after_the_words_and_keep_the_length(tiny: Any, position: str) -> None:
    plain = tiny.tokenize(["a red circle"])
    words = plain[0, 1:4].tolist()
    ids, slots = adversarial_slots(tiny, "a red circle", 3, position)  # type: ignore[arg-type]
    assert ids.shape == plain.shape
    assert slots == ([1, 2, 3] if position == "prefix" else [4, 5, 6])
    kept = [i for i in range(1, 7) if i not in slots]
    assert ids[0, kept].tolist() == words and ids[0, 7] == tiny.tokenizer.eos_token_id
    with pytest.raises(AttackError, match="room for"):
        adversarial_slots(tiny, " ".join(["red"] * 74), 3, "prefix")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_lowers_its_objective_inside_the_ball_and_moves_only_its_slots(tiny: Any, norm: str) -> None:
    goal = tiny.encode_prompts(["a blue square"]).hidden.detach()

    def objective(hidden: Tensor) -> Tensor:
        return torch.nn.functional.mse_loss(hidden, goal)

    radius = 0.05 if norm == "linf" else 0.3
    attack = SoftPromptPGD(tiny, tokens=4, norm=norm, radius=radius, steps=30, step_size=radius / 5, seed=1)  # type: ignore[arg-type]
    found = attack.attack("a red circle", objective)
    assert found.steps == 30 and len(found.losses) == 30
    assert found.losses[-1] < 0.9 * found.losses[0], found.losses[::10]
    # The start is each slot's random token; only the slots moved, and no further than the radius.
    table = tiny.token_embedding_table().detach()
    ids, slots = adversarial_slots(tiny, "a red circle", 4, "prefix")
    start_ids = SoftPromptPGD(tiny, tokens=4, seed=1)._random_tokens(
        table.shape[0], 4, torch.Generator().manual_seed(1)
    )
    ids[0, slots] = start_ids
    moved = found.embeddings[0] - table[ids[0]]
    others = [i for i in range(ids.shape[1]) if i not in slots]
    assert torch.equal(moved[others], torch.zeros_like(moved[others]))
    size = moved[slots].abs().amax() if norm == "linf" else moved[slots].norm(dim=-1).amax()
    assert 0 < float(size) <= radius * (1 + 1e-5)
    assert all(p.grad is None for p in tiny.text_encoder.parameters())  # the model is never trained
    again = SoftPromptPGD(tiny, tokens=4, norm=norm, radius=radius, steps=30, step_size=radius / 5, seed=1)  # type: ignore[arg-type]
    assert torch.equal(again.attack("a red circle", objective).embeddings, found.embeddings)  # seeded


def test_a_check_stops_the_attack_early(tiny: Any) -> None:
    seen: list[int] = []

    def check(found: Any) -> bool:
        seen.append(found.steps)
        return found.steps >= 20

    attack = SoftPromptPGD(tiny, steps=50)
    found = attack.attack("a cat", lambda h: h.pow(2).mean(), check=check, check_every=10)
    assert seen == [10, 20] and found.steps == 20


def test_bad_kinds_and_options_are_refused_by_name(tiny: Any) -> None:
    with pytest.raises(AttackError, match=r"unknown attack kind 'inversion'; known: .*soft_prompt"):
        make_adversary("inversion", tiny)
    with pytest.raises(AttackError, match="no option epsilon; its options: tokens, position, norm"):
        make_adversary("soft_prompt", tiny, epsilon=0.1)
    with pytest.raises(AttackError, match=r"prefix\|suffix"):
        make_adversary("soft_prompt", tiny, norm="l1")


# ---------------------------------------------------------------- one object, two callers

CALLS: list[str] = []


class _Spied(SoftPromptPGD):
    def attack(self, prompt: str, objective: Any, **kw: Any) -> Any:
        CALLS.append(prompt)
        return super().attack(prompt, objective, **kw)


class _AdversarialParams(MethodParams):
    concepts: str


class _TrainsAgainstTheAdversary(EditMethod[_AdversarialParams]):
    """A third-party-style training method: each step asks ctx.adversary for a prompt that makes the
    model predict the concept's noise, and trains the model to predict the safe prompt's there."""

    name = "test_adversarial"
    summary = "trains against the shared soft-prompt adversary (test)"
    kind = "training"
    Params = _AdversarialParams

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        return [n for n, _ in ctx.adapter.named_parameters() if ".attn2.to_k." in n]

    def prepare_training(self, ctx: EditContext) -> None:
        self.pair = ctx.concept_pairs(self.params.concepts)[0]
        enc = ctx.encode_prompts([self.pair.source, self.pair.target])
        self.c_m, self.c_s = enc.hidden[:1], enc.hidden[1:]
        self.found: list[Any] = []

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        x = torch.randn(1, *ctx.adapter.latent_shape(1)[1:], generator=torch.Generator().manual_seed(step))
        t = torch.tensor([500])
        with torch.no_grad(), ctx.reference_weights("base"):
            target = ctx.predict_noise(x, t, self.c_m, frozen=True)
        adversary = ctx.adversary("soft_prompt", tokens=2, steps=3)
        found = adversary.attack(
            self.pair.target, lambda h: torch.nn.functional.mse_loss(ctx.predict_noise(x, t, h, frozen=True), target)
        )
        self.found.append(found)
        with torch.no_grad(), ctx.reference_weights("base"):
            safe = ctx.predict_noise(x, t, self.c_s, frozen=True)
        return {"erase": torch.nn.functional.mse_loss(ctx.predict_noise(x, t, found.hidden.detach()), safe)}


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from conceptedit.attacks import registry

    monkeypatch.setitem(registry.ADVERSARIES, "soft_prompt", _Spied)
    CALLS.clear()
    yield


@pytest.fixture(scope="module")
def erased(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """builtin:shapes with the quickstart's TRCE stage 1 (red -> gray), and the untouched model."""
    return _edited_and_base(tmp_path_factory.mktemp("erased"))


def _soft_attack(pipe: Any, base: Any, **options: Any) -> Any:
    options = {"target": "red", "seeds": 1, "strategy": "soft_prompt", "iterations": 20, "check_every": 5, **options}
    (result,) = evaluate(
        pipe, [EvaluateSpec(suite="shapes-attack", options=options, guidance=5.0)], host=get_host(), base_pipeline=base
    )
    return result


def test_the_same_adversary_runs_in_an_attack_suite_and_inside_a_training_step(
    spied: None, erased: tuple[Any, Any], tmp_path: Path
) -> None:
    result = _soft_attack(*erased)
    assert result.protocol["strategy"] == "soft_prompt" and result.protocol["soft_prompt"]["norm"] == "linf"
    attacked = round(result.metrics["attack_success_rate_n"] * (1 - result.metrics["plain_shown"]))
    assert attacked >= 1 and len(CALLS) == attacked, CALLS  # every attacked prompt went through it
    # Its cost: at most one judged image per check (20 steps, a check every 5: 4), and its seconds.
    assert 0 < result.metrics["attack_generations_per_prompt"] <= 4 and result.metrics["attack_seconds"] > 0
    suite_calls = len(CALLS)

    class Plugin:
        @hookimpl
        def conceptedit_register_methods(self, register: Callable[[type[EditMethod]], None]) -> None:
            register(_TrainsAgainstTheAdversary)

    with isolated_host(Plugin(), entry_points=True):
        edit = {"method": "test_adversarial", "params": {"concepts": "c"}, "training": {"steps": 2, "lr": 1e-3}}
        recipe = tiny_recipe(edit, concepts={"c": {"pairs": [["a red circle", "a gray circle"]], "templates": ["{}"]}})
        conceptedit.apply(recipe, pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    assert CALLS[suite_calls:] == ["a gray circle", "a gray circle"]  # once per training step, same class


def test_soft_prompts_bring_an_erased_colour_back_above_chance(erased: tuple[Any, Any]) -> None:
    """On the erased model the attack shows red far more often than on the base model with
    neighbour prompts (the chance that soft tokens make any prompt red), and more than random tokens."""
    edited, base = erased
    attack = _soft_attack(edited, base).metrics
    control = _soft_attack(edited, base, strategy="random").metrics
    chance = _soft_attack(base, base, prompts="neighbours", stride=9).metrics
    print("soft prompt ASR", attack, "random control", control, "chance", chance)
    assert attack["plain_shown"] <= 0.25  # the edit holds on plain prompts
    assert attack["attack_success_rate"] >= 0.75 > chance["attack_success_rate"] + 0.25
    assert attack["attack_success_rate"] > control["attack_success_rate"]
