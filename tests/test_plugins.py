"""Plugin discovery as users meet it: installed distributions (working, broken, filtered by the
environment), plugin files named by a recipe or ``--plugins-dir``, invalid hook implementations,
method-name conflicts, the built-in methods' own entry points, and the example plugin package.

Installed distributions are simulated without pip: either an object with the three attributes
``PluginHost.load_entry_points`` reads, or a real ``importlib.metadata.PathDistribution`` over a
``.dist-info`` folder generated in ``tmp_path``. Entry points are real ``EntryPoint`` objects
pointing at real modules, so loading goes through ``EntryPoint.load`` exactly as installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fake_methods import FakeMethodsPlugin
from rich.console import Console
from typer.testing import CliRunner

import conceptedit
import conceptedit.cli.app as cli
from conceptedit.errors import PluginError, RecipeError
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.plugins import CORE_PLUGINS, ENTRY_POINT_GROUP, PluginHost, get_host, new_host, set_host
from conceptedit.testing import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "example-plugin"

#: A third-party plugin module: one closed-form method (a [EoT] key edit with a ridge).
METHOD_MODULE = '''
"""Test plugin providing METHOD_NAME."""
from pydantic import Field

from conceptedit import EditMethod, KVEdit, MethodParams, hookimpl


class SwapParams(MethodParams):
    concept: str = Field("a cat", description="Prompt whose keys move.")
    target: str = Field("a dog", description="Prompt whose keys they move to.")
    ridge: float = Field(0.1, gt=0, description="Stay near the old weights.")


class Swap(EditMethod):
    name = "METHOD_NAME"
    summary = "test: move one prompt's [EoT] keys onto another's"
    kind = "closed_form"
    Params = SwapParams

    def attention_edits(self, ctx):
        p = self.params
        src, dst = self.encode_prompts(ctx, [p.concept]), self.encode_prompts(ctx, [p.target])
        yield KVEdit(keys=src.row("eot"), targets=dst.row("eot"), ridge=p.ridge, projections=("k",))


@hookimpl
def conceptedit_register_methods(register):
    register(Swap)
'''

BROKEN_MODULE = '''
"""A plugin whose dependency is not installed."""
import frobnicate_not_installed  # noqa: F401
'''


def method_module(name: str) -> str:
    return METHOD_MODULE.replace("METHOD_NAME", name)


@dataclass
class FakeDistribution:
    """The part of ``importlib.metadata.Distribution`` that plugin discovery reads."""

    name: str
    entry_points: list[importlib.metadata.EntryPoint]
    version: str = "1.0.0"
    metadata: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.metadata = {"Name": self.name}


def entry_point(name: str, module: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name, module, group=ENTRY_POINT_GROUP)


@pytest.fixture(autouse=True)
def _no_env_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CONCEPTEDIT_LOAD_PLUGINS", "CONCEPTEDIT_DISABLE_PLUGINS", "CONCEPTEDIT_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Write an importable module into ``tmp_path/site`` (on ``sys.path`` for this test only)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(name: str, source: str) -> str:
        (site / f"{name}.py").write_text(source, encoding="utf-8")
        monkeypatch.delitem(sys.modules, name, raising=False)  # forgotten again after the test
        return name

    return make


@pytest.fixture
def cli_host() -> Iterator[Callable[[PluginHost], None]]:
    """Install a host as the process-wide one for CLI calls; the previous one comes back after."""
    previous = get_host()
    yield set_host
    set_host(previous)


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Invoke ``conceptedit`` in-process with wide consoles (rich would wrap at 80 columns)."""
    monkeypatch.setattr(cli, "out", Console(width=400))
    monkeypatch.setattr(cli, "err", Console(width=400, stderr=True))

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli.app, list(args))

    return invoke


@cache
def attn2_layers() -> tuple[str, ...]:
    return tuple(f"unet.{n}" for n, _ in build_tiny_sd().unet.named_modules() if n.endswith("attn2"))


def projections(*which: str) -> set[str]:
    return {f"{layer}.to_{w}.weight" for layer in attn2_layers() for w in which}


def entry_point_infos(host: PluginHost) -> dict[str, Any]:
    return {name: info for name, info in host.infos.items() if info.source == "entry point"}


