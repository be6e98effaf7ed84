"""``conceptedit.export`` and ``conceptedit export``: the orchestration every format goes through.

The formats' own maths (LoRA factors, key layouts) is tested in test_export_lora.py and
test_export_single_file.py; here: the round-trip check, the model card, guards carried as
hook-only parts, refusals with the fix named, atomic publishing, the recipe's ``output.formats``,
the command line and the Hub upload (up to the call into ``huggingface_hub``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import conceptedit
from conceptedit.api.export import Exporter, ExportReport, ExportSource
from conceptedit.cli.app import app
from conceptedit.export_run import CHECK_SAMPLING, push_to_hub
from conceptedit.plugins import get_host
from conceptedit.testing import tiny_recipe

CONCEPTS = {"cats": {"pairs": [["a cat", "a dog"]], "templates": ["{}", "a photo of {}"]}}
UCE = {"method": "uce", "params": {"concepts": "cats"}}
SLD = {"method": "sld", "params": {"safety_concept": "a cat", "preset": "max"}}


@pytest.fixture(scope="module")
def uce_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uce") / "run"
    conceptedit.apply(tiny_recipe(UCE, concepts=CONCEPTS), out=run, quiet=True)
    return run


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return dict(yaml.safe_load(card[4 : card.index("\n---", 4)]))


def test_delta_and_diffusers_round_trip_exactly_with_a_model_card(uce_run: Path, tmp_path: Path) -> None:
    for fmt in ("delta", "diffusers"):
        result = conceptedit.export(uce_run, fmt, out=tmp_path / fmt)
        assert result.folder == tmp_path / fmt and not (tmp_path / f"{fmt}.partial").exists()
        check = result.check
        assert check["checked"] and check["images"] == 2 * len(check["prompts"])
        assert check["prompts"][0] == "a cat"  # the concept set's first prompt, where a lost edit shows
        assert check["weights_max_relative_error"] == 0.0 and check["pixel_max_abs_diff"] == 0.0
        record = json.loads((result.folder / "export.json").read_text())
        assert record["format"] == fmt and record["check"]["checked"]
        assert yaml.safe_load((result.folder / "recipe.yaml").read_text())["edits"][0]["method"] == "uce"
        manifest = json.loads((result.folder / "manifest.json").read_text())
        assert manifest == json.loads((uce_run / "manifest.json").read_text())
        card = (result.folder / "README.md").read_text()
        front = _front_matter(card)
        assert front["license"] == "apache-2.0" and "concept-erasure" in front["tags"] and fmt in front["tags"]
        assert "base_model" not in front  # builtin:tiny-sd is not a Hub repository
        assert "a cat" not in front and "`uce`" in card and "measured nothing" in card


def test_default_folder_and_overwrite(uce_run: Path) -> None:
    first = conceptedit.export(uce_run, "delta")
    assert first.folder == uce_run / "exports" / "delta"
    with pytest.raises(conceptedit.ExportError, match=r"already exists.*--overwrite"):
        conceptedit.export(uce_run, "delta")
    again = conceptedit.export(uce_run, "delta", overwrite=True)
    assert (again.folder / "edit.safetensors").is_file()


def test_refusals_name_the_fix(uce_run: Path, tmp_path: Path) -> None:
    with pytest.raises(conceptedit.ExportError, match=r"unknown export format 'difusers'.*diffusers"):
        conceptedit.export(uce_run, "difusers", out=tmp_path / "x")
    with pytest.raises(conceptedit.ExportError, match="format delta: rank: Extra inputs"):
        conceptedit.export(uce_run, "delta", options={"rank": 4}, out=tmp_path / "x")
    with pytest.raises(conceptedit.RunDirError, match="not a finished"):
        conceptedit.export(tmp_path, "delta", out=tmp_path / "x")
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("edit.safetensors", "manifest.json"):
        (moved / name).write_bytes((uce_run / name).read_bytes())
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["base_model"]["id"] = str(tmp_path / "no-such-model")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(conceptedit.ExportError, match=r"cannot be loaded.*pass --base"):
        conceptedit.export(moved, "delta", out=tmp_path / "x")
    done = conceptedit.export(moved, "delta", base="builtin:tiny-sd", out=tmp_path / "x")
    assert done.check["weights_max_relative_error"] == 0.0
    assert not list(tmp_path.glob("*.partial"))


def test_a_failing_exporter_leaves_nothing(uce_run: Path, tmp_path: Path) -> None:
    def broken(source: ExportSource, folder: Path) -> ExportReport:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    host = get_host()
    host.registry.exporters["broken"] = Exporter("broken", "fails half-way", broken)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            conceptedit.export(uce_run, "broken", out=tmp_path / "broken")
    finally:
        del host.registry.exporters["broken"]
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.partial").exists()


def test_guards_travel_as_hook_only_parts_and_the_check_reinstalls_them(tmp_path: Path) -> None:
    run = tmp_path / "run"
    conceptedit.apply(tiny_recipe(UCE, SLD, concepts=CONCEPTS), out=run, quiet=True)
    result = conceptedit.export(run, "diffusers", out=tmp_path / "out")
    assert result.report.hook_only == ["sld"]
    assert any("cannot be merged into weights" in note for note in result.report.notes)
    guard_files = [g["file"] for g in json.loads((run / "manifest.json").read_text())["guards"]]
    assert guard_files and all((result.folder / f).is_file() for f in guard_files)
    # the check loads the weights, installs the guard with load_guards, and gets the run's images
    assert result.check["pixel_max_abs_diff"] == 0.0
    card = (result.folder / "README.md").read_text()
    assert "run only as code at sampling time (sld)" in card
    # and without the guard the images differ: the guard is what the check put back
    from diffusers import StableDiffusionPipeline

    from conceptedit.evaluation.sampling import generate

    plain = StableDiffusionPipeline.from_pretrained(str(result.folder / "pipeline"), local_files_only=True)
    guarded = conceptedit.load_guards(
        StableDiffusionPipeline.from_pretrained(str(result.folder / "pipeline"), local_files_only=True),
        result.folder,
    )
    (a,) = generate(plain, "a dog", 0, CHECK_SAMPLING)
    (b,) = generate(guarded, "a dog", 0, CHECK_SAMPLING)
    assert a.tobytes() != b.tobytes()


def test_recipe_formats_are_written_after_the_run(tmp_path: Path) -> None:
    recipe = tiny_recipe(UCE, concepts=CONCEPTS, output={"formats": ["delta", "diffusers"]})
    conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    folder = tmp_path / "run" / "exports" / "diffusers"
    assert json.loads((folder / "export.json").read_text())["check"]["pixel_max_abs_diff"] == 0.0
    assert not (tmp_path / "run" / "exports" / "delta").exists()  # delta is the run folder itself


def test_recipe_export_options_are_checked_before_the_run(tmp_path: Path) -> None:
    stray = tiny_recipe(UCE, concepts=CONCEPTS, output={"formats": ["delta"], "export_options": {"lora": {}}})
    with pytest.raises(conceptedit.RecipeError) as caught:
        conceptedit.apply(stray, out=tmp_path / "run", quiet=True)
    assert "output.export_options.lora" in str(caught.value) and "add lora to output.formats" in str(caught.value)
    wrong = tiny_recipe(
        UCE, concepts=CONCEPTS, output={"formats": ["diffusers"], "export_options": {"diffusers": {"rank": 2}}}
    )
    with pytest.raises(conceptedit.RecipeError, match=r"export_options\.diffusers\.rank"):
        conceptedit.apply(wrong, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_cli_lists_formats_exports_and_reports_errors(uce_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["export", str(uce_run), "--list", "--json"])
    assert listed.exit_code == 0, listed.output
    formats = json.loads(listed.output)
    assert formats["delta"]["available"] and formats["diffusers"]["available"]
    done = runner.invoke(app, ["export", str(uce_run), "--format", "delta", "--out", str(tmp_path / "d")])
    assert done.exit_code == 0, done.output
    assert "loaded back and compared" in done.output and (tmp_path / "d" / "README.md").is_file()
    bad = runner.invoke(app, ["export", str(uce_run), "--format", "delta", "-o", "rank", "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    wrong = runner.invoke(app, ["export", str(uce_run), "--format", "nope", "--out", str(tmp_path / "e")])
    assert wrong.exit_code == 2 and "unknown export format" in wrong.output and "Traceback" not in wrong.output


def test_push_to_hub_uploads_the_export_folder(uce_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeApi:
        def __init__(self, token: str | None = None) -> None:
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id: str, **kwargs: Any) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs: Any) -> Any:
            calls.append(("upload_folder", kwargs))
            return type("Commit", (), {"commit_url": "https://hub.example/commit/1"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = conceptedit.export(uce_run, "delta", out=tmp_path / "d").folder
    url = push_to_hub(folder, "me/no-cats")
    assert url == "https://hub.example/commit/1"
    upload = dict(calls)["upload_folder"]
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "me/no-cats"
    assert dict(calls)["create_repo"]["exist_ok"] is True
    with pytest.raises(conceptedit.ExportError, match="not a conceptedit export folder"):
        push_to_hub(uce_run, "me/no-cats")
