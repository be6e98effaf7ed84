"""Every ``conceptedit`` command through typer's CliRunner, on builtin:tiny-sd with 2 sampling steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import Result
from conceptedit_builtin.ca import CaParams
from conceptedit_builtin.esd import EsdParams
from conceptedit_builtin.trce_eot import TrceEotParams
from fake_methods import FakeMethodsPlugin
from PIL import Image
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import conceptedit.cli.app as cli
from conceptedit.cli.app import app
from conceptedit.testing import isolated_host, tiny_recipe

CONCEPTS = {"cats": {"pairs": [["a cat", "a dog"]], "templates": ["{}", "a photo of {}"]}}


def _recipe_dict(**fields: Any) -> dict[str, Any]:
    """The smallest recipe that runs offline: trce_eot without a prior, with a ridge term."""
    edit = {"method": "trce_eot", "params": {"concepts": "cats", "prior": None, "ridge": 0.1}}
    return tiny_recipe(edit, concepts=CONCEPTS, **fields)


def _write_recipe(folder: Path, **fields: Any) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe_dict(**fields), sort_keys=False), encoding="utf-8")
    return path


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def _refused(result: Result, *expected: str) -> None:
    """Exit code 2 from a handled error: a message, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in:\n{result.output}"


@pytest.fixture(autouse=True)
def _host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Built-in methods plus the test methods; wide consoles so tables are not folded; cwd in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "out", Console(width=400))
    monkeypatch.setattr(cli, "err", Console(width=400, stderr=True))
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of the tiny recipe, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("cli-run")
    recipe = _write_recipe(folder)
    with isolated_host(entry_points=True):
        _ok(_run("apply", recipe, "--out", folder / "run", "--quiet"))
    return folder / "run"


# --------------------------------------------------------------------------- plugins / methods / schema


def test_plugins_table_lists_core_plugins_and_the_builtin_method() -> None:
    output = _ok(_run("plugins")).output
    for name in ("conceptedit.models.defaults", "conceptedit.io.exporters", "trce_eot", "fake_methods"):
        assert name in output
    line = next(row for row in output.splitlines() if "trce_eot" in row and "entry point" in row)
    assert "loaded" in line and "conceptedit" in line


def test_plugins_json_says_where_each_plugin_came_from() -> None:
    data = json.loads(_ok(_run("plugins", "--json")).stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["conceptedit.models.defaults"]["source"] == "core"
    assert by_name["conceptedit.io.exporters"]["source"] == "core"
    trce = by_name["trce_eot"]
    assert trce["source"] == "entry point" and trce["distribution"] == "conceptedit"
    assert trce["provides"] == ["trce_eot"] and trce["error"] is None
    assert by_name["fake_methods"]["source"] == "registered"
    assert data["conflicts"] == []


def test_methods_lists_every_method_with_its_parameters() -> None:
    output = _ok(_run("methods")).output
    for name in ("trce_eot", "test_q_steer", "test_eot_map", "closed_form", "training"):
        assert name in output
    assert "ridge" in output and "eot_index" in output  # the parameter tables are printed


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("uce", "closed_form"),
        ("rece", "closed_form"),
        ("speed", "closed_form"),
        ("sld", "inference_time"),
        ("adavd", "inference_time"),
    ],
)
def test_methods_lists_the_peer_methods_with_summary_paper_kind_and_every_parameter(name: str, kind: str) -> None:
    (info,) = json.loads(_ok(_run("methods", name, "--json")).stdout)
    params_cls = cli.host().method(name).Params
    assert info["kind"] == kind and info["plugin"] == name
    assert info["summary"] and info["paper"]
    assert [p["name"] for p in info["params"]] == list(params_cls.model_fields)
    assert all(p["type"] and p["description"] for p in info["params"])
    output = _ok(_run("methods")).output
    assert f"{name}  ({kind};" in output and info["summary"] in output and info["paper"] in output
    for field_name in params_cls.model_fields:
        assert field_name in output, field_name


