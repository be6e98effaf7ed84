"""Malformed recipes through the real CLI: exit code 2, no traceback, file/line/YAML path and a fix, nothing written.

Every case runs ``conceptedit validate`` (where it takes the arguments) and ``conceptedit apply --out``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import Result
from fake_methods import FakeMethodsPlugin
from typer.testing import CliRunner

from conceptedit.cli.app import app
from conceptedit.testing import isolated_host

RECIPE = "recipe.yaml"

# Lines 1-7; the edit below starts on line 8.
HEAD = """\
schema_version: 1
model: builtin:tiny-sd
device: cpu
concepts:
  cats:
    pairs: [["a cat", "a dog"]]
    templates: ["{}", "a photo of {}"]
"""
# Lines 8-10 after HEAD: a trce_eot edit that runs offline (no prior, a ridge term).
EDIT = """\
edits:
  - method: trce_eot
    params: {concepts: cats, prior: null, ridge: 0.1}
"""
VALID = HEAD + EDIT


def trce(*params: str) -> str:
    """A valid recipe whose trce_eot params are one per line; the extra ``params`` start on line 14."""
    body = "edits:\n  - method: trce_eot\n    params:\n      concepts: cats\n      prior: null\n      ridge: 0.1\n"
    return HEAD + body + "".join(f"      {line}\n" for line in params)


def steer(training: str) -> str:
    """A recipe with one test_q_steer edit whose ``training:`` block holds ``training`` on line 11."""
    return HEAD + f"edits:\n  - method: test_q_steer\n    training:\n      {training}\n"


def group(*members: str) -> str:
    """A recipe with one training group (its ``edits:`` on line 10, first member on line 11)."""
    return HEAD + "edits:\n  - group: together\n    edits:\n" + "".join(members)


@dataclass(frozen=True)
class Case:
    """A malformed recipe and what the error must say.

    Attributes:
        text: The recipe file's content (None: no file is written).
        path: The YAML path the message must name ("" for the whole file).
        line: The line it must name (None: no line, e.g. the value came from the command line).
        expect: More substrings the output must hold: the problem and the suggested fix.
        args: Extra arguments for both commands (``--set``).
        apply_args: Extra arguments for ``apply`` only; such cases skip ``validate``.
        files: Other files to write next to the recipe.
    """

    text: str | bytes | None
    path: str
    line: int | None
    expect: tuple[str, ...]
    args: tuple[str, ...] = ()
    apply_args: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "unknown-top-level-key": Case(
        VALID.replace("edits:", "edit:"),
        "edit",
        8,
        ("unknown key 'edit'", "did you mean 'edits'?", "rename 'edit' (line 8) to 'edits'"),
    ),
    "unknown-param-key": Case(trce("etaa: 0.1"), "edits.0.params.etaa", 14, ("unknown key", "did you mean 'eta'?")),
    "unknown-method": Case(
        VALID.replace("trce_eot", "trce_eott"),
        "edits.0",
        9,
        ("unknown edit method 'trce_eott'", "did you mean 'trce_eot'?"),
    ),
    "missing-method": Case(
        HEAD + "edits:\n  - params: {concepts: cats}\n", "edits.0", 9, ("needs a `method:` key", "trce_eot")
    ),
    "missing-model": Case(
        VALID.replace("model: builtin:tiny-sd\n", ""),
        "model",
        1,
        ("required key 'model' is missing", "add `model: builtin:tiny-sd`"),
    ),
    "missing-schema-version": Case(
        VALID.replace("schema_version: 1\n", ""), "schema_version", 1, ("is missing", "add `schema_version: 1`")
    ),
    "wrong-schema-version": Case(
        VALID.replace("schema_version: 1", "schema_version: 2"),
        "schema_version",
        1,
        ("got 2", "write `schema_version: 1`"),
    ),
    "seed-not-a-number": Case(VALID + 'seed: "abc"\n', "seed", 11, ("got 'abc'", "write a whole number")),
    "negative-seed": Case(VALID + "seed: -1\n", "seed", 11, ("got -1", "use a value >= 0")),
    "negative-eta": Case(trce("eta: -1"), "edits.0.params.eta", 14, ("got -1", "use a value >= 0")),
    "negative-lr": Case(steer("lr: -0.1"), "edits.0.training.lr", 11, ("got -0.1", "use a value > 0")),
    "zero-steps": Case(steer("steps: 0"), "edits.0.training.steps", 11, ("got 0", "use a value > 0")),
    "bad-indentation": Case(
        "schema_version: 1\nmodel: builtin:tiny-sd\n  device: cpu\n" + EDIT,
        "",
        3,
        ("invalid YAML", "check indentation"),
    ),
    "unclosed-bracket": Case(
        HEAD + "edits:\n  - method: trce_eot\n    params: {concepts: cats, prior: null\n",
        "",
        11,
        ("invalid YAML", "expected ',' or '}'", "flow mapping that starts on line 10"),
    ),
    "tab-indentation": Case(VALID + "\tseed: 1\n", "", 11, ("invalid YAML", r"'\t'", "indent with spaces")),
    "empty-file": Case("", "", None, ("the recipe is empty", "schema_version: 1")),
    "yaml-list": Case(
        "- schema_version: 1\n- model: builtin:tiny-sd\n", "", 1, ("must be a YAML mapping", "not a list")
    ),
    "yaml-scalar": Case("just some words\n", "", 1, ("must be a YAML mapping", "'just some words'")),
    "not-utf8": Case(b"schema_version: 1\nmodel: \xff\xfe\n", "", None, ("not UTF-8", "save the recipe as UTF-8")),
    "concept-file-missing": Case(
        VALID.replace('pairs: [["a cat", "a dog"]]', "file: no-such-concepts.json"),
        "concepts.cats.file",
        6,
        ("no-such-concepts.json does not exist", "relative to the recipe"),
    ),
    "concept-pairs-and-file": Case(
        VALID.replace("    templates:", "    file: concepts.json\n    templates:"),
        "concepts.cats",
        5,
        ("give exactly one of `pairs`, `concepts` or `file`", "(got pairs, file)"),
    ),
    "concept-set-without-source": Case(
        VALID.replace('    pairs: [["a cat", "a dog"]]\n', ""), "concepts.cats", 5, ("give exactly one of",)
    ),
    "template-without-slot": Case(
        VALID.replace('"a photo of {}"', '"a photo of"'),
        "concepts.cats.templates.1",
        7,
        ("'a photo of' must contain `{}`", "e.g. 'a photo of {}'"),
    ),
    "unknown-concept-set": Case(
        VALID.replace("concepts: cats,", "concepts: catz,"),
        "edits.0.params.concepts",
        10,
        ("no concept set named 'catz'", "did you mean 'cats'?"),
    ),
    "bad-device": Case(
        VALID.replace("device: cpu", "device: gpu"), "device", 3, ("invalid device 'gpu'", "use auto, cpu, cuda")
    ),
    "bad-dtype": Case(VALID + "dtype: float8\n", "dtype", 11, ("got 'float8'", "'float32', 'float16' or 'bfloat16'")),
    "unknown-output-format": Case(
        VALID + "output:\n  formats: [delta, difusers]\n",
        "output.formats.1",
        12,
        ("unknown output format 'difusers'", "did you mean 'diffusers'?"),
    ),
    "plugin-path-missing": Case(
        VALID + "plugins: [no_such_plugin.py]\n",
        "plugins.0",
        11,
        ("'no_such_plugin.py' does not exist", "relative to the recipe"),
    ),
    "plugin-raises-on-import": Case(
        VALID + "plugins: [broken_plugin.py]\n",
        "plugins.0",
        11,
        ("failed to import", "RuntimeError: boom at import", "broken_plugin.py:2"),
        files={"broken_plugin.py": '"""Fails on import."""\nraise RuntimeError("boom at import")\n'},
    ),
    "plugins-not-a-list": Case(
        VALID + "plugins: my_plugin.py\n", "plugins", 11, ("valid list", "write a YAML list, e.g. [my_plugin.py]")
    ),
    "model-folder-missing": Case(
        VALID.replace("builtin:tiny-sd", "./no/such/model"),
        "model.id",
        2,
        ("model folder './no/such/model' does not exist", "give a diffusers folder"),
    ),
    "model-folder-not-diffusers": Case(
        VALID.replace("builtin:tiny-sd", "weights"),
        "model.id",
        2,
        ("'weights' has no model_index.json", "give the folder that holds model_index.json"),
        files={"weights/notes.txt": "not a pipeline"},
    ),
    "unknown-builtin-model": Case(
        VALID.replace("builtin:tiny-sd", "builtin:tiny-sdd"),
        "model.id",
        2,
        ("unknown built-in model 'builtin:tiny-sdd'", "did you mean 'builtin:tiny-sd'?"),
    ),
    "pickle-checkpoint": Case(
        VALID.replace("builtin:tiny-sd", "weights.ckpt"),
        "model.id",
        2,
        ("only .safetensors checkpoints are loaded", "pickles", "convert the checkpoint to .safetensors"),
        files={"weights.ckpt": "not really a checkpoint"},
    ),
    "model-key-typo": Case(
        VALID.replace("model: builtin:tiny-sd", "model:\n  id: builtin:tiny-sd\n  revison: main"),
        "model.revison",
        4,
        ("unknown key 'revison'", "did you mean 'revision'?"),
    ),
    "no-edits": Case(HEAD + "edits: []\n", "edits", 8, ("at least 1 item", "- method: NAME")),
    "duplicate-key": Case(
        VALID + "seed: 1\nseed: 2\n", "seed", 12, ("'seed' is given twice (lines 11 and 12)", "keep one")
    ),
    "token-rows-all-zero": Case(
        trce("rows: {eot: 0}"), "edits.0.params.rows", 14, ("at least one token row needs a weight > 0",)
    ),
    "bad-projection": Case(trce("projections: [k, q]"), "edits.0.params.projections.1", 14, ("got 'q'", "'k' or 'v'")),
    "set-bad-index": Case(
        VALID,
        "edits.5",
        None,
        ("--set edits.5.params.eta=1: no list item '5'", "use an index from 0 to 0"),
        args=("--set", "edits.5.params.eta=1"),
    ),
    "set-wrong-type": Case(
        VALID,
        "seed",
        None,
        ("got 'abc'", "value given on the command line: seed=abc", "write a whole number"),
        args=("--set", "seed=abc"),
    ),
    "set-without-value": Case(
        VALID, "seed", None, ("--set seed: an override must look like path.to.key=value",), args=("--set", "seed")
    ),
    "model-option-unknown-builtin": Case(
        VALID,
        "model.id",
        None,
        ("value given on the command line", "did you mean 'builtin:tiny-sd'?"),
        apply_args=("--model", "builtin:tiny-sdd"),
    ),
    "device-option-invalid": Case(
        VALID,
        "device",
        None,
        ("invalid device 'gpu'", "value given on the command line"),
        apply_args=("--device", "gpu"),
    ),
    "group-of-one": Case(
        group("      - method: test_q_steer\n"),
        "edits.0.edits",
        10,
        ("at least 2 items", "list a single edit directly under `edits:`"),
    ),
    "group-member-sets-training": Case(
        group("      - method: test_q_steer\n        training: {steps: 2}\n", "      - method: test_q_steer\n"),
        "edits.0.edits.0.training",
        12,
        ("cannot set its own training loop", "move it to edits.0.training"),
    ),
    "closed-form-method-in-group": Case(
        group("      - method: test_q_steer\n", "      - method: trce_eot\n        params: {concepts: cats}\n"),
        "edits.0.edits.1",
        12,
        (
            "'trce_eot' is closed_form",
            "training methods: advunlearn, ca, esd, race, receler, salun, stereo, test_q_steer, trce_steer",
        ),
    ),
    "recipe-file-missing": Case(None, "", None, ("recipe file not found", "check the path")),
    "recipe-file-misspelt": Case(
        None, "", None, ("recipe file not found", "recipes.yaml'?"), files={"recipes.yaml": VALID}
    ),
}


@pytest.fixture(autouse=True)
def _host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The built-in methods (entry points) plus the test methods; cwd in tmp_path; no bytecode files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    with isolated_host(FakeMethodsPlugin(), entry_points=True):
        yield


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _assert_refused(result: Result, case: Case) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    assert "Traceback" not in output
    where = f"{RECIPE}:{case.line}" if case.line is not None else RECIPE
    assert f"{where}: {case.path or '<root>'}: " in output, output
    for text in case.expect:
        assert text in output, f"{text!r} not in:\n{output}"


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_malformed_recipe_is_refused(case: Case, tmp_path: Path) -> None:
    recipe = tmp_path / RECIPE
    if isinstance(case.text, bytes):
        recipe.write_bytes(case.text)
    elif case.text is not None:
        recipe.write_text(case.text, encoding="utf-8")
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content, encoding="utf-8")
    before = _files(tmp_path)
    runner = CliRunner()
    commands = [] if case.apply_args else [["validate", str(recipe), *case.args]]
    commands.append(["apply", str(recipe), "--out", str(tmp_path / "run"), *case.args, *case.apply_args])
    for command in commands:
        _assert_refused(runner.invoke(app, command), case)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "run.partial").exists()
    assert _files(tmp_path) == before  # nothing else was written either


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_every_problem_is_reported_in_one_run(tmp_path: Path) -> None:
    """Three errors found by three different checks (schema, model id, plugin loading) come out together."""
    text = trce("etaa: 1").replace("builtin:tiny-sd", "builtin:tiny-sdd") + "plugins: [missing_plugin.py]\n"
    (tmp_path / RECIPE).write_text(text, encoding="utf-8")
    for command in (["validate", RECIPE], ["apply", RECIPE, "--out", "run"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "3 problem(s)" in result.output
        assert f"{RECIPE}:14: edits.0.params.etaa: unknown key 'etaa' (did you mean 'eta'?)" in result.output
        assert f"{RECIPE}:2: model.id: unknown built-in model" in result.output
        assert f"{RECIPE}:15: plugins.0: plugin path 'missing_plugin.py' does not exist" in result.output
    assert _files(tmp_path) == {RECIPE}


def test_numeric_string_is_accepted_as_a_number(tmp_path: Path) -> None:
    """YAML reads ``"1e-4"`` as a string; a number-typed parameter still takes it."""
    (tmp_path / RECIPE).write_text(trce('eta: "1e-4"'), encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", RECIPE, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["edits"][0]["params"]["eta"] == pytest.approx(1e-4)