def write_recipe(path: Path, *edits: dict[str, Any], **fields: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_recipe(*edits, **fields), sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- entry points


def test_an_installed_distribution_provides_a_method_that_runs_end_to_end(
    module_factory: Callable[[str, str], str], tmp_path: Path
) -> None:
    module = module_factory("ce_plugin_ridge", method_module("ridge_swap"))
    dist = FakeDistribution("conceptedit-ridge", [entry_point("ridge", module)], version="2.3.4")
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[dist])

    info = host.infos["ridge"]
    assert (info.source, info.location, info.distribution, info.version, info.error) == (
        "entry point",
        module,
        "conceptedit-ridge",
        "2.3.4",
        None,
    )
    assert info.hooks == ["conceptedit_register_methods"] and info.provides == ["ridge_swap"]
    assert host.registry.method_origin["ridge_swap"] == "ridge"

    result = conceptedit.apply(
        tiny_recipe({"method": "ridge_swap", "params": {"ridge": 0.05}}), out=tmp_path / "run", quiet=True, host=host
    )
    assert set(result.changed) == projections("k")
    assert result.outcomes[0].method == "ridge_swap"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "conceptedit-ridge" in json.dumps(manifest)  # the plugin's distribution is on record


def test_a_broken_distribution_is_recorded_listed_and_named_when_needed(
    module_factory: Callable[[str, str], str],
    cli_host: Callable[[PluginHost], None],
    run_cli: Callable[..., Any],
    tmp_path: Path,
) -> None:
    good = FakeDistribution("conceptedit-ridge", [entry_point("ridge", module_factory("ce_ok", method_module("ok")))])
    broken = FakeDistribution(
        "conceptedit-frob", [entry_point("frob", module_factory("ce_frob", BROKEN_MODULE))], version="0.9"
    )
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[broken, good])  # the failure must not stop later plugins

    info = host.infos["frob"]
    assert info.error is not None
    assert "ModuleNotFoundError" in info.error and "frobnicate_not_installed" in info.error
    assert "ce_frob.py:3" in info.error  # where it failed
    assert (info.distribution, info.version, info.provides) == ("conceptedit-frob", "0.9", [])
    assert host.failed() == [info]
    assert "ok" in host.registry.methods

    cli_host(host)
    listed = run_cli("plugins", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)["plugins"]}
    assert rows["frob"]["error"] == info.error and rows["ridge"]["error"] is None
    table = run_cli("plugins")
    assert table.exit_code == 0, table.output
    frob_line = next(line for line in table.stdout.splitlines() if "frob" in line and "conceptedit-frob" in line)
    assert "failed: ModuleNotFoundError" in frob_line
    ridge_line = next(line for line in table.stdout.splitlines() if "ridge" in line)
    assert "loaded" in ridge_line and "ok" in ridge_line

    # an unrelated recipe still applies ...
    ok = write_recipe(tmp_path / "ok.yaml", {"method": "ok"})
    applied = run_cli("apply", str(ok), "--out", str(tmp_path / "run"), "--quiet")
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "run" / "edit.safetensors").is_file()


def test_a_recipe_needing_a_failed_plugins_method_names_that_plugin(
    module_factory: Callable[[str, str], str],
    cli_host: Callable[[PluginHost], None],
    run_cli: Callable[..., Any],
    tmp_path: Path,
) -> None:
    good = FakeDistribution("conceptedit-ridge", [entry_point("ridge", module_factory("ce_ok", method_module("ok")))])
    broken = FakeDistribution("conceptedit-frob", [entry_point("frob", module_factory("ce_frob", BROKEN_MODULE))])
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[good, broken])
    with pytest.raises(PluginError, match=r"no installed plugin provides edit method 'frob_erase'.*frob \(Module"):
        host.method("frob_erase")

    cli_host(host)
    needs = write_recipe(tmp_path / "needs.yaml", {"method": "frob_erase"})
    failed = run_cli("apply", str(needs), "--out", str(tmp_path / "run"), "--quiet")
    assert failed.exit_code == 2, failed.output
    assert "Traceback" not in failed.output and not (tmp_path / "run").exists()
    assert "unknown edit method 'frob_erase'" in failed.stderr
    assert "frob (ModuleNotFoundError" in failed.stderr  # the plugin that may have provided it, and why


