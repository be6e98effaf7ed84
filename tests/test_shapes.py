"""The shapes world, its judge, the shipped ``builtin:shapes`` model and the script that trains it."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

import conceptedit
from conceptedit.models.builtin import sd_scheduler_config
from conceptedit.shapes.evaluate import accuracy, context_prompts, judge_prompts, judge_under_prefix_tokens
from conceptedit.shapes.judge import NONE, judge
from conceptedit.shapes.model import SHAPES_MODEL_DIR
from conceptedit.shapes.world import (
    COLOUR_NAMES,
    COLOURS,
    CONCEPTS,
    ERASE_NAMES,
    IMPLICIT_EVAL,
    SHAPE_NAMES,
    SHAPES,
    Scene,
    describe,
    explicit_prompts,
    implicit_prompts,
    preserve_prompts,
    render,
    sample_scene,
)

REPO = Path(__file__).resolve().parents[1]
# The quickstart's stage 1 alone on 32 held-out-context images of red and 24 of its neighbours.
# Measured here: 56% erased (strict; the base model 0%), 44% anchor reached, 96% of the
# neighbours kept; the bars leave room for other machines' float sums. Stage 1 alone is far from
# the benchmark's targets on held-out contexts: stage 2 does the rest (erasure_shapes.md).
ERASED_BAR = 0.4
ANCHOR_BAR = 0.25
KEPT_BAR = 0.85


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text))


def _scene(
    colour: str,
    shape: str,
    centre: tuple[float, float] = (16.0, 16.0),
    radius: float = 9.0,
    rgb: tuple[float, float, float] | None = None,
) -> Scene:
    if rgb is None:
        rgb = next(s.rgb for s in (sample_scene(np.random.default_rng(i)) for i in range(200)) if s.colour == colour)
    return Scene(colour, shape, "large", "centre", "light", radius, centre, rgb, 0.92)


# --------------------------------------------------------------------------- the world


def test_world_has_the_concepts_the_benchmark_needs() -> None:
    assert len(COLOURS) >= 6 and len(SHAPES) >= 4
    explicit = set(CONCEPTS)
    for concept in CONCEPTS.values():
        assert len(concept.implicit) >= 5, concept.name
        assert set(concept.held_out) <= set(concept.implicit) and len(concept.held_out) >= 3
        assert not set(ERASE_NAMES[concept.name]) & set(IMPLICIT_EVAL[concept.name])
        assert ERASE_NAMES[concept.name][0] == concept.name
        for phrase in concept.implicit:  # implicit means no concept's explicit name is said
            assert not _words(phrase) & explicit, phrase
    phrasings = [p for c in CONCEPTS.values() for p in c.implicit]
    assert len(phrasings) == len(set(phrasings)), "a phrasing names two concepts"


def test_every_implicit_phrasing_is_trained_on() -> None:
    rng = np.random.default_rng(0)
    captions = " | ".join(describe(sample_scene(rng), rng).text for _ in range(6000))
    for concept in CONCEPTS.values():
        for phrase in concept.implicit:
            assert phrase in captions, phrase


def test_captions_describe_their_scene() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = sample_scene(rng)
        caption = describe(scene, rng)
        for name in (*COLOUR_NAMES, *SHAPE_NAMES):
            if name in _words(caption.text):
                assert name in (scene.colour, scene.shape), caption
        for attribute, value in caption.said.items():  # what the text encoder is taught it states
            assert getattr(scene, attribute) == value, caption


def test_prompt_sets() -> None:
    explicit, implicit = explicit_prompts(), implicit_prompts()
    assert len(explicit) == len(COLOURS) * len(SHAPES)
    assert explicit[0].text == "a red circle" and explicit[0].implicit is None
    for prompt in implicit:
        hidden = prompt.colour if prompt.implicit == "colour" else prompt.shape
        assert hidden not in _words(prompt.text), prompt
        assert any(phrase in prompt.text for phrase in IMPLICIT_EVAL[hidden]), prompt
    assert {p.implicit for p in implicit} == {"colour", "shape"}
    assert all("red" not in (p.colour, p.shape) for p in preserve_prompts("red"))
    assert len(preserve_prompts("circle")) == len(COLOURS) * (len(SHAPES) - 1)
    with pytest.raises(ValueError, match="unknown concept"):
        preserve_prompts("mauve")


def test_render_is_seeded() -> None:
    a, b = (render(sample_scene(np.random.default_rng(7))) for _ in range(2))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(sample_scene(np.random.default_rng(8))))


# --------------------------------------------------------------------------- the judge


def test_judge_on_ground_truth() -> None:
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng) for _ in range(300)]
    verdicts = [judge(render(s)) for s in scenes]
    assert np.mean([v.colour == s.colour for v, s in zip(verdicts, scenes, strict=True)]) >= 0.99
    assert np.mean([v.shape == s.shape for v, s in zip(verdicts, scenes, strict=True)]) >= 0.97


def test_judge_says_none_when_nothing_is_there() -> None:
    blank = np.full((32, 32, 3), 230, dtype=np.uint8)
    assert judge(blank).colour == judge(blank).shape == NONE
    black = render(_scene("red", "square", rgb=(0.2, 0.2, 0.2)))  # achromatic but not a mid grey
    assert judge(black).colour == NONE and judge(black).shape == "square"
    chartreuse = render(_scene("red", "square", rgb=(0.495, 0.9, 0.09)))  # hue 90: no palette colour
    assert judge(chartreuse).colour == NONE and judge(chartreuse).shape == "square"
    grey = render(_scene("red", "square", rgb=(0.45, 0.45, 0.45)))  # a mid grey is gray (issue 13)
    assert judge(grey).colour == "gray" and judge(grey).shape == "square"
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert judge(noise).shape == NONE


def test_judge_lists_every_colour_and_shape() -> None:
    left = render(_scene("red", "circle", centre=(9.0, 16.0), radius=6.5))
    right = render(_scene("blue", "square", centre=(23.0, 16.0), radius=6.5))
    both = np.where(np.arange(32)[None, :, None] < 16, left, right).astype(np.uint8)
    verdict = judge(both)
    assert set(verdict.colours) == {"red", "blue"} and set(verdict.shapes) == {"circle", "square"}
    assert judge(both.astype(np.float32) / 255).colours == verdict.colours  # floats in [0, 1] too


# --------------------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def shapes() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(SHAPES_MODEL_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_a_plain_sd_folder(shapes: StableDiffusionPipeline) -> None:
    files = [p for p in SHAPES_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25e6
    assert {p.suffix for p in files if p.parent.name in ("unet", "vae", "text_encoder")} == {".json", ".safetensors"}
    assert (SHAPES_MODEL_DIR / "README.md").is_file()
    assert shapes.safety_checker is None and isinstance(shapes.scheduler, DDIMScheduler)
    assert {k: shapes.scheduler.config[k] for k in sd_scheduler_config()} == sd_scheduler_config()
    assert shapes.tokenizer.model_max_length == 77
    assert shapes.tokenizer.pad_token_id == shapes.tokenizer.eos_token_id == 49407
    assert shapes.text_encoder.config.vocab_size == len(shapes.tokenizer)
    assert shapes.unet.config.cross_attention_dim == shapes.text_encoder.config.hidden_size
    cross = [m for n, m in shapes.unet.named_modules() if n.endswith("attn2")]
    assert cross and all(m.to_k.bias is None and m.to_v.bias is None for m in cross)
    assert shapes.vae_scale_factor == 4 and shapes.unet.config.sample_size == 8


def test_builtin_shapes_loads_through_the_toolkit() -> None:
    loaded = conceptedit.load_model("builtin:shapes")
    assert loaded.kind == "builtin" and loaded.pipeline.safety_checker is None
    assert loaded.pipeline.unet.config.sample_size == 8


def test_recorded_accuracy_meets_the_bars() -> None:
    """The model card's bars (issue 13), on the numbers eval.json recorded for the shipped weights."""
    measured = json.loads((SHAPES_MODEL_DIR / "eval.json").read_text())["accuracy"]
    assert measured["explicit"]["colour"] >= 0.95 and measured["explicit"]["shape"] >= 0.95
    assert measured["implicit_colour"]["colour"] >= 0.9 and measured["implicit_shape"]["shape"] >= 0.9
    for name in ("contexts", "random_prefix_tokens"):
        assert measured[name]["colour"] >= 0.9 and measured[name]["shape"] >= 0.9, (name, measured[name])
    assert measured["explicit"]["n"] == 4 * 28 and measured["contexts"]["n"] == 224