def test_methods_json_for_one_method_has_every_parameter() -> None:
    data = json.loads(_ok(_run("methods", "trce_eot", "--json")).stdout)
    assert [m["name"] for m in data] == ["trce_eot"]
    info = data[0]
    assert info["kind"] == "closed_form" and info["plugin"] == "trce_eot" and "sd1" in info["backbones"]
    params = {p["name"]: p for p in info["params"]}
    assert set(params) == set(TrceEotParams.model_fields)
    for p in params.values():
        assert p["type"] and p["description"], p
    assert params["eta"]["default"] == pytest.approx(1e-4)
    assert params["ridge"]["default"] == 0.0
    assert params["concepts"]["default"] == "<required>"
    assert params["rows"]["default"]["eot"] == 1.0  # nested models are shown as their defaults


def test_methods_json_of_a_training_method_includes_its_training_loop() -> None:
    (info,) = json.loads(_ok(_run("methods", "test_q_steer", "--json")).stdout)
    training = {p["name"]: p["default"] for p in info["training"]}
    assert training["steps"] == 4 and training["lr"] == pytest.approx(1e-3) and "optimizer" in training


@pytest.mark.parametrize(
    ("name", "params_cls", "defaults"),
    [
        ("esd", EsdParams, {"steps": 1000, "lr": 1e-5, "optimizer": "adam"}),
        ("ca", CaParams, {"steps": 200, "lr": 2e-6, "optimizer": "adamw"}),
    ],
)
def test_methods_lists_esd_and_ca_with_summary_paper_and_every_parameter(
    name: str, params_cls: type, defaults: dict[str, object]
) -> None:
    (info,) = json.loads(_ok(_run("methods", name, "--json")).stdout)
    assert info["kind"] == "training" and info["summary"] and "ICCV 2023" in info["paper"]
    params = {p["name"]: p for p in info["params"]}
    assert set(params) == set(params_cls.model_fields)
    assert all(p["type"] and p["description"] for p in params.values())
    training = {p["name"]: p["default"] for p in info["training"]}
    for key, value in defaults.items():
        assert training[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    text = _ok(_run("methods", name)).output
    assert info["paper"] in text and all(p in text for p in params)


def test_methods_unknown_name_suggests_the_close_one() -> None:
    _refused(_run("methods", "trce_eott"), "no installed plugin provides edit method 'trce_eott'", "'trce_eot'")


def test_schema_is_json_schema_that_accepts_good_recipes_and_rejects_bad_ones() -> None:
    schema = json.loads(_ok(_run("schema")).stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    for name in ("trce_eot", "test_q_steer", "test_eot_map"):
        assert f"Edit_{name}" in schema["$defs"]
    validator = jsonschema.Draft202012Validator(schema)
    good = _recipe_dict()
    assert list(validator.iter_errors(good)) == []
    assert validator.is_valid(_recipe_dict(model={"id": "builtin:tiny-sd", "revision": None}))
    bad_eta = _recipe_dict()
    bad_eta["edits"][0]["params"]["eta"] = -1
    bad_key = _recipe_dict(sedd=1)
    bad_version = _recipe_dict(schema_version=2)
    for bad in (bad_eta, bad_key, bad_version):
        assert not validator.is_valid(bad)


# --------------------------------------------------------------------------- validate / apply


def test_validate_a_good_recipe(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path)
    output = _ok(_run("validate", recipe)).output
    assert output.startswith("ok ") and "builtin:tiny-sd" in output and "trce_eot" in output
    resolved = json.loads(_ok(_run("validate", recipe, "--json")).stdout)
    assert resolved["edits"][0]["params"]["eta"] == pytest.approx(1e-4)  # defaults are filled in
    assert resolved["output"]["formats"] == ["delta"]


def test_apply_writes_a_run_folder_quietly(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path)
    result = _ok(_run("apply", recipe, "--out", tmp_path / "run", "--quiet"))
    assert "tensors differ" not in result.stdout
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "edit.safetensors",
        "manifest.json",
        "recipe.resolved.yaml",
        "recipe.yaml",
    ]
    assert not (tmp_path / "run.partial").exists()
    assert (run / "recipe.yaml").read_text(encoding="utf-8") == recipe.read_text(encoding="utf-8")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"]["id"] == "builtin:tiny-sd"


def test_apply_prints_a_summary_table(tmp_path: Path) -> None:
    output = _ok(_run("apply", _write_recipe(tmp_path), "--out", tmp_path / "run")).output
    assert "trce_eot" in output and f"saved to {tmp_path / 'run'}" in output


def test_apply_json_lists_the_changed_tensors(tmp_path: Path) -> None:
    result = _ok(_run("apply", _write_recipe(tmp_path), "--out", tmp_path / "run", "--json"))
    data = json.loads(result.stdout)
    assert data["run_dir"] == str(tmp_path / "run") and data["dry_run"] is False
    changed = data["changed"]
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    assert {n.rsplit(".", 2)[-2] for n in changed} == {"to_k", "to_v"}
    assert set(changed) == set(load_file(str(tmp_path / "run" / "edit.safetensors")))
    (edit,) = data["edits"]
    assert edit["method"] == "trce_eot" and edit["changed"] == len(changed)


def test_apply_dry_run_writes_nothing(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path)
    output = _ok(_run("apply", recipe, "--out", tmp_path / "run", "--dry-run")).output
    assert "nothing was written" in output
    data = json.loads(_ok(_run("apply", recipe, "--out", tmp_path / "run", "--dry-run", "--json")).stdout)
    assert data["dry_run"] is True and data["run_dir"] is None and data["changed"] == []
    assert data["plan"]["plan"] == str(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_apply_set_override_reaches_the_resolved_recipe(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path)
    _ok(_run("apply", recipe, "--out", tmp_path / "run", "-q", "--set", "edits.0.params.eta=1e-3"))
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text(encoding="utf-8"))
    assert resolved["edits"][0]["params"]["eta"] == pytest.approx(1e-3)
    given = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text(encoding="utf-8"))
    assert "eta" not in given["edits"][0]["params"]  # the file as given is kept unchanged
    meta = json.loads(safe_open(str(tmp_path / "run" / "edit.safetensors"), "pt").metadata()["recipe"])
    assert meta["edits"][0]["params"]["eta"] == pytest.approx(1e-3)  # and the edit file records it


