"""docs/write-a-plugin.md runs as written, so the guide cannot rot.

Convention (also stated at the top of the guide): a fenced code block whose info string carries
``title="PATH"``, e.g. ```` ```python title="anchor_steer.py" ````, is part of the file PATH.
Blocks with the same title are joined in document order, so the guide can build a file piece by
piece between paragraphs. Untitled blocks (shell commands, layouts) are illustrations.

The tests write every titled file into a temporary project, check that the files the example
package also has are identical to it (the guide walks through that package's real code), make
the guide's package "installed" the way pip would (a ``.dist-info`` generated from the guide's
own pyproject.toml), apply the guide's recipe on builtin:tiny-sd (which loads the single-file
plugin through its own ``plugins:`` line), and finally run the guide's test file.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_plugins import installed_distribution, projections
from typer.testing import CliRunner

import conceptedit
import conceptedit.cli.app as cli
from conceptedit.models.backbone import StableDiffusionAdapter
from conceptedit.models.builtin import build_tiny_sd
from conceptedit.plugins import PluginHost, get_host, new_host, set_host

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "write-a-plugin.md"
EXAMPLE = REPO / "plugins" / "example-plugin"
PACKAGE_FILES = ("pyproject.toml", "src/conceptedit_example/__init__.py", "tests/test_concept_swap.py")
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TITLE = re.compile(r'\btitle="(?P<title>[^"]+)"')


def guide_files() -> dict[str, str]:
    """The files the guide's titled blocks make up, by path."""
    pieces: dict[str, list[str]] = {}
    for block in FENCE.finditer(GUIDE.read_text(encoding="utf-8")):
        title = TITLE.search(block["info"])
        if title:
            pieces.setdefault(title["title"], []).append(block["body"].strip("\n"))
    return {path: "\n\n".join(parts) + "\n" for path, parts in pieces.items()}


def normalized(text: str) -> str:
    """Text with runs of blank lines made one (pieces are joined by one blank line)."""
    return re.sub(r"\n(?:[ \t]*\n)+", "\n\n", text.strip("\n")) + "\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The guide's files on disk, its package importable (and nothing of the real example's)."""
    root = tmp_path / "project"
    for path, text in guide_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(root / "src"))
    monkeypatch.delitem(sys.modules, "conceptedit_example", raising=False)
    return root


def guide_host(project: Path, site: Path) -> PluginHost:
    """A host with the core plugins and the guide's package, loaded through its entry point."""
    host = new_host(entry_points=False)
    host.load_entry_points(distributions=[installed_distribution((project / "pyproject.toml").read_text(), site)])
    return host


def test_the_guide_builds_every_file_it_talks_about() -> None:
    assert set(guide_files()) == {*PACKAGE_FILES, "anchor_steer.py", "recipe.yaml", "my_sources.py"}


def test_the_guide_concept_source_expands_as_the_guide_says(project: Path) -> None:
    """``my_sources.py`` as written, loaded from the recipe's ``plugins:``: the guide's YAML block
    gives the first 3 of 5 'N cats' prompts, and a misspelt option is a recipe error naming it."""
    host = new_host()  # the built-in methods, for the recipe's uce edit
    recipe = {
        "schema_version": 1,
        "model": "builtin:tiny-sd",
        "plugins": [str(project / "my_sources.py")],
        "concepts": {"cats": {"generate": {"source": "counting", "word": "cats", "n": 5}, "limit": 3}},
        "edits": [{"method": "uce", "params": {"concepts": "cats"}}],
    }
    loaded = conceptedit.load_recipe(recipe, host=host)
    assert [p.source for p in loaded.concepts["cats"]] == ["0 cats", "1 cats", "2 cats"]
    assert {p.target for p in loaded.concepts["cats"]} == {"0 things", "1 things", "2 things"}
    recipe["concepts"]["cats"]["generate"]["words"] = "dogs"  # type: ignore[index]
    with pytest.raises(conceptedit.RecipeError, match=r"concepts\.cats\.generate\.words"):
        conceptedit.load_recipe(recipe, host=host)


