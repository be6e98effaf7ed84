"""Concept Ablation on builtin:tiny-sd: the concept's prediction moves onto the anchor's, and nothing else trains."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conceptedit_builtin import ca
from conceptedit_builtin.ca import ConceptAblation
from diffusers import DDIMScheduler
from safetensors import safe_open
from torch import Tensor

import conceptedit
from conceptedit.engine.context import EditContext, derive_seed
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.testing import isolated_host, tiny_recipe

PAIRS = [["Grumpy Cat", "a cat"]]
TEMPLATES = ["a photo of {}", "{} on a sofa"]
GEN_STEPS = 4
# The trajectory cache stores latents in float16: rounding moves a value by at most half a float16
# step, 2**-11 of its size. On top of that the cache samples in batches and the tests one image at a
# time: measured max |Δ| 2.2e-5 in float32 between batches of one and of six generations, with 1 and
# 2 threads (latents up to |17|); atol is ten times that.
CACHED_LATENT = {"rtol": 2.0**-11, "atol": 2.5e-4}


@pytest.fixture(autouse=True)
def builtin_host() -> Iterator[Any]:
    with isolated_host(entry_points=True) as host:
        yield host


def _recipe(
    training: dict[str, Any] | None = None,
    concepts: dict[str, Any] | None = None,
    concepts_ref: str = "cat",
    **params: Any,
) -> Any:
    edit = {
        "method": "ca",
        "params": {
            "concepts": concepts_ref,
            "anchor_samples": 6,
            "generation_steps": GEN_STEPS,
            "batch_size": 2,
            **params,
        },
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
    # The loop adds the terms in float32 (one rounding, ≤ 2**-24 relative); the log's floats are exact.
    assert row["total"] == pytest.approx(row["ablate"] + row.get("prior", 0.0), rel=2.0**-22)


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
    for row, (j, _) in enumerate(kept.index.tolist()[:2]):
        torch.testing.assert_close(kept.latents[row].float(), _generate(base, anchors[j % 2], j), **CACHED_LATENT)


def _generate(base: Any, prompt: str, j: int, negative: str = "") -> torch.Tensor:
    """Anchor generation ``j`` written out: DDIM (η = 0) from its seed, CFG 6 against ``negative``."""
    scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(GEN_STEPS)
    cond, guide = _hidden(base, [prompt]), _hidden(base, [negative])
    x = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(derive_seed(0, 0, "ca", "anchor", j)))[None]
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_c = base.unet(x, t, encoder_hidden_states=cond).sample
            e_0 = base.unet(x, t, encoder_hidden_states=guide).sample
            x = scheduler.step(e_0 + 6.0 * (e_c - e_0), t, x, eta=0.0).prev_sample
    return x[0]


def _capture(monkeypatch: pytest.MonkeyPatch) -> tuple[list[ConceptAblation], list[tuple[torch.Tensor, bool]]]:
    """The method objects of a run, and the (text embeddings, frozen) of every denoiser call training makes."""
    methods: list[ConceptAblation] = []
    calls: list[tuple[torch.Tensor, bool]] = []
    prepare, predict = ConceptAblation.prepare_training, EditContext.predict_noise

    def prepared(self: ConceptAblation, ctx: Any) -> None:
        prepare(self, ctx)
        methods.append(self)  # from here on the denoiser calls are training's

    def predicting(self: EditContext, x: Any, t: Any, hidden: torch.Tensor, *, frozen: bool = False) -> Any:
        if methods:
            calls.append((hidden.detach().clone(), frozen))
        return predict(self, x, t, hidden, frozen=frozen)

    monkeypatch.setattr(ConceptAblation, "prepare_training", prepared)
    monkeypatch.setattr(EditContext, "predict_noise", predicting)
    return methods, calls


# ------------------------------------------------------------------- anchor negative prompt


@pytest.mark.parametrize(("option", "negative"), [("target", "Grumpy Cat"), ("a blurry photo", "a blurry photo")])
def test_the_negative_prompt_reaches_the_anchor_generations(
    option: str, negative: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods, _ = _capture(monkeypatch)
    conceptedit.apply(_recipe(anchor_negative_prompt=option), out=tmp_path / "run", quiet=True)
    kept = methods[0].anchors.kept
    assert set(kept.index[:, 1].tolist()) == {GEN_STEPS} and set(kept.timesteps.tolist()) == {0}
    base = build_tiny_sd()
    anchors = [tpl.format(PAIRS[0][1]) for tpl in TEMPLATES]
    for row, (j, _) in enumerate(kept.index.tolist()[:2]):
        guided = _generate(base, anchors[j % 2], j, negative)
        torch.testing.assert_close(kept.latents[row].float(), guided, **CACHED_LATENT)
        plain = _generate(base, anchors[j % 2], j)
        assert (guided - plain).abs().max() > 100 * CACHED_LATENT["atol"]  # it matters: measured ≥ 0.58

    # A second run reads the generations back from the cache, under a key that names the negative prompt.
    conceptedit.apply(_recipe(anchor_negative_prompt=option), out=tmp_path / "again", quiet=True)
    assert torch.equal(methods[1].anchors.kept.latents, kept.latents)
    conceptedit.apply(_recipe(), out=tmp_path / "plain", quiet=True)
    assert not torch.equal(methods[2].anchors.kept.latents.float(), kept.latents.float())


def test_target_negative_prompt_joins_every_concept_as_the_reference_does() -> None:
    method = ConceptAblation(ca.CaParams(concepts="x", anchor_negative_prompt="target"))
    pairs = [
        conceptedit.PromptPair(f"{c}!", "", c, "") for c in ("violent, horrifying", "nudity, nsfw", "nudity, nsfw")
    ]
    assert method.negative_prompt(pairs) == "violent, horrifying;nudity, nsfw"
    assert ConceptAblation(ca.CaParams(concepts="x")).negative_prompt(pairs) is None


# --------------------------------------------------------------------- caption prompt pairs

CAPTIONS = ["two people walking on a beach", "a woman reading in a cafe", "a man riding a bicycle"]


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("nudity", ["nudity, nsfw, {c}", "in nudity, nsfw style, {c}", "{c}, nudity, nsfw"]),
        ("style", ["{c}, in the style of nudity, nsfw", "in nudity, nsfw's style, {c}"]),
    ],
)
def test_caption_pairs_put_the_concept_into_each_images_caption(
    form: str, expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    methods, calls = _capture(monkeypatch)
    recipe = _recipe(
        {"steps": 8},
        concepts={"nsfw": {"concepts": ["nudity, nsfw"]}},  # no anchor needed: the captions are the anchors
        concepts_ref="nsfw",
        prompt_pairs="captions",
        captions=str(captions),
        caption_form=form,
    )
    conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    method = methods[0]
    base = build_tiny_sd()
    # Every denoiser call of training, matched to the nearest of all prompts it could have read.
    candidates = sorted({e.format(c=c) for e in expected for c in CAPTIONS} | set(CAPTIONS))
    encoded = _hidden(base, candidates).flatten(1)
    assert len(calls) == 2 * 8  # the anchor goal (frozen), then the concept prediction, per step
    seen_forms = set()
    for draw in range(8):
        images = method.anchors.plan[draw, :, 0].tolist()
        for (hidden, frozen), role in zip(calls[2 * draw : 2 * draw + 2], ("anchor", "concept"), strict=True):
            assert frozen == (role == "anchor")
            for slot, j in enumerate(images):
                distance = (encoded - hidden[slot].flatten()).norm(dim=-1)
                nearest, second = distance.topk(2, largest=False).values.tolist()
                # Distinct candidates are ≥ 5.0 apart (measured); one prompt encoded in another batch
                # moves by float32 noise (0 here), so only an exact match gets under 1e-3 of the gap.
                assert nearest < 1e-3 * second
                prompt = candidates[int(distance.argmin())]
                caption = CAPTIONS[j % len(CAPTIONS)]
                if role == "anchor":
                    assert prompt == caption
                else:
                    assert prompt in {e.format(c=caption) for e in expected}, (prompt, caption)
                    seen_forms.add(next(e for e in expected if e.format(c=caption) == prompt))
    assert seen_forms == set(expected)  # every form is drawn (style: its second form 2 times in 3)
    # Each anchor image was generated from its own caption.
    kept = method.anchors.kept
    for row, (j, _) in enumerate(kept.index.tolist()[:2]):
        generated = _generate(base, CAPTIONS[j % len(CAPTIONS)], j)
        torch.testing.assert_close(kept.latents[row].float(), generated, **CACHED_LATENT)


def test_object_captions_from_the_concept_set_replace_the_anchor_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods, _ = _capture(monkeypatch)
    recipe = _recipe(prompt_pairs="captions", caption_form="object")
    conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    method = methods[0]
    captions = [tpl.format(PAIRS[0][1]) for tpl in TEMPLATES]  # the concept set's anchor prompts, image j % 2
    concept_rows, anchor_rows = method._slots  # type: ignore[misc]
    for draw in range(len(concept_rows)):
        for slot, j in enumerate(method.anchors.plan[draw, :, 0].tolist()):
            caption = captions[j % 2]
            assert method.pool_prompts[int(anchor_rows[draw, slot])] == caption
            assert method.pool_prompts[int(concept_rows[draw, slot])] == caption.replace("a cat", "Grumpy Cat")


def test_an_object_caption_without_the_anchor_is_refused(tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat on a mat\na dog in the park\n", encoding="utf-8")
    recipe = _recipe(prompt_pairs="captions", captions=str(captions), caption_form="object")
    with pytest.raises(conceptedit.EditError, match=r"anchor 'a cat'.*anchor image 1.*'a dog in the park'"):
        conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"captions": "captions.txt"}, "captions", "only with prompt_pairs: captions"),
        ({"caption_form": "style"}, "caption_form", "only with prompt_pairs: captions"),
        ({"prompt_pairs": "captions"}, "params", "needs caption_form"),
        ({"anchor_negative_prompt": "  "}, "anchor_negative_prompt", "write none"),
    ],
)
def test_caption_and_negative_prompt_settings_are_checked(params: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(conceptedit.RecipeError, match=message) as caught:
        conceptedit.load_recipe(_recipe(**params))
    assert any(issue.path.endswith(field) for issue in caught.value.issues), caught.value.issues


# ------------------------------------------------------------------------------ scale_lr


@pytest.mark.parametrize(
    ("scale_lr", "prior_weight", "processes", "factor"),
    [(False, 0.5, 1, 1), (True, 0.0, 1, 2 * 2), (True, 0.5, 1, 2 * 2 * 2), (True, 0.0, 2, 2 * 2 * 2)],
)
def test_scale_lr_gives_the_optimiser_the_references_rate(
    scale_lr: bool, prior_weight: float, processes: int, factor: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca, "_process_count", lambda: processes)  # as under `accelerate launch` on N GPUs
    recipe = _recipe({"grad_accum": 2, "scale_lr": scale_lr}, prior_weight=prior_weight)  # batch_size 2
    conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    # lr × grad_accum (2) × batch_size (2) × processes (× 2 with prior preservation), from the optimiser
    rates = {json.loads(line)["lr"] for line in (tmp_path / "run" / "logs" / "ca.jsonl").read_text().splitlines()}
    assert rates == {1e-3 * factor}
    # The run folder records the recipe as written: a rerun from it scales once, not twice.
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    with safe_open(str(tmp_path / "run" / "edit.safetensors"), "pt") as fh:
        embedded = json.loads(fh.metadata()["recipe"])
    for saved in (resolved, embedded):
        assert saved["edits"][0]["training"]["lr"] == 1e-3 and saved["edits"][0]["training"]["scale_lr"] is scale_lr


def test_a_concept_without_an_anchor_is_refused(tmp_path: Path) -> None:
    no_anchor = {"cat": {"concepts": ["Grumpy Cat"], "templates": TEMPLATES}}
    with pytest.raises(conceptedit.EditError, match=r"without an anchor.*\[\[Grumpy Cat, a cat\]\]"):
        conceptedit.apply(_recipe(concepts=no_anchor), out=tmp_path / "run", quiet=True)


# ------------------------------------------------------------------------------ the loss formula

F64 = torch.float64
# The plugin forms x_t in float32 and rounds its float64 predictions to float32 before averaging;
# the hand side stays in float64. Measured: at most 1.4e-7 relative, every step and variant.
LOSS_RTOL = 1e-6


@dataclass
class _Draw:
    """One training step of the plugin: the weights it started from, what it read and drew, its terms."""

    weights: dict[str, Tensor]
    runs: list[int] = field(default_factory=list)  # the anchor generation of each latent
    x0: Tensor = field(default_factory=lambda: torch.empty(0))  # the anchor latents taken from the plan
    noised: Tensor = field(default_factory=lambda: torch.empty(0))  # what the forward diffusion noised
    t: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    noise: Tensor = field(default_factory=lambda: torch.empty(0))
    terms: dict[str, float] = field(default_factory=dict)


def _record_draws(monkeypatch: pytest.MonkeyPatch) -> list[_Draw]:
    """Wrap what the plugin calls: the anchor latents it takes, the (x₀, t, ε) it noises, per step."""
    draws: list[_Draw] = []
    prepare, trajectory_loss, add_noise = (
        ConceptAblation.prepare_training,
        ConceptAblation.trajectory_loss,
        ca.add_noise,
    )

    def preparing(self: ConceptAblation, ctx: Any) -> None:
        prepare(self, ctx)
        take = self.anchors.take

        def taking(draw: int, device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
            latents, levels, runs = take(draw, device)
            assert levels.eq(0).all()  # finished generations
            draws[-1].x0, draws[-1].runs = latents.clone(), list(runs)
            return latents, levels, runs

        self.anchors.take = taking  # type: ignore[method-assign]

    def noising(alphas: Tensor, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        draws[-1].noised, draws[-1].t, draws[-1].noise = clean.clone(), timesteps.clone(), noise.clone()
        return add_noise(alphas, clean, noise, timesteps)

    def losing(self: ConceptAblation, ctx: Any, step: int) -> dict[str, Tensor]:
        draws.append(_Draw({n: p.detach().clone() for n, p in ctx.adapter.unet.named_parameters()}))
        terms = trajectory_loss(self, ctx, step)
        draws[-1].terms = {k: float(v.detach()) for k, v in terms.items()}
        return terms

    monkeypatch.setattr(ConceptAblation, "prepare_training", preparing)
    monkeypatch.setattr(ConceptAblation, "trajectory_loss", losing)
    monkeypatch.setattr(ca, "add_noise", noising)
    return draws


def _mse(a: Tensor, b: Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize(
    "params",
    [{}, {"reference": "current"}, {"prior_weight": 0.5}, {"loss": "noise"}],
    ids=["model-base", "model-current", "model-base-prior", "noise"],
)
def test_the_logged_loss_is_the_ca_formula_computed_by_hand(
    params: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step's loss is MSE(ε_θ(x_t, t, c_concept), goal) [+ w·MSE(ε_θ(x_t, t, c_anchor), ε)] with
    x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε and goal ε_base(x_t, t, c_anchor), ε_θ(x_t, t, c_anchor) or ε, recomputed
    with plain diffusers calls in float64 on the x₀, t, ε the plugin drew and the weights θ it held."""
    draws = _record_draws(monkeypatch)
    steps, weight = 3, params.get("prior_weight", 0.0)
    recipe = _recipe({"steps": steps}, **params)
    conceptedit.apply(recipe, pipeline=build_tiny_sd(dtype=F64), out=tmp_path / "run", quiet=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "ca.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, steps + 1)) and len(draws) == steps

    pipe, theta = build_tiny_sd(dtype=F64), build_tiny_sd(dtype=F64).unet
    base, alphas = pipe.unet, pipe.scheduler.alphas_cumprod.to(F64)
    original = dict(base.named_parameters())
    for step, (row, d) in enumerate(zip(log, draws, strict=True), start=1):
        assert torch.equal(d.noised, d.x0)  # the anchor latents are what gets noised
        assert d.t.dtype == torch.long and 0 <= int(d.t.min()) <= int(d.t.max()) < len(alphas)
        assert any(not torch.equal(w, original[n]) for n, w in d.weights.items()) == (step > 1)
        theta.load_state_dict(d.weights)

        a = alphas[d.t].reshape(-1, 1, 1, 1)
        noise = d.noise.to(F64)
        x_t = a.sqrt() * d.x0.to(F64) + (1 - a).sqrt() * noise
        # Generation j is the anchor prompt of template j mod 2, and pairs with that template's concept
        # prompt. The text encoder runs in float64; conceptedit hands the UNet its float32 rounding.
        templates = [TEMPLATES[j % len(TEMPLATES)] for j in d.runs]
        concept, anchor = (_hidden(pipe, [tpl.format(name) for tpl in templates]).float().to(F64) for name in PAIRS[0])
        with torch.no_grad():
            on_concept = theta(x_t, d.t, encoder_hidden_states=concept).sample
            on_anchor = theta(x_t, d.t, encoder_hidden_states=anchor).sample
            base_on_anchor = base(x_t, d.t, encoder_hidden_states=anchor).sample
        reference, other = base_on_anchor, on_anchor  # ε_base is the goal; ε_θ would be the wrong one
        if params.get("reference") == "current":
            reference, other = other, reference
        goal, other_loss = (noise, reference) if params.get("loss") == "noise" else (reference, noise)
        by_hand = {"ablate": _mse(on_concept, goal)}
        wrong = {"ablate": [_mse(on_concept, other_loss)]}  # the other loss's goal
        if params.get("loss") != "noise" and step > 1:  # the other reference, once θ has moved
            wrong["ablate"].append(_mse(on_concept, other))
        if weight:  # prior preservation: θ on the anchor prompt against ε; wrong: on the concept prompt
            by_hand["prior"] = weight * _mse(on_anchor, noise)
            wrong["prior"] = [weight * _mse(on_concept, noise), weight * _mse(on_anchor, base_on_anchor)]
        assert d.terms.keys() == by_hand.keys()
        for key, value in by_hand.items():
            off = [abs(w - value) / value for w in wrong[key]]
            print(
                f"{params or 'defaults'} step {step} {key}: plugin {d.terms[key]:.12g}, by hand {value:.12g}, "
                f"relative difference {abs(d.terms[key] - value) / value:.1e}; "
                f"wrong formulas {', '.join(f'{o:.1e}' for o in off)} off"
            )
            assert d.terms[key] == pytest.approx(value, rel=LOSS_RTOL), (step, key)
            assert row[key] == pytest.approx(value, rel=LOSS_RTOL), (step, key)  # logged as float32
            # The test can fail: each wrong formula is ≥ 100 tolerances away (measured ≥ 1.7e-4).
            assert min(off) > 100 * LOSS_RTOL, (step, key, off)
        assert row["total"] == pytest.approx(sum(by_hand.values()), rel=LOSS_RTOL)
