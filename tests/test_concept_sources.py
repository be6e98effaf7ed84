"""Concept sets from generators: ``generate: {source: NAME, ...options}`` through concept source plugins.

The built-in ``shapes-captions`` source is checked on what it promises (seeded, distinct, never a
held-out phrasing, excluded contexts really absent), ``templates`` against today's expansion,
every malformed ``generate:`` block as a recipe error naming its field, a third-party source
registered from a test plugin, and the command line's listings (``plugins``, ``concepts``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from fake_methods import FakeMethodsPlugin
from pydantic import Field
from typer.testing import CliRunner

import conceptedit
import conceptedit.cli.app as cli
from conceptedit import ConceptSource, ConceptSourceOptions, PromptPair, RecipeError, hookimpl
from conceptedit.testing import isolated_host, tiny_recipe
from conceptedit.toolkit import (
    SHAPES_CONCEPTS,
    SHAPES_ERASE_NAMES,
    SHAPES_IMPLICIT_EVAL,
    ShapesContext,
    mentions_phrase,
    shapes_caption,
)

EDIT = {"method": "test_eot_map", "params": {"concepts": "red"}}


def _recipe(**generate: Any) -> dict[str, Any]:
    spec = {"source": "shapes-captions", "concept": "red", "anchor": "gray", "count": 60, **generate}
    return tiny_recipe(EDIT, concepts={"red": {"generate": spec}})


def _pairs(**generate: Any) -> list[PromptPair]:
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        return conceptedit.load_recipe(_recipe(**generate)).concepts["red"]


def _issues(recipe: dict[str, Any]) -> dict[str, str]:
    """path -> message and suggestion of every issue of a refused recipe."""
    with isolated_host(FakeMethodsPlugin(), entry_points=True), pytest.raises(RecipeError) as caught:
        conceptedit.load_recipe(recipe)
    return {issue.path: f"{issue.message} ({issue.suggestion})" for issue in caught.value.issues}


# --------------------------------------------------------------------------- shapes-captions


def test_generation_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    first, again, other = _pairs(seed=3), _pairs(seed=3), _pairs(seed=4)
    assert first == again and len(first) == 60
    assert [p.source for p in first] != [p.source for p in other]
    assert len({p.source for p in first}) == 60  # distinct captions
    assert len({p.source for p in first} & {p.source for p in other}) < 30


def test_each_pair_names_the_concept_and_the_anchor_in_the_same_context() -> None:
    for pair in _pairs(count=200):
        assert pair.concept in SHAPES_ERASE_NAMES["red"] and pair.target_concept == "gray"
        assert mentions_phrase(pair.source, pair.concept)
        assert mentions_phrase(pair.target, "gray") and not mentions_phrase(pair.target, pair.concept)
        # the context is kept: every word of the target but the anchor (and an article) is in the source
        assert set(pair.target.replace(",", "").split()) - {"gray", "a", "an", "shape"} <= set(
            pair.source.replace(",", "").split()
        ), pair
    phrasings = {p.concept for p in _pairs(count=200)}
    assert "red" in phrasings and len(phrasings) >= 4  # the explicit name and the implicit ones a recipe may name


@pytest.mark.parametrize("concept", sorted(SHAPES_CONCEPTS))
def test_no_held_out_phrasing_ever_appears(concept: str) -> None:
    anchor = ("gray" if concept != "gray" else "white") if SHAPES_CONCEPTS[concept].kind == "colour" else "star"
    held_out = [phrase for phrases in SHAPES_IMPLICIT_EVAL.values() for phrase in phrases]
    pairs = _pairs(concept=concept, anchor=anchor, count=300, seed=1)
    for pair in pairs:
        for text in (pair.source, pair.target):
            assert not any(mentions_phrase(text, phrase) for phrase in held_out), text
    assert {p.concept for p in pairs} <= set(SHAPES_ERASE_NAMES[concept])


def test_explicit_phrasings_use_only_the_name() -> None:
    pairs = _pairs(concept="circle", anchor="hexagon", phrasings="explicit")
    assert {p.concept for p in pairs} == {"circle"}
    assert all("circle" in p.source and "hexagon" in p.target for p in pairs)


def test_excluded_contexts_never_appear() -> None:
    exclude = ["on the left", "tiny", "circle", "a drawing of", "dark", "crimson"]
    pairs = _pairs(count=150, exclude_contexts=exclude)
    assert len(pairs) == 150
    for pair in pairs:
        for text in (pair.source, pair.target):
            assert not any(mentions_phrase(text, phrase) for phrase in exclude), text
    # without the exclusion those phrases are common
    plain = " | ".join(p.source for p in _pairs(count=150))
    assert all(mentions_phrase(plain, phrase) for phrase in exclude)


def test_impossible_options_are_a_recipe_error_not_a_traceback() -> None:
    issues = _issues(_recipe(count=5000, phrasings="explicit", exclude_contexts=["on", "small", "big", "large"]))
    assert "found only" in issues["concepts.red.generate"]
    issues = _issues(_recipe(phrasings="explicit", exclude_contexts=["red"]))
    assert "excludes every phrasing of 'red'" in issues["concepts.red.generate"]


def test_captions_follow_the_training_phrase_order() -> None:
    context = ShapesContext(size="small", position="on the left", background="on a dark background", other="square")
    assert shapes_caption("crimson", "colour", context) == "a small crimson square on the left, on a dark background"
    assert shapes_caption("the colour of blood", "colour", ShapesContext(other="circle")) == (
        "a circle the colour of blood"
    )
    assert shapes_caption("like a wheel", "shape", ShapesContext(other="red", prefix="an image of")) == (
        "an image of a red shape like a wheel"
    )
    assert shapes_caption("disk", "shape", ShapesContext(size="big")) == "a big disk"
    assert shapes_caption("orange", "colour", ShapesContext()) == "an orange shape"
    assert shapes_caption("gray", "colour", ShapesContext(other="cross")) == "a gray cross"


# --------------------------------------------------------------------------- recipes


def test_the_resolved_recipe_records_every_option_and_reproduces_the_pairs() -> None:
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        loaded = conceptedit.load_recipe(_recipe(count=40))
        resolved = loaded.recipe.model_dump(mode="json")
        assert resolved["concepts"]["red"]["generate"] == {
            "source": "shapes-captions",
            "concept": "red",
            "anchor": "gray",
            "count": 40,
            "seed": 0,
            "phrasings": "erase_names",
            "exclude_contexts": [],
        }
        again = conceptedit.load_recipe(resolved)
    assert again.concepts["red"] == loaded.concepts["red"]


def test_limit_keeps_the_first_generated_pairs_and_target_or_templates_are_refused() -> None:
    recipe = _recipe(count=30)
    recipe["concepts"]["red"]["limit"] = 7
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        limited = conceptedit.load_recipe(recipe).concepts["red"]
    assert limited == _pairs(count=30)[:7]
    for key, value in (("templates", ["a photo of {}"]), ("target", "gray")):
        recipe = _recipe()
        recipe["concepts"]["red"][key] = value
        assert f"`{key}` does not apply to a `generate:` set" in _issues(recipe)["concepts.red"]


def test_the_templates_source_expands_like_a_pairs_set() -> None:
    templates = ["{}", "a photo of {}"]
    generated = {"generate": {"source": "templates", "pairs": [["a cat", "a dog"]], "concepts": None}}
    listed = {"pairs": [["a cat", "a dog"]], "templates": templates}
    generated["generate"]["templates"] = templates
    recipe = tiny_recipe(EDIT, concepts={"red": generated, "old": listed})
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        concepts = conceptedit.load_recipe(recipe).concepts
    assert (
        concepts["red"]
        == concepts["old"]
        == [
            PromptPair("a cat", "a dog", "a cat", "a dog"),
            PromptPair("a photo of a cat", "a photo of a dog", "a cat", "a dog"),
        ]
    )
    concepts_only = tiny_recipe(EDIT, concepts={"red": {"generate": {"source": "templates", "concepts": ["x", "y"]}}})
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        assert [p.source for p in conceptedit.load_recipe(concepts_only).concepts["red"]] == ["x", "y"]


@pytest.mark.parametrize(
    ("generate", "path", "expected"),
    [
        ({"source": "shapes-caption"}, "concepts.red.generate.source", "did you mean 'shapes-captions'?"),
        ({"source": "nope"}, "concepts.red.generate.source", "known: shapes-captions, templates"),
        ({"cuont": 5}, "concepts.red.generate.cuont", "did you mean 'count'?"),
        ({"concept": "redd"}, "concepts.red.generate.concept", "did you mean 'red'?"),
        ({"count": 0}, "concepts.red.generate.count", "greater than 0"),
        ({"count": "many"}, "concepts.red.generate.count", "options of shapes-captions: source, concept, anchor"),
        ({"phrasings": "implicit"}, "concepts.red.generate.phrasings", "'explicit' or 'erase_names'"),
        ({"anchor": "scarlet"}, "concepts.red.generate.anchor", "held-out evaluation phrasing of 'red'"),
        ({"anchor": "red"}, "concepts.red.generate", "the anchor is the concept itself"),
        ({"exclude_contexts": "dark"}, "concepts.red.generate.exclude_contexts", "valid list"),
    ],
)
def test_a_malformed_generate_block_is_a_recipe_error_naming_the_field(
    generate: dict[str, Any], path: str, expected: str
) -> None:
    issues = _issues(_recipe(**generate))
    assert path in issues, issues
    assert expected in issues[path]


def test_a_missing_option_a_missing_source_and_two_sources_are_refused() -> None:
    spec: dict[str, Any] = {"source": "shapes-captions", "concept": "red"}
    issues = _issues(tiny_recipe(EDIT, concepts={"red": {"generate": spec}}))
    assert "required option 'anchor' is missing" in issues["concepts.red.generate.anchor"]
    issues = _issues(tiny_recipe(EDIT, concepts={"red": {"generate": {"concept": "red"}}}))
    assert "required key 'source' is missing" in issues["concepts.red.generate.source"]
    both = {"generate": {"source": "templates", "concepts": ["x"]}, "concepts": ["y"]}
    issues = _issues(tiny_recipe(EDIT, concepts={"red": both}))
    message = "exactly one of `pairs`, `concepts` or `file`, or a `generate:` block (got concepts, generate)"
    assert message in issues["concepts.red"]


def test_errors_in_a_recipe_file_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(concept="bleu"), sort_keys=False), encoding="utf-8")
    with isolated_host(FakeMethodsPlugin(), entry_points=True), pytest.raises(RecipeError) as caught:
        conceptedit.load_recipe(path)
    (issue,) = caught.value.issues
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "concept: bleu" in text)
    assert (issue.path, issue.line) == ("concepts.red.generate.concept", line)
    assert "did you mean 'blue'?" in issue.message


# --------------------------------------------------------------------------- a third-party source


class CountingOptions(ConceptSourceOptions):
    word: str = Field(description="The concept.")
    n: int = Field(3, ge=1, le=50)


class Counting(ConceptSource[CountingOptions]):
    name = "counting"
    summary = "test: 'N word' prompts mapped to 'N things'"
    Options: ClassVar[type[ConceptSourceOptions]] = CountingOptions

    def pairs(self) -> list[PromptPair]:
        options: CountingOptions = self.options  # type: ignore[assignment]
        return [PromptPair(f"{i} {options.word}", f"{i} things", options.word, "things") for i in range(options.n)]


class CountingPlugin:
    @hookimpl
    def conceptedit_register_concept_sources(self, register: Any) -> None:
        register(Counting)


def test_a_third_party_source_validates_and_expands() -> None:
    recipe = tiny_recipe(EDIT, concepts={"red": {"generate": {"source": "counting", "word": "cats", "n": 2}}})
    with isolated_host(FakeMethodsPlugin(), CountingPlugin()) as host:
        loaded = conceptedit.load_recipe(recipe)
        assert host.infos["CountingPlugin"].provides == ["concept source counting"]
        assert set(host.registry.concept_sources) == {"counting"}  # no entry points: the built-ins are absent
        bad = tiny_recipe(EDIT, concepts={"red": {"generate": {"source": "counting", "wrod": "cats"}}})
        with pytest.raises(RecipeError) as caught:
            conceptedit.load_recipe(bad)
    assert loaded.concepts["red"] == [
        PromptPair("0 cats", "0 things", "cats", "things"),
        PromptPair("1 cats", "1 things", "cats", "things"),
    ]
    assert loaded.recipe.model_dump(mode="json")["concepts"]["red"]["generate"] == {
        "source": "counting",
        "word": "cats",
        "n": 2,
    }
    paths = {i.path: i for i in caught.value.issues}
    assert paths["concepts.red.generate.wrod"].suggestion == "did you mean 'word'?"
    assert "required option 'word'" in paths["concepts.red.generate.word"].message


class _Broken(ConceptSource):
    name = "broken"
    summary = "test: raises"

    def pairs(self) -> list[PromptPair]:
        raise RuntimeError("boom")


class BrokenPlugin:
    @hookimpl
    def conceptedit_register_concept_sources(self, register: Any) -> None:
        register(_Broken)


class NotASourcePlugin:
    @hookimpl
    def conceptedit_register_concept_sources(self, register: Any) -> None:
        register(dict)


def test_a_failing_source_is_a_recipe_error_and_a_non_source_fails_its_plugin() -> None:
    recipe = tiny_recipe(EDIT, concepts={"red": {"generate": {"source": "broken"}}})
    with isolated_host(FakeMethodsPlugin(), BrokenPlugin(), NotASourcePlugin()) as host:
        with pytest.raises(RecipeError) as caught:
            conceptedit.load_recipe(recipe)
        failed = {i.name: i.error for i in host.failed()}
    (issue,) = caught.value.issues
    assert issue.path == "concepts.red.generate"
    assert "concept source 'broken' failed: RuntimeError: boom" in issue.message
    assert "not a ConceptSource subclass" in (failed["NotASourcePlugin"] or "")


# --------------------------------------------------------------------------- command line


def test_plugins_lists_the_concept_sources() -> None:
    runner = CliRunner()
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        data = json.loads(runner.invoke(cli.app, ["plugins", "--json"]).stdout)
        table = runner.invoke(cli.app, ["plugins"], env={"COLUMNS": "400"}).output
    (row,) = [p for p in data["plugins"] if p["name"] == "concept_sources"]
    assert row["provides"] == ["concept source templates", "concept source shapes-captions"]
    assert row["error"] is None and row["distribution"] == "conceptedit"
    assert "concept source shapes-captions" in table


def test_concepts_command_prints_the_expanded_pairs(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(count=5, seed=2), sort_keys=False), encoding="utf-8")
    runner = CliRunner()
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        listed = runner.invoke(cli.app, ["concepts", str(path), "--json"])
        text = runner.invoke(cli.app, ["concepts", str(path)])
        bad = runner.invoke(cli.app, ["concepts", str(path), "--set", "concepts.red.generate.count=0"])
    assert listed.exit_code == 0, listed.output
    expected = [p.__dict__ for p in _pairs(count=5, seed=2)]
    assert json.loads(listed.stdout) == {"red": expected}
    assert text.exit_code == 0 and "red: 5 pair(s), from shapes-captions" in text.output
    assert expected[0]["source"] in text.output
    assert bad.exit_code == 2 and "concepts.red.generate.count" in bad.output and "Traceback" not in bad.output