@pytest.mark.parametrize("path", PACKAGE_FILES)
def test_the_guide_shows_the_example_package_exactly(path: str) -> None:
    shown, real = guide_files()[path], (EXAMPLE / path).read_text(encoding="utf-8")
    assert normalized(shown) == normalized(real), f"docs/write-a-plugin.md and plugins/example-plugin/{path} differ"


def test_the_guide_recipe_runs_end_to_end(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = guide_host(project, tmp_path / "site")
    info = host.infos["concept_swap"]
    assert (info.distribution, info.version, info.provides, info.error) == (
        "conceptedit-example",
        "0.1.0",
        ["concept_swap"],
        None,
    )
    assert Path(str(sys.modules["conceptedit_example"].__file__)).is_relative_to(project)

    # what the guide's shell block promises: `plugins` lists it, `validate` accepts the recipe
    monkeypatch.setattr(cli, "out", Console(width=300))
    previous = get_host()
    set_host(host)
    try:
        listed = CliRunner().invoke(cli.app, ["plugins", "--json"])
        validated = CliRunner().invoke(cli.app, ["validate", str(project / "recipe.yaml")])
    finally:
        set_host(previous)
    assert listed.exit_code == 0, listed.output
    row = next(r for r in json.loads(listed.stdout)["plugins"] if r["name"] == "concept_swap")
    assert (row["distribution"], row["version"], row["provides"], row["error"]) == (
        "conceptedit-example",
        "0.1.0",
        ["concept_swap"],
        None,
    )
    assert validated.exit_code == 0, validated.output

    result = conceptedit.apply(project / "recipe.yaml", out=tmp_path / "run", quiet=True, host=host)
    steer = host.infos["anchor_steer"]
    assert (steer.source, Path(steer.location)) == ("path", project / "anchor_steer.py")
    assert steer.provides == ["anchor_steer"]

    # each edit changed what it declares, and nothing else changed
    assert [o.method for o in result.outcomes] == ["concept_swap", "anchor_steer"]
    assert set(result.outcomes[0].changed) == projections("k", "v")
    assert set(result.outcomes[1].changed) == projections("q")
    assert set(result.changed) == projections("k", "v", "q")
    assert set(load_file(str(tmp_path / "run" / "edit.safetensors"))) == projections("k", "v", "q")
    base = build_tiny_sd()
    for component in ("unet", "text_encoder", "vae"):
        before = dict(getattr(base, component).named_parameters())
        for name, param in getattr(result.pipeline, component).named_parameters():
            assert torch.equal(param, before[name]) == (f"{component}.{name}" not in result.changed), name
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "anchor_steer.jsonl").read_text().splitlines()]
    assert len(log) == 20 and all({"steer", "keep", "total"} <= set(row) for row in log)

    # the training moved the cat's noise prediction toward the dog's original one (fixed probe batch)
    swapped = build_tiny_sd()  # the model between the two edits: base plus concept_swap's tensors
    for name in result.outcomes[0].changed:
        key = name.removeprefix("unet.")
        swapped.unet.get_parameter(key).data.copy_(result.pipeline.unet.get_parameter(key))
    hidden = StableDiffusionAdapter(base).encode_prompts(["a photo of a cat", "a photo of a dog"]).hidden
    probe = torch.Generator().manual_seed(123)
    latents, t = torch.randn((16, 4, 8, 8), generator=probe), torch.randint(0, 1000, (16,), generator=probe)

    def predict(pipeline: object, row: int) -> torch.Tensor:
        with torch.no_grad():
            return StableDiffusionAdapter(pipeline).predict_noise(latents, t, hidden[row : row + 1].expand(16, -1, -1))

    goal = predict(base, 1)
    gap_before = (predict(swapped, 0) - goal).norm()
    gap_after = (predict(result.pipeline, 0) - goal).norm()
    assert gap_after < 0.97 * gap_before, f"training closed only {1 - gap_after / gap_before:.1%} of the gap"


def test_the_guide_test_file_passes(project: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("guide_test_concept_swap", project / "tests" / "test_concept_swap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [(name, fn) for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)]
    assert len(tests) == 2
    for name, fn in tests:
        kwargs = {"tmp_path": tmp_path / name} if "tmp_path" in inspect.signature(fn).parameters else {}
        fn(**kwargs)
