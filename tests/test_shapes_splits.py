"""The shapes benchmark's prompt splits: reproducible, disjoint, and a guard against edits that saw them."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from conceptedit.plugins import get_host
from conceptedit.shapes.contexts import mentions, mentions_any
from conceptedit.shapes.splits import (
    HELD_OUT_CONTEXT_WORDS,
    HELD_OUT_PHRASINGS,
    TUNING_CONTEXT_WORDS,
    benchmark_splits,
    overlap_problems,
    split_overlaps,
)
from conceptedit.shapes.world import COLOUR_NAMES, IMPLICIT_EVAL, SHAPE_NAMES

HELD_OUT_WORDS = [w for words in HELD_OUT_CONTEXT_WORDS.values() for w in words]
TUNING_WORDS = [w for words in TUNING_CONTEXT_WORDS.values() for w in words]


@pytest.mark.parametrize("target", ["red", "blue", "circle", "cross"])
def test_splits_are_reproducible_disjoint_and_built_from_their_own_words(target: str) -> None:
    splits = benchmark_splits(target, seed=3)
    assert benchmark_splits(target, seed=3) == splits  # the seed decides everything
    assert benchmark_splits(target, seed=4)["held-out contexts"] != splits["held-out contexts"]
    assert not split_overlaps(splits.values())
    contexts, tuning = splits["held-out contexts"], splits["tuning"]
    for text in contexts.texts:
        assert mentions_any(text, HELD_OUT_WORDS), text  # every prompt carries held-out context
        assert not mentions_any(text, TUNING_WORDS), text
    for text in (*tuning.texts, *splits["tuning neighbours"].texts):
        assert not mentions_any(text, HELD_OUT_WORDS), text
    # the target appears by name and by each held-out phrasing, in every split that names it
    for split in (contexts, tuning):
        for phrasing in (target, *IMPLICIT_EVAL[target]):
            assert any(mentions(t, phrasing) for t in split.texts), (split.name, phrasing)
    assert all(not mentions(t, target) for t in splits["neighbours"].texts)
    assert all(not mentions(t, target) for t in splits["tuning neighbours"].texts)


def test_neighbours_keep_the_context_and_change_only_the_concept() -> None:
    splits = benchmark_splits("red", seed=0)
    named = [p for p in splits["held-out contexts"].prompts if p.implicit is None]
    neighbours = splits["neighbours"].prompts
    assert len(neighbours) == len(named) * (len(COLOUR_NAMES) - 1)
    first = named[0]
    rewritten = [p for p in neighbours if p.shape == first.shape][: len(COLOUR_NAMES) - 1]
    assert {p.colour for p in rewritten} == set(COLOUR_NAMES) - {"red"}
    for p in rewritten:
        assert p.text.replace(p.colour, "red").replace("an red", "a red") == first.text
    assert {p.shape for p in neighbours} <= set(SHAPE_NAMES)


def test_an_edit_that_names_held_out_words_is_refused_and_the_shipped_concept_sets_pass() -> None:
    assert overlap_problems(["a crimson circle on the left", "a ruby square"]) == []
    problems = overlap_problems(["a scarlet circle", "a red square on the right", "a red cross, tiny"])
    assert len(problems) == 3
    assert "held-out phrasing 'scarlet'" in problems[0]
    assert "held-out context 'on the right'" in problems[1]
    assert "held-out context 'tiny'" in problems[2]
    # every held-out phrasing of every concept is caught, whole words only
    assert all(overlap_problems([f"a {p} thing"]) for p in HELD_OUT_PHRASINGS)
    assert overlap_problems(["a bigger circle"]) == []  # "big" is held out, "bigger" is another word
    for name in ("shapes_red.json", "shapes_circle.json"):
        pairs = json.loads((REPO / "recipes" / "concepts" / name).read_text())
        assert overlap_problems(p[0] for p in pairs) == [], name


def test_unknown_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown concept 'grey'"):
        benchmark_splits("grey")


def test_held_out_context_suites_score_real_images_with_counts_and_intervals() -> None:
    """The base shapes model on the held-out-context and neighbour suites: real generated images,
    judged; every rate carries its n and a Wilson interval around it."""
    from conceptedit.api.recipe import EvaluateSpec
    from conceptedit.evaluation.evaluate import evaluate
    from conceptedit.models.loading import load_model

    pipeline = load_model("builtin:shapes").pipeline
    options = {"target": "red", "seeds": 1, "per_phrasing": 1, "anchor": "gray"}
    specs = [
        EvaluateSpec(suite="shapes-contexts", options=options, guidance=5.0, compare_base=False),
        EvaluateSpec(suite="shapes-neighbours", options=options, guidance=5.0, compare_base=False),
    ]
    contexts, neighbours = evaluate(pipeline, specs, host=get_host())
    assert contexts.n == 16  # 4 phrasings (name + 3 held out) x 4 shapes x 1 context x 1 seed
    m = contexts.metrics
    assert m["target_shown_n"] == 16
    assert m["target_shown"] >= 0.6  # the base model draws red in most held-out contexts
    assert m["target_shown_strict"] >= m["target_shown"]  # strict never counts fewer images as red
    assert m["anchor_reached"] == 0.0  # the base model knows no gray
    for key in ("target_shown", "erased", "colour_correct"):
        assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"]
    assert neighbours.n == 4 * (len(COLOUR_NAMES) - 1)  # the explicitly named prompts, every other colour
    assert "target_shown" not in neighbours.metrics and "hue_drift_mean" in neighbours.metrics
    assert neighbours.metrics["colour_correct"] >= 0.5


def test_a_recipe_evaluated_on_held_out_contexts_is_refused_if_its_concepts_use_them() -> None:
    from conceptedit import RecipeError, load_recipe

    def recipe(pairs: list[list[str]], suite: str) -> dict[str, object]:
        return {
            "schema_version": 1,
            "model": "builtin:shapes",
            "concepts": {"red": {"pairs": pairs}},
            "edits": [{"method": "uce", "params": {"concepts": "red"}}],
            "evaluate": [{"suite": suite, "options": {"target": "red"}}],
        }

    clean = [["a red circle on the left", "a gray circle on the left"], ["a crimson square", "a gray square"]]
    load_recipe(recipe(clean, "shapes-contexts"))  # only tuning words: accepted
    leaky = [*clean, ["a tiny red cross on the right", "a tiny gray cross on the right"]]
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe(leaky, "shapes-contexts"))
    issue = caught.value.issues[0]
    assert issue.path == "evaluate.0" and "held-out context 'tiny'" in issue.message and issue.suggestion
    load_recipe(recipe(leaky, "shapes-tuning"))  # the tuning splits may be seen by the edit
    load_recipe(recipe(leaky, "shapes-tuning-neighbours"))
    with pytest.raises(RecipeError, match="held-out phrasing 'scarlet'"):
        load_recipe(recipe([["a scarlet circle", "a gray circle"]], "shapes-neighbours"))
