"""AdvUnlearn on builtin:tiny-sd: its loss by hand, which weights move, the text-encoder delta, its recipe errors,
and the soft-prompt adversary's options it relies on (Adam steps, no ball, a given start)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conceptedit_builtin.advunlearn import AdvUnlearn, default_retain
from hand import RecordedSoftPrompt, double_tiny_sd, record_soft_prompts
from torch import Tensor
from typer.testing import CliRunner

import conceptedit
from conceptedit import AttackError, EditContext, EditMethod, MethodParams, hookimpl
from conceptedit.cli.app import app
from conceptedit.io.edit_file import read_edit
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe
from conceptedit.toolkit import SoftPromptPGD, StableDiffusionAdapter, adversarial_slots

STEPS = 4  # DDIM steps of a full sampling run in these tests


class _NudgeParams(MethodParams):
    pass


class _NudgeUnet(EditMethod[_NudgeParams]):
    """Trains one UNet key projection a little: makes an AdvUnlearn run's delta touch the UNet too."""

    name = "test_nudge_unet"
    summary = "moves one attn2.to_k (test)"
    kind = "training"
    Params = _NudgeParams

    def trainable_parameters(self, ctx: EditContext) -> Iterable[str]:
        return [ctx.cross_attention_layers()[0].parameter_name("k")]

    def trajectory_loss(self, ctx: EditContext, step: int) -> dict[str, Tensor]:
        x = torch.randn(ctx.adapter.latent_shape(1), generator=torch.Generator().manual_seed(step))
        hidden = ctx.encode_prompts(["a cat"]).hidden
        return {"nudge": ctx.predict_noise(x, torch.tensor([500]), hidden).pow(2).mean()}


class _Plugin:
    @hookimpl
    def conceptedit_register_methods(self, register: Callable[[type[EditMethod]], None]) -> None:
        register(_NudgeUnet)


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(_Plugin(), entry_points=True) as host:
        yield host