def test_apply_model_option_replaces_the_recipe_model(tmp_path: Path) -> None:
    """The recipe names a folder that does not exist; --model replaces it before validation."""
    recipe = _write_recipe(tmp_path, model="./no/such/model")
    _refused(_run("validate", recipe), "model.id", "'./no/such/model' does not exist")
    _ok(_run("apply", recipe, "--model", "builtin:tiny-sd", "--out", tmp_path / "run", "-q"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["base_model"]["id"] == "builtin:tiny-sd"
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text(encoding="utf-8"))
    assert resolved["model"]["id"] == "builtin:tiny-sd"


def test_apply_refuses_an_existing_run_folder_unless_overwrite(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    _refused(_run("apply", recipe, "--out", run), f"run folder {run} already exists", "output.overwrite: true")
    assert [p.name for p in run.iterdir()] == ["keep.txt"]
    _ok(_run("apply", recipe, "--out", run, "-q", "--set", "output.overwrite=true"))
    assert "keep.txt" not in {p.name for p in run.iterdir()} and (run / "manifest.json").is_file()


def test_apply_resume_needs_out(tmp_path: Path) -> None:
    result = _run("apply", _write_recipe(tmp_path), "--resume")
    assert result.exit_code == 2 and "--resume needs --out" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# --------------------------------------------------------------------------- generate


def _generate(target: str | Path, out: Path, *extra: str) -> Result:
    return _ok(_run("generate", target, "a cat", "--steps", "2", "--device", "cpu", "--out", out, *extra))


def test_generate_writes_a_png_and_is_deterministic(tmp_path: Path) -> None:
    first, again, other = tmp_path / "x.png", tmp_path / "y.png", tmp_path / "z.png"
    assert f"wrote {first}" in _generate("builtin:tiny-sd", first, "--seed", "0").output
    with Image.open(first) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    _generate("builtin:tiny-sd", again, "--seed", "0")
    _generate("builtin:tiny-sd", other, "--seed", "1")
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_generate_several_images_into_a_folder(tmp_path: Path) -> None:
    _generate("builtin:tiny-sd", tmp_path / "imgs", "--seed", "3", "--count", "2")
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["a-cat-seed3.png", "a-cat-seed4.png"]


def test_generate_compare_base_writes_a_two_row_grid(tmp_path: Path, run_dir: Path) -> None:
    grid_png, base_png = tmp_path / "grid.png", tmp_path / "base.png"
    assert "top: base model, bottom: edited" in _generate(run_dir, grid_png, "--compare-base").output
    _generate("builtin:tiny-sd", base_png)
    with Image.open(grid_png) as grid, Image.open(base_png) as base:
        cell = 2 * base.width  # 64 px images are scaled up to at least 128 px cells
        assert grid.height == 2 * cell
        label = grid.width - cell  # one column of images after the labels
        top = grid.crop((label, 0, label + cell, cell))
        bottom = grid.crop((label, cell, label + cell, 2 * cell))
        scaled = base.convert("RGB").resize((cell, cell), Image.NEAREST)
        assert top.tobytes() == scaled.tobytes()  # the top row is the unedited base model
        assert bottom.tobytes() != top.tobytes()  # the bottom row carries the edit


def test_generate_refuses_compare_base_without_a_run(tmp_path: Path) -> None:
    result = _run("generate", "builtin:tiny-sd", "a cat", "--compare-base", "--out", tmp_path / "g.png")
    assert result.exit_code == 2 and "--compare-base needs a run folder" in result.output
    assert not (tmp_path / "g.png").exists()


def test_generate_from_a_missing_model_folder_is_a_clean_error(tmp_path: Path) -> None:
    _refused(
        _run("generate", "./no/such/model", "a cat", "--steps", "2", "--out", tmp_path / "x.png"),
        "'./no/such/model': no such folder",
    )
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- env


def test_env_table_and_json() -> None:
    output = _ok(_run("env")).output
    assert "torch" in output and "diffusers" in output and "plugin trce_eot" in output
    info = json.loads(_ok(_run("env", "--json")).stdout)
    assert info["versions"]["torch"] and info["versions"]["conceptedit"] == "0.1.0"
    assert isinstance(info["cuda_available"], bool) and info["torch_threads"] >= 1
    assert "trce_eot" in {p["name"] for p in info["plugins"]}


def _generate_in_a_new_process(tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> str:
    """stderr of a real ``conceptedit generate`` run on the shipped shapes model (loaded from disk,
    so diffusers and transformers draw their loading bars unless told not to)."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "conceptedit", *options, "generate", "builtin:shapes", "a red circle"]
    command += ["--steps", "1", "--device", "cpu", "--out", str(tmp_path / "image.png")]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


THIRD_PARTY_BARS = ("Loading pipeline components", "Loading weights")


def test_commands_print_no_third_party_progress_bars_unless_verbose(tmp_path: Path) -> None:
    quiet = _generate_in_a_new_process(tmp_path)
    assert not any(bar in quiet for bar in THIRD_PARTY_BARS), quiet
    assert "Traceback" not in quiet and "Warning" not in quiet, quiet
    verbose = _generate_in_a_new_process(tmp_path, "--verbose")
    assert "Loading pipeline components" in verbose
    from_env = _generate_in_a_new_process(tmp_path, env={"CONCEPTEDIT_VERBOSE": "1"})
    assert "Loading pipeline components" in from_env
