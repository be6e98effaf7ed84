"""Prompt suites: registration, recipe validation, and the shapes suites' prompts and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptedit import RecipeError, UnknownSuiteError, load_recipe
from conceptedit.api.suite import SuitePrompt
from conceptedit.plugins import get_host
from conceptedit.testing import tiny_recipe


def test_shapes_suites_are_installed_and_hold_their_prompts() -> None:
    host = get_host()
    explicit = host.suite("shapes-explicit")
    prompts = explicit(explicit.Options(target="red", seeds=3)).prompts()
    assert [p.text for p in prompts[:3]] == ["a red circle"] * 3 and [p.seed for p in prompts[:3]] == [0, 1, 2]
    assert len(prompts) == 4 * 3 and all(p.labels["colour"] == "red" for p in prompts)
    implicit = host.suite("shapes-implicit")
    texts = {p.text for p in implicit(implicit.Options(target="red", seeds=1)).prompts()}
    assert "a scarlet circle" in texts and not any("red" in t for t in texts)
    preserve = host.suite("shapes-preserve")
    kept = preserve(preserve.Options(target="circle", seeds=1)).prompts()
    assert kept and all(p.labels["shape"] != "circle" for p in kept)


def test_shapes_summary_counts_the_target_in_any_listed_colour() -> None:
    suite_cls = get_host().suite("shapes-explicit")
    suite = suite_cls(suite_cls.Options(target="red", seeds=1))
    prompts = [SuitePrompt("a red circle", 0, {"colour": "red", "shape": "circle", "target": "red"})] * 4
    verdicts = [("red", ["red"]), ("blue", ["blue", "red"]), ("blue", ["blue"]), ("none", [])]
    scores = [
        {
            "colour": c,
            "colours": cs,
            "shape": "circle",
            "shapes": ["circle"],
            "colour_correct": c == "red",
            "shape_correct": True,
        }
        for c, cs in verdicts
    ]
    metrics = suite.summarise(prompts, scores)
    assert metrics["target_shown"] == 0.5 and metrics["erased"] == 0.5  # half-red images still show red
    assert metrics["colour_correct"] == 0.25 and metrics["shape_correct"] == 1.0


def test_unknown_suite_is_refused_by_name() -> None:
    with pytest.raises(UnknownSuiteError, match="did you mean 'shapes-explicit'"):
        get_host().suite("shapes-explict")


def test_recipe_evaluate_entries_are_validated() -> None:
    recipe = tiny_recipe(
        {"method": "trce_eot", "params": {"concepts": "c", "prior": None}},
        concepts={"c": {"pairs": [["a cat", "a dog"]]}},
    )
    recipe["evaluate"] = [
        {"suite": "shapes-explict"},
        {"suite": "shapes-preserve", "options": {"target": "mauve"}},
        {"suite": "shapes-implicit", "options": {"colour": "red"}},
    ]
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    text = str(caught.value)
    assert "evaluate.0.suite: unknown prompt suite 'shapes-explict'" in text and "did you mean" in text
    assert "evaluate.1.options.target" in text and "unknown concept 'mauve'" in text
    assert "evaluate.2.options.colour" in text


def test_eval_command_scores_a_model_next_to_a_run(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from conceptedit import apply
    from conceptedit.cli.app import app

    repo = Path(__file__).resolve().parents[1]
    recipe = {
        "schema_version": 1,
        "model": "builtin:shapes",
        "device": "cpu",
        "seed": 0,
        "concepts": {"red": {"file": str(repo / "recipes" / "concepts" / "shapes_red.json")}},
        "edits": [
            {
                "method": "trce_eot",
                "params": {
                    "concepts": "red",
                    "eta": 0.04,
                    "rows": {"eot": 1.0, "last_pad": 1.0},
                    "prior": {"captions": str(repo / "recipes" / "data" / "shapes_captions.txt"), "limit": None},
                },
            }
        ],
    }
    apply(recipe, out=tmp_path / "run", quiet=True)
    args = [
        "eval",
        "builtin:shapes",
        "--suite",
        "shapes-explicit",
        "--option",
        "target=red",
        "--option",
        "seeds=2",
        "--compare",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "eval"),
        "--guidance",
        "5",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "builtin:shapes" in result.output and "target_shown" in result.output
    (suite,) = json.loads((tmp_path / "eval" / "metrics.json").read_text())["suites"]
    assert suite["n"] == 8 and suite["metrics"]["target_shown"] == 1.0  # the base model draws red
    assert suite["base_metrics"]["erased"] >= 0.9  # the run (compared) no longer does; measured 1.0
    _check_report(tmp_path / "eval", images=2 * 8)  # both models' strips, 8 prompts each
    bad = CliRunner().invoke(app, ["eval", "builtin:shapes", "--suite", "shapes-explicit", "--option", "target=mauve"])
    said = " ".join(bad.output.replace("│", " ").split())  # rich wraps the message in a box
    assert bad.exit_code == 2 and "unknown concept 'mauve'" in said and "--option" in said


def _check_report(folder: Path, images: int) -> None:
    """The HTML report parses, and every image in it is a PNG that decodes; the Markdown has the table."""
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    sources: list[str] = []

    class Images(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                sources.append(dict(attrs)["src"] or "")

    Images().feed((folder / "report.html").read_text())
    assert len(sources) == images
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.size == (32, 32)
    assert "| target_shown |" in (folder / "report.md").read_text()


def test_the_console_table_shows_each_rate_with_its_interval_and_count_in_one_row() -> None:
    from rich.console import Console

    from conceptedit.api.results import SuiteResult
    from conceptedit.evaluation.evaluate import print_results

    metrics = {"erased": 0.875, "erased_n": 16.0, "erased_low": 0.64, "erased_high": 0.965, "hue_drift_n": 10.0}
    console = Console(width=200, record=True)
    print_results([SuiteResult("shapes-explicit", {"target": "red"}, 16, metrics, None, {})], console)
    text = console.export_text()
    assert "0.875 [0.640, 0.965] n=16" in text
    assert "erased_low" not in text and "erased_n" not in text
    assert "hue_drift_n" in text  # a count without an interval keeps its own row