def _adv(training: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    return {
        "method": "advunlearn",
        "params": {"concept": "a red circle", "sampling_steps": STEPS, "retain_batch": 2, "warmup_steps": 1, **params},
        "training": {"steps": 3, "lr": 1e-3, **(training or {})},
    }


def _hidden(pipe: Any, prompts: list[str]) -> Tensor:
    """Text embeddings computed with the tokenizer and text encoder alone (rounded to float32, as the
    engine hands every encoding to the UNet)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].float()


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> type[RecordedSoftPrompt]:
    return record_soft_prompts(monkeypatch)


# ----------------------------------------------------------------------------- (a) the loss, by hand


def test_each_step_is_esd_on_the_adversarial_prompt_plus_weighted_retain_mse(
    spied: type[RecordedSoftPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every logged step equals, recomputed with diffusers: MSE(ε(x, t, E_θ(adv)), ε*(∅) − η(ε*(c) − ε*(∅))) +
    γ·MSE(ε(x_r, t, E_θ(r)), ε*(x_r, t, E_0(r))), with `adv` what the soft-prompt adversary returned that step
    (the plain concept during warm-up), E_θ the text encoder the step started from, ε* and E_0 the original."""
    concept: dict[int, tuple[Tensor, Tensor]] = {}
    retained: dict[int, tuple[list[str], Tensor]] = {}
    held: list[dict[str, Tensor]] = []
    real_concept, real_retain, real_loss = (
        AdvUnlearn.concept_sample,
        AdvUnlearn.retain_sample,
        AdvUnlearn.trajectory_loss,
    )

    def concept_sample(self: AdvUnlearn, ctx: Any, row: int) -> tuple[Tensor, Tensor]:
        concept[row] = real_concept(self, ctx, row)
        return concept[row]

    def retain_sample(self: AdvUnlearn, ctx: Any, draw: int, t: Tensor) -> Any:
        out = real_retain(self, ctx, draw, t)
        retained[draw] = (out[0], out[1])
        return out

    def trajectory_loss(self: AdvUnlearn, ctx: Any, step: int) -> dict[str, Tensor]:
        held.append({n: p.detach().clone() for n, p in ctx.pipeline.text_encoder.named_parameters()})
        return real_loss(self, ctx, step)

    monkeypatch.setattr(AdvUnlearn, "concept_sample", concept_sample)
    monkeypatch.setattr(AdvUnlearn, "retain_sample", retain_sample)
    monkeypatch.setattr(AdvUnlearn, "trajectory_loss", trajectory_loss)
    eta, gamma = 0.7, 0.5
    edit = _adv(eta=eta, retain_weight=gamma)
    conceptedit.apply(tiny_recipe(edit), pipeline=double_tiny_sd(), out=tmp_path / "run", quiet=True)
    log = [json.loads(x) for x in (tmp_path / "run" / "logs" / "advunlearn.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and len(held) == 3

    # fast_at, the default: the shared adversary, one signed Adam step of 1e-3 on one unbounded prefix token
    assert len(spied.made) == len(spied.found) == 2  # steps 2 and 3; step 1 is the warm-up
    for attack in spied.made:
        assert attack.tokens == 1 and attack.position == "prefix" and attack.radius is None
        assert attack.update == "adam_sign" and attack.steps == 1 and attack.step_size == 1e-3
    assert all(found.steps == 1 and found.slots == (1,) for found in spied.found)

    frozen, trained = double_tiny_sd(), double_tiny_sd()
    c, empty = _hidden(frozen, ["a red circle"]), _hidden(frozen, [""])
    for step, (row, weights) in enumerate(zip(log, held, strict=True), start=1):
        with torch.no_grad():
            for name, p in trained.text_encoder.named_parameters():
                p.copy_(weights[name])
        x, t = (v.double() if v.is_floating_point() else v for v in concept[step - 1])
        if step == 1:
            cond = _hidden(trained, ["a red circle"])
        else:
            found = spied.found[step - 2]
            cond = StableDiffusionAdapter(trained).encode_token_embeddings(found.ids, found.embeddings)
        prompts, xr = retained[step - 1]
        assert set(prompts) <= set(default_retain("a red circle")) and len(prompts) == 2
        with torch.no_grad():
            e_c = frozen.unet(x, t, encoder_hidden_states=c.double()).sample
            e_0 = frozen.unet(x, t, encoder_hidden_states=empty.double()).sample
            erase = (trained.unet(x, t, encoder_hidden_states=cond.double()).sample - (e_0 - eta * (e_c - e_0))) ** 2
            tr, hr = t.expand(len(prompts)), xr.double()
            goal = frozen.unet(hr, tr, encoder_hidden_states=_hidden(frozen, prompts).double()).sample
            kept = trained.unet(hr, tr, encoder_hidden_states=_hidden(trained, prompts).double()).sample
        by_hand = {"erase": float(erase.mean()), "retain": gamma * float(((kept - goal) ** 2).mean())}
        # float32 rounding only (the plugin averages float32 copies); the retain term is exactly 0 at step 1
        assert row["erase"] == pytest.approx(by_hand["erase"], rel=1e-5), step
        assert row["retain"] == pytest.approx(by_hand["retain"], rel=1e-4, abs=1e-12), step
        assert row["total"] == pytest.approx(row["erase"] + row["retain"], rel=1e-6)
    assert log[0]["retain"] == 0 < log[1]["retain"]  # E_θ = E_0 before the first update, not after


def test_pgd_mode_refreshes_every_n_steps_starting_from_the_latest_prompt(
    spied: type[RecordedSoftPrompt], tmp_path: Path
) -> None:
    edit = _adv(attack_method="pgd", attack_steps=3, attack_every=2, attack_init="latest", training={"steps": 5})
    conceptedit.apply(tiny_recipe(edit), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    assert len(spied.found) == 2  # warm-up step 1, then refreshes at steps 2 and 4
    first, second = spied.made
    assert first.update == second.update == "adam" and first.steps == 3 and first.start is None
    assert second.start is not None
    assert torch.equal(second.start, spied.found[0].embeddings[0, list(spied.found[0].slots)])
    assert all(len(found.losses) == 3 for found in spied.found)


# ----------------------------------------------------------------------------- (b) what trains

LAYER_CHOICES = {
    "all layers, final norm (the reference default)": ({}, r"encoder\.layers\.\d+\.|final_layer_norm\."),
    "layer 1 self-attention": ({"layers": [1], "component": "attn"}, r"encoder\.layers\.1\.self_attn\."),
    "first layer's mlp and the final norm": (
        {"layers": "first:1", "component": "ffn", "final_layer_norm": True},
        r"encoder\.layers\.0\.mlp\.|final_layer_norm\.",
    ),
}


@pytest.mark.parametrize("choice", sorted(LAYER_CHOICES))
def test_only_the_chosen_text_encoder_layers_move_and_the_unet_stays_bit_identical(choice: str, tmp_path: Path) -> None:
    params, pattern = LAYER_CHOICES[choice]
    edit = _adv(trajectories=2, training={"steps": 2}, **params)  # a cached pool of latents, this time
    result = conceptedit.apply(tiny_recipe(edit), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    base = build_tiny_sd()
    te = dict(base.text_encoder.named_parameters())
    moved = {n for n, p in result.pipeline.text_encoder.named_parameters() if not torch.equal(p, te[n])}
    declared = {n for n in te if re.search(pattern, n)}
    assert moved <= declared, moved - declared
    # A key bias cannot change self-attention (softmax ignores a per-row constant): it may not move.
    assert {n for n in declared - moved if not n.endswith("self_attn.k_proj.bias")} == set()
    assert not any("embeddings." in n for n in moved)
    unet = dict(base.unet.named_parameters())
    assert all(torch.equal(p, unet[n]) for n, p in result.pipeline.unet.named_parameters())
    assert result.changed and all(n.startswith("text_encoder.") for n in result.changed)


# ----------------------------------------------------------------------------- (c) the text-encoder delta


def _fine_tuned_unet(pipe: Any) -> Any:
    """The same base with every UNet weight moved: what a fine-tune of that base looks like to a loader."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return pipe


def _weights(module: Any) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_a_text_encoder_delta_loads_bit_identically_into_any_unet_of_the_same_base(tmp_path: Path) -> None:
    result = conceptedit.apply(tiny_recipe(_adv()), pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    tensors, meta = read_edit(tmp_path / "run" / "edit.safetensors")
    assert meta["scope"] == "text_encoder" and meta["components"] == ["text_encoder"]
    assert "any pipeline whose text encoder is the base model's" in meta["portable"]
    manifest = conceptedit.read_manifest(tmp_path / "run")
    assert manifest["edit_scope"] == {k: meta[k] for k in ("scope", "components", "portable")}
    trained = _weights(result.pipeline.text_encoder)

    fresh = conceptedit.load(build_tiny_sd(), tmp_path / "run")
    tuned = _fine_tuned_unet(build_tiny_sd())
    tuned_unet = _weights(tuned.unet)
    conceptedit.load(tuned, tmp_path / "run")  # its UNet is not the base's: loads all the same
    for pipe in (fresh, tuned):
        assert all(torch.equal(p, trained[n]) for n, p in pipe.text_encoder.named_parameters())
    assert all(torch.equal(p, tuned_unet[n]) for n, p in tuned.unet.named_parameters())  # left as it was
    # every text-encoder weight but the token and position embeddings (the reference's text_encoder_full)
    assert set(tensors) == {f"text_encoder.{n}" for n in trained if "embeddings." not in n}

    # the refusals stay for the tensors it replaces: a text encoder that is not the base's
    other = build_tiny_sd()
    with torch.no_grad():
        next(p for n, p in other.text_encoder.named_parameters() if "layers.0.mlp" in n).add_(1e-3)
    with pytest.raises(conceptedit.RunDirError, match=r"not the base.*Edit scope text_encoder: text-encoder delta"):
        conceptedit.load(other, tmp_path / "run")


def test_a_delta_that_also_changes_the_unet_is_refused_on_another_unet(tmp_path: Path) -> None:
    nudge = {"method": "test_nudge_unet", "training": {"steps": 1, "lr": 1e-2}}
    recipe = tiny_recipe(_adv(training={"steps": 1}), nudge)
    conceptedit.apply(recipe, pipeline=build_tiny_sd(), out=tmp_path / "run", quiet=True)
    _, meta = read_edit(tmp_path / "run" / "edit.safetensors")
    assert meta["scope"] == "base_model" and meta["components"] == ["text_encoder", "unet"]
    conceptedit.load(build_tiny_sd(), tmp_path / "run")  # the base itself: fine
    with pytest.raises(conceptedit.RunDirError, match=r"unet\..*attn2\.to_k.* is not the base.*scope base_model"):
        conceptedit.load(_fine_tuned_unet(build_tiny_sd()), tmp_path / "run")


def test_the_cli_says_the_run_is_a_text_encoder_delta(tmp_path: Path) -> None:
    recipe = tmp_path / "adv.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(_adv(training={"steps": 1}))))
    args = ["apply", str(recipe), "--out", str(tmp_path / "run")]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "edit.safetensors is a text-encoder delta: loads into any pipeline" in " ".join(shown.output.split())


def test_edit_files_written_before_the_scope_keys_read_with_a_derived_scope(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    old = tmp_path / "edit.safetensors"
    meta = {"format": "conceptedit.edit", "format_version": "1", "base_digests": "{}"}
    save_file({"text_encoder.final_layer_norm.bias": torch.zeros(2)}, str(old), metadata=meta)
    _, read = read_edit(old)
    assert read["scope"] == "text_encoder" and read["components"] == ["text_encoder"]
    save_file({"unet.conv_in.bias": torch.zeros(2)}, str(old), metadata=meta)
    assert read_edit(old)[1]["scope"] == "base_model"


# ----------------------------------------------------------------------------- (d) recipe errors


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"retain_wieght": 0.1}, "did you mean 'retain_weight'"),
        ({"concept": "  "}, "concept: nudity"),
        ({"layers": "middle:2"}, "use all, first:N, last:N"),
        ({"layers": "first:0"}, "use all, first:N, last:N"),
        ({"layers": []}, "at least one layer"),
        ({"layers": [0, 0]}, "each once"),
        ({"component": "self_attn"}, "'attn'"),
        ({"retain": ["a cat"], "retain_file": "captions.txt"}, "not both"),
        ({"retain_limit": 5}, "retain_file only"),
        ({"retain": ["a cat", " "]}, "no blank ones"),
        ({"attack_method": "free_at"}, "'fast_at'"),
        ({"attack_tokens": 0}, "attack_tokens"),
        ({"retain_weight": -1}, "retain_weight"),
    ],
)
def test_bad_parameters_are_recipe_errors_that_name_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(conceptedit.RecipeError, match=re.escape(message)):
        conceptedit.load_recipe(tiny_recipe(_adv(**params)))


def test_layers_the_text_encoder_lacks_are_named_before_training(tmp_path: Path) -> None:
    for layers, message in (([5], r"layers \[5\]: the text encoder has 2 layers"), ("last:3", "has only 2 layers")):
        with pytest.raises(conceptedit.EditError, match=message):
            conceptedit.apply(
                tiny_recipe(_adv(layers=layers)), pipeline=build_tiny_sd(), out=tmp_path / "r", quiet=True
            )


# ----------------------------------------------------------------------------- the adversary's options


@pytest.fixture(scope="module")
def tiny() -> Any:
    return StableDiffusionAdapter(build_tiny_sd())


def _goal_objective(tiny: Any) -> Callable[[Tensor], Tensor]:
    goal = tiny.encode_prompts(["a blue square"]).hidden.detach()
    return lambda hidden: torch.nn.functional.mse_loss(hidden, goal)


def test_soft_prompt_adam_without_a_ball_is_adam_on_the_rows_from_the_given_start(tiny: Any) -> None:
    objective = _goal_objective(tiny)
    table = tiny.token_embedding_table().detach()
    start = table[[320, 1000]].clone() + 0.01
    found = SoftPromptPGD(tiny, tokens=2, radius=None, steps=6, step_size=0.05, update="adam", start=start).attack(
        "a red circle", objective
    )
    ids, slots = adversarial_slots(tiny, "a red circle", 2, "prefix")
    rows = start.clone().requires_grad_(True)
    adam = torch.optim.Adam([rows], lr=0.05)
    for _ in range(6):  # the same steps written out: Adam on the two rows, nothing projected
        embeds = table[ids].clone()
        embeds[0, slots] = rows
        adam.zero_grad()
        objective(tiny.encode_token_embeddings(ids, embeds)).backward()
        adam.step()
    torch.testing.assert_close(found.embeddings[0, slots], rows.detach(), atol=1e-6, rtol=0)
    assert float((found.embeddings[0, slots] - start).abs().amax()) > 0.1  # beyond any default ball (0.05)
    assert found.losses[-1] < found.losses[0]


def test_soft_prompt_adam_sign_takes_one_fgsm_step(tiny: Any) -> None:
    objective = _goal_objective(tiny)
    table = tiny.token_embedding_table().detach()
    start = table[[4000]].clone()
    found = SoftPromptPGD(tiny, tokens=1, radius=None, steps=1, step_size=1e-3, update="adam_sign", start=start).attack(
        "a red circle", objective
    )
    ids, slots = adversarial_slots(tiny, "a red circle", 1, "prefix")
    row = start.clone().requires_grad_(True)
    embeds = table[ids].clone()
    embeds[0, slots] = row
    (grad,) = torch.autograd.grad(objective(tiny.encode_token_embeddings(ids, embeds)), [row])
    # Adam's first step on sign(g) is lr·sign(g)/(1 + eps): a signed step of the learning rate
    torch.testing.assert_close(found.embeddings[0, slots] - start, -1e-3 * grad.sign(), atol=1e-9, rtol=1e-6)


def test_soft_prompt_defaults_are_unchanged_and_bad_new_options_are_refused(tiny: Any) -> None:
    protocol = SoftPromptPGD(tiny).protocol()
    assert protocol["update"] == "pgd" and protocol["radius"] == 0.05 and protocol["start"].startswith("random")
    with pytest.raises(AttackError, match="pgd, adam or adam_sign"):
        SoftPromptPGD(tiny, update="sgd")  # type: ignore[arg-type]
    with pytest.raises(AttackError, match=r"one row per token, \[2, D\]"):
        SoftPromptPGD(tiny, tokens=2, start=torch.zeros(3, 32))
    with pytest.raises(AttackError, match="radius"):
        SoftPromptPGD(tiny, radius=0.0)