def test_shipped_model_draws_what_it_is_asked(shapes: StableDiffusionPipeline) -> None:
    explicit = accuracy(judge_prompts(shapes, explicit_prompts(), seeds=[100, 101]))
    assert explicit.colour >= 0.9 and explicit.shape >= 0.85, explicit
    implicit = implicit_prompts()[::6]  # one phrasing per concept pair, a quarter of the set
    judged = judge_prompts(shapes, implicit, seeds=[100])
    colour = accuracy([j for j in judged if j.prompt.implicit == "colour"]).colour
    shape = accuracy([j for j in judged if j.prompt.implicit == "shape"]).shape
    assert colour >= 0.8 and shape >= 0.8, (colour, shape)
    # the testbed-v2 bars on fresh seeds: captions in context, and five random prefix tokens
    contexts = accuracy(judge_prompts(shapes, context_prompts()[::4], seeds=[100]))
    assert contexts.colour >= 0.85 and contexts.shape >= 0.85, contexts
    noisy = accuracy(judge_under_prefix_tokens(shapes, explicit_prompts(), seeds=[100], noise_seed=1))
    assert noisy.colour >= 0.85 and noisy.shape >= 0.85, noisy
    gray = [j for j in judge_prompts(shapes, [p for p in explicit_prompts() if p.colour == "gray"], [100, 101])]
    assert sum(j.verdict.colour == "gray" for j in gray) >= 7, [j.verdict for j in gray]  # of 8