# --------------------------------------------------------------------------- environment filters


@pytest.mark.parametrize(
    ("load", "disable", "expected"),
    [
        (None, None, {"alpha", "beta", "frob"}),
        ("alpha", None, {"alpha"}),
        ("alpha, beta", None, {"alpha", "beta"}),
        ("conceptedit-beta", None, {"beta"}),  # a distribution name selects all its entry points
        ("", None, set()),  # empty: load none
        (None, "frob", {"alpha", "beta"}),
        (None, "conceptedit-alpha,frob", {"beta"}),
        ("alpha,beta", "beta", {"alpha"}),  # disabling wins over naming
    ],
)
def test_environment_filters_choose_what_loads(
    module_factory: Callable[[str, str], str],
    monkeypatch: pytest.MonkeyPatch,
    load: str | None,
    disable: str | None,
    expected: set[str],
) -> None:
    dists = [
        FakeDistribution("conceptedit-alpha", [entry_point("alpha", module_factory("ce_alpha", method_module("a")))]),
        FakeDistribution("conceptedit-beta", [entry_point("beta", module_factory("ce_beta", method_module("b")))]),
        FakeDistribution("conceptedit-frob", [entry_point("frob", module_factory("ce_frob", BROKEN_MODULE))]),
    ]
    if load is not None:
        monkeypatch.setenv("CONCEPTEDIT_LOAD_PLUGINS", load)
    if disable is not None:
        monkeypatch.setenv("CONCEPTEDIT_DISABLE_PLUGINS", disable)
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=dists)
    assert set(entry_point_infos(host)) == expected
    assert set(host.registry.methods) == {{"alpha": "a", "beta": "b"}[name] for name in expected - {"frob"}}
    for name in ("alpha", "beta"):  # a filtered-out plugin is never even imported
        assert (f"ce_{name}" in sys.modules) == (name in expected)