# --------------------------------------------------------------------------- the training script


def test_train_script_writes_a_loadable_folder(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_shapes", REPO / "scripts" / "train_shapes.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "model"
    script.main(
        [
            "--out",
            str(out),
            "--steps",
            "3",
            "--vae-steps",
            "3",
            "--text-steps",
            "3",
            "--batch",
            "8",
            "--vae-batch",
            "4",
            "--text-batch",
            "8",
            "--pool",
            "64",
            "--no-eval",
        ]
    )
    assert (out / "README.md").is_file() and json.loads((out / "training.json").read_text())["config"]["steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    image = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


# --------------------------------------------------------------------------- erasure on the shipped model


def test_shipped_recipe_data_is_what_the_world_generates() -> None:
    """The quickstart's concept file and caption prior are generated, not hand-edited."""
    from conceptedit.shapes.erasure import erase_concept_set
    from conceptedit.shapes.world import captions

    shipped = (REPO / "recipes" / "data" / "shapes_captions.txt").read_text().splitlines()
    assert shipped == captions(600)
    prior = (REPO / "recipes" / "data" / "shapes_captions_without_red.txt").read_text().splitlines()
    assert prior == captions(600, seed=0, without="red")
    for target, anchor in (("red", "gray"), ("circle", "square")):
        pairs = json.loads((REPO / "recipes" / "concepts" / f"shapes_{target}.json").read_text())
        assert pairs == erase_concept_set(target, anchor)["pairs"]
        said = " | ".join(p[0] for p in pairs)
        assert not any(phrase in said for phrase in IMPLICIT_EVAL[target])  # held-out phrasings stay unnamed


def test_the_quickstart_erases_red_in_held_out_contexts_and_keeps_the_neighbours(tmp_path: Path) -> None:
    """The quickstart's stage 1 alone, judged strictly on generated images of held-out contexts
    (context words its generated concept set never uses) through the recipe's evaluate section."""
    recipe = conceptedit.load_recipe(REPO / "recipes" / "quickstart.yaml").recipe.model_dump(mode="json")
    recipe["edits"] = recipe["edits"][:1]
    prior = REPO / "recipes" / "data" / "shapes_captions_without_red.txt"
    recipe["edits"][0]["params"]["prior"]["captions"] = str(prior)
    split = {"target": "red", "per_phrasing": 1}
    recipe["evaluate"] = [
        {"suite": "shapes-contexts", "options": {**split, "anchor": "gray", "seeds": 2}, "guidance": 5.0},
        {"suite": "shapes-neighbours", "options": {**split, "seeds": 1}, "guidance": 5.0},
    ]
    recipe["output"]["formats"] = ["delta"]
    result = conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    contexts, neighbours = result.evaluation
    assert contexts.base_metrics is not None and neighbours.base_metrics is not None
    assert contexts.n == 32 and neighbours.n == 24
    assert contexts.base_metrics["erased_strict"] <= 0.1, contexts.base_metrics  # the base model draws red
    assert contexts.metrics["erased_strict"] >= ERASED_BAR, contexts.metrics
    assert contexts.metrics["anchor_reached"] >= ANCHOR_BAR, contexts.metrics
    kept = neighbours.metrics["both_correct"] / neighbours.base_metrics["both_correct"]
    assert kept >= KEPT_BAR, (neighbours.metrics, neighbours.base_metrics)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())["suites"]
    assert [s["suite"] for s in written] == ["shapes-contexts", "shapes-neighbours"]
    assert written[0]["protocol"]["scorer"] == "shapes-judge" and written[0]["protocol"]["steps"] == 25
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("<img") == 2 * 8 + 2 * 8  # first 8 images of each suite, base and edited