def test_environment_filters_apply_to_the_builtin_methods_too(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "trce_eot" in new_host().registry.methods
    monkeypatch.setenv("CONCEPTEDIT_DISABLE_PLUGINS", "trce_eot")
    assert "trce_eot" not in new_host().registry.methods
    monkeypatch.setenv("CONCEPTEDIT_LOAD_PLUGINS", "")
    monkeypatch.delenv("CONCEPTEDIT_DISABLE_PLUGINS")
    host = new_host()
    assert entry_point_infos(host) == {} and host.registry.methods == {}
    assert {"delta", "diffusers"} <= set(host.registry.exporters)  # core plugins are not entry points


# --------------------------------------------------------------------------- plugin files


def test_a_recipe_loads_the_plugin_file_it_names_relative_to_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_edit.py").write_text(method_module("my_edit"), encoding="utf-8")
    recipe = write_recipe(project / "recipe.yaml", {"method": "my_edit"}, plugins=["./my_edit.py"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the recipe, not to the working directory

    host = new_host(entry_points=False)
    result = conceptedit.apply(recipe, out=tmp_path / "run", quiet=True, host=host)
    assert set(result.changed) == projections("k")
    info = host.infos["my_edit"]
    assert (info.source, Path(info.location), info.provides) == ("path", project / "my_edit.py", ["my_edit"])

    # applying again with the same host neither reloads nor duplicates the plugin
    registered = host.pm.get_plugin("my_edit")
    conceptedit.apply(recipe, out=tmp_path / "run2", quiet=True, host=host)
    assert host.pm.get_plugin("my_edit") is registered
    assert [i.name for i in host.infos.values() if i.source == "path"] == ["my_edit"]


def test_a_missing_plugin_file_is_a_recipe_error_at_its_line(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", {"method": "test_q_steer"}, plugins=["./nope.py"])
    host = new_host(entry_points=False)
    host.register(FakeMethodsPlugin())
    with pytest.raises(RecipeError) as caught:
        conceptedit.load_recipe(recipe, host=host)
    issue = next(i for i in caught.value.issues if i.path == "plugins.0")
    line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if "nope.py" in text)
    assert "does not exist" in issue.message and "nope.py" in issue.message and issue.line == line


def test_plugin_files_with_the_same_name_in_different_folders_both_load(tmp_path: Path) -> None:
    host = new_host(entry_points=False)
    for folder, method in (("one", "first_swap"), ("two", "second_swap")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "my_edit.py").write_text(method_module(method), encoding="utf-8")
        host.load_path(tmp_path / folder / "my_edit.py")
    assert {"first_swap", "second_swap"} <= set(host.registry.methods)
    locations = sorted(Path(i.location).parent.name for i in host.infos.values() if i.source == "path")
    assert locations == ["one", "two"]
    assert not host.failed() and not host.registry.conflicts


def test_plugins_dir_on_the_command_line_loads_every_py_file(
    tmp_path: Path, cli_host: Callable[[PluginHost], None], run_cli: Callable[..., Any]
) -> None:
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "alpha.py").write_text(method_module("alpha_swap"), encoding="utf-8")
    (folder / "beta.py").write_text(method_module("beta_swap"), encoding="utf-8")
    (folder / "notes.txt").write_text("not a plugin", encoding="utf-8")
    cli_host(new_host(entry_points=False))

    listed = run_cli("--plugins-dir", str(folder), "methods", "--json")
    assert listed.exit_code == 0, listed.output
    assert {m["name"]: m["plugin"] for m in json.loads(listed.stdout)} == {"alpha_swap": "alpha", "beta_swap": "beta"}

    recipe = write_recipe(tmp_path / "recipe.yaml", {"method": "beta_swap"})
    applied = run_cli("--plugins-dir", str(folder), "apply", str(recipe), "--out", str(tmp_path / "run"), "--json")
    assert applied.exit_code == 0, applied.output
    assert set(json.loads(applied.stdout)["changed"]) == projections("k")


@pytest.mark.parametrize(
    ("hook", "complaint"),
    [
        ("def conceptedit_register_methods(registr):\n    registr(Swap)", "{'registr'}"),  # misspelt argument
        ("def conceptedit_register_method(register):\n    register(Swap)", "unknown hook"),  # misspelt hook
    ],
)
def test_a_plugin_file_with_an_invalid_hookimpl_is_reported_not_fatal(
    tmp_path: Path,
    cli_host: Callable[[PluginHost], None],
    run_cli: Callable[..., Any],
    hook: str,
    complaint: str,
) -> None:
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    typo = method_module("typo_swap").replace("def conceptedit_register_methods(register):\n    register(Swap)", hook)
    assert typo != method_module("typo_swap")
    (folder / "typo.py").write_text(typo, encoding="utf-8")
    (folder / "fine.py").write_text(method_module("fine_swap"), encoding="utf-8")

    host = new_host(entry_points=False)
    host.load_path(folder)  # no exception
    info = host.infos["typo"]
    assert info.error is not None and info.error.startswith("invalid plugin:") and complaint in info.error
    assert info.hooks == [] and not host.pm.has_plugin("typo")
    assert set(host.registry.methods) == {"fine_swap"}
    host.pm.check_pending()  # nothing of the invalid plugin is left behind

    cli_host(new_host(entry_points=False))
    table = run_cli("--plugins-dir", str(folder), "plugins")
    assert table.exit_code == 0, table.output
    typo_line = next(line for line in table.stdout.splitlines() if line.lstrip("│ ").startswith("typo"))
    assert "failed: invalid plugin" in typo_line
    listed = run_cli("--plugins-dir", str(folder), "methods", "--json")
    assert listed.exit_code == 0, listed.output
    assert [m["name"] for m in json.loads(listed.stdout)] == ["fine_swap"]


# --------------------------------------------------------------------------- conflicts and failures


def test_two_plugins_registering_one_method_name_are_listed_as_a_conflict(
    module_factory: Callable[[str, str], str],
    cli_host: Callable[[PluginHost], None],
    run_cli: Callable[..., Any],
) -> None:
    first = FakeDistribution("conceptedit-one", [entry_point("one", module_factory("ce_one", method_module("swap")))])
    second = FakeDistribution("conceptedit-two", [entry_point("two", module_factory("ce_two", method_module("swap")))])
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[first, second])

    assert host.registry.conflicts == ["method 'swap' is registered by both 'one' and 'two'; using 'two'"]
    assert host.registry.method_origin["swap"] == "two"  # the later registration wins
    assert host.method("swap").__module__ == "ce_two"
    assert (host.infos["one"].provides, host.infos["two"].provides) == (["swap"], ["swap"])

    cli_host(host)
    listed = run_cli("plugins")
    assert listed.exit_code == 0, listed.output
    assert "warning: method 'swap' is registered by both 'one' and 'two'" in listed.stderr
    as_json = run_cli("plugins", "--json")
    assert json.loads(as_json.stdout)["conflicts"] == host.registry.conflicts


def test_two_distributions_with_the_same_entry_point_name_both_load(
    module_factory: Callable[[str, str], str],
) -> None:
    dists = [
        FakeDistribution(f"conceptedit-{x}", [entry_point("plugin", module_factory(f"ce_{x}", method_module(x)))])
        for x in ("left", "right")
    ]
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=dists)
    host.load_entry_points(distributions=dists)  # found again (a second sys.path entry): loaded once
    infos = entry_point_infos(host)
    assert {name: info.distribution for name, info in infos.items()} == {
        "plugin": "conceptedit-left",
        "plugin-2": "conceptedit-right",
    }
    assert {"left", "right"} <= set(host.registry.methods) and not host.registry.conflicts


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ("register(object)", "which is not an EditMethod subclass"),
        ("raise RuntimeError('registry offline')", "RuntimeError: registry offline"),
    ],
)
def test_a_plugin_whose_registration_fails_is_recorded_and_switched_off(
    module_factory: Callable[[str, str], str], body: str, complaint: str
) -> None:
    source = f"""
from conceptedit import hookimpl

calls = []


@hookimpl
def conceptedit_register_methods(register):
    {body}


@hookimpl
def conceptedit_before_edit(index):
    calls.append(index)
"""
    bad = FakeDistribution("conceptedit-bad", [entry_point("bad", module_factory("ce_bad", source))])
    fine = FakeDistribution("conceptedit-fine", [entry_point("fine", module_factory("ce_fine", method_module("fine")))])
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[bad, fine])

    assert set(host.registry.methods) == {"fine"}  # no exception, the other plugin works
    info = host.infos["bad"]
    assert info.error is not None and "conceptedit_register_methods raised" in info.error and complaint in info.error
    assert info.error.endswith("(ce_bad.py:9)")  # the plugin's own line, where it went wrong
    assert host.failed() == [info] and info.hooks == []
    assert not host.pm.has_plugin("bad")  # its lifecycle hooks will not run either
    assert "bad (conceptedit_register_methods raised" in host.explain_missing_method("anything")


# --------------------------------------------------------------------------- built-in methods


def test_builtin_trce_eot_is_registered_through_the_conceptedit_distribution() -> None:
    dist = importlib.metadata.distribution("conceptedit")
    ours = {ep.name: ep.value for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}
    assert ours["trce_eot"] == "conceptedit_builtin.trce_eot"
    assert not any(name.startswith("conceptedit_builtin") for name in CORE_PLUGINS)  # not hard-wired

    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[dist])
    info = host.infos["trce_eot"]
    assert (info.source, info.distribution, info.version, info.error) == (
        "entry point",
        "conceptedit",
        conceptedit.__version__,
        None,
    )
    assert info.provides == ["trce_eot"] and host.registry.method_origin["trce_eot"] == "trce_eot"
    assert "trce_eot" not in new_host(entry_points=False).registry.methods


# --------------------------------------------------------------------------- the example plugin package


def installed_distribution(pyproject: str, site: Path) -> importlib.metadata.PathDistribution:
    """What ``pip install`` would leave in ``site`` for this pyproject.toml: a ``.dist-info`` folder.

    Only the metadata plugin discovery reads (name, version, entry points); put the package's
    sources on ``sys.path`` yourself.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
        import tomli as tomllib
    project = tomllib.loads(pyproject)["project"]
    folder = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    folder.mkdir(parents=True)
    metadata = f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    (folder / "METADATA").write_text(metadata, encoding="utf-8")
    groups = project.get("entry-points", {})
    sections = ["".join([f"[{group}]\n", *(f"{k} = {v}\n" for k, v in eps.items())]) for group, eps in groups.items()]
    (folder / "entry_points.txt").write_text("\n".join(sections), encoding="utf-8")
    return importlib.metadata.PathDistribution(folder)


def eot_rows(prompts: list[str]) -> torch.Tensor:
    return StableDiffusionAdapter(build_tiny_sd()).encode_prompts(prompts).row("eot")


def test_example_plugin_installed_swaps_a_concept_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.delitem(sys.modules, "conceptedit_example", raising=False)
    dist = installed_distribution((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"), tmp_path / "site")
    assert [(ep.name, ep.value) for ep in dist.entry_points] == [("concept_swap", "conceptedit_example")]
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[dist])
    info = host.infos["concept_swap"]
    assert (info.distribution, info.version, info.error, info.provides) == (
        "conceptedit-example",
        "0.1.0",
        None,
        ["concept_swap"],
    )
    module = sys.modules[host.method("concept_swap").__module__]
    assert Path(str(module.__file__)).is_relative_to(EXAMPLE)  # the package's own code, through its entry point

    params = {"concept": "a cat", "target": "a dog", "preserve": ["a house", "a tree"]}
    result = conceptedit.apply(
        tiny_recipe({"method": "concept_swap", "params": params}), out=tmp_path / "run", quiet=True, host=host
    )
    assert set(result.changed) == projections("k", "v")
    base = build_tiny_sd()
    for component in ("unet", "text_encoder", "vae"):
        before = dict(getattr(base, component).named_parameters())
        for name, param in getattr(result.pipeline, component).named_parameters():
            assert torch.equal(param, before[name]) == (f"{component}.{name}" not in result.changed), name

    cat, dog, house, tree, car = eot_rows(["a photo of a cat", "a photo of a dog", "a house", "a tree", "a car"])
    for name in sorted(result.changed):
        key = name.removeprefix("unet.")
        old, new = base.unet.get_parameter(key).detach(), result.pipeline.unet.get_parameter(key).detach()
        gap_after = (new @ cat - old @ dog).norm() / (old @ cat - old @ dog).norm()
        assert gap_after < 0.25, f"{name}: the cat's projection closed only {1 - gap_after:.0%} of the gap to the dog's"
        for kept in (house, tree):
            assert (new @ kept - old @ kept).norm() / (old @ kept).norm() < 0.01, name
        # the preserve prompts are held much more tightly than an unrelated prompt nobody protected
        drift_car = (new @ car - old @ car).norm() / (old @ car).norm()
        assert (new @ house - old @ house).norm() / (old @ house).norm() < drift_car / 5, name


def test_example_plugin_params_forbid_unknown_keys_and_check_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.delitem(sys.modules, "conceptedit_example", raising=False)
    host = new_host(entry_points=False)
    host.register(importlib.import_module("conceptedit_example"))
    bad = tiny_recipe(
        {"method": "concept_swap", "params": {"concept": "a cat", "target": "a dog", "templtes": ["{}"]}},
        {"method": "concept_swap", "params": {"concept": "a cat", "target": "a dog", "templates": ["a photo"]}},
    )
    with pytest.raises(RecipeError) as caught:
        conceptedit.load_recipe(bad, host=host)
    issues = {issue.path: issue for issue in caught.value.issues}
    assert issues["edits.0.params.templtes"].suggestion == "did you mean 'templates'?"
    assert "has no {} where the phrase goes" in issues["edits.1.params.templates"].message


def test_a_host_without_methods_reports_it_instead_of_crashing() -> None:
    from conceptedit.recipe.loader import load_recipe

    host = new_host(entry_points=False)  # core plugins only: no edit method at all
    with pytest.raises(RecipeError, match="no edit methods are installed") as caught:
        load_recipe(tiny_recipe({"method": "trce_eot", "params": {}}), host=host)
    assert [issue.path for issue in caught.value.issues] == ["edits.0"]


def test_built_in_plugins_use_only_the_public_plugin_api() -> None:
    """Built-ins import what a third party can: conceptedit, its toolkit, suites, evaluators and
    the shapes world; never the engine's internals."""
    import ast

    public = {"conceptedit", "conceptedit.toolkit", "conceptedit.api.suite", "conceptedit.api.evaluator"}
    folder = Path(__file__).resolve().parents[1] / "plugins" / "conceptedit_builtin"
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("conceptedit."):
                assert node.module in public or node.module.startswith("conceptedit.shapes"), (path.name, node.module)
