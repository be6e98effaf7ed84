"""The hook reference stays true: every pluggy hook is documented with its exact arguments,
and lifecycle hooks follow recipe order although pluggy calls implementations last-first."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from fake_methods import FakeMethodsPlugin, Recorder

import conceptedit
from conceptedit import hookimpl
from conceptedit.api import hooks as hookspecs
from conceptedit.plugins import PluginHost
from conceptedit.testing import isolated_host, tiny_recipe

HOOKS_DOC = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
HEADING = re.compile(r"^### `(\w+)\(([^)]*)\)`\s*$", re.MULTILINE)


def _documented() -> dict[str, tuple[str, ...]]:
    """``### `name(a, b)` `` headings of docs/hooks.md: hook name -> argument names."""
    found: dict[str, tuple[str, ...]] = {}
    for name, args in HEADING.findall(HOOKS_DOC.read_text(encoding="utf-8")):
        assert name not in found, f"docs/hooks.md documents {name} twice"
        found[name] = tuple(a.strip() for a in args.split(",") if a.strip())
    return found


def _specs() -> dict[str, tuple[str, ...]]:
    """Every hook of a fresh host: hook name -> the spec's argument names."""
    specs: dict[str, tuple[str, ...]] = {}
    for name, caller in vars(PluginHost().pm.hook).items():
        assert caller.spec is not None, f"hook {name} has implementations but no spec"
        specs[name] = tuple(caller.spec.argnames)
    return specs


def test_there_are_hooks_to_check() -> None:
    specs = _specs()
    assert {"conceptedit_register_methods", "conceptedit_before_edit", "conceptedit_after_run"} <= set(specs)


@pytest.mark.parametrize("name", sorted(_specs()))
def test_every_hook_has_a_heading_with_its_exact_arguments(name: str) -> None:
    documented = _documented()
    args = _specs()[name]
    assert name in documented, f"docs/hooks.md needs a heading: ### `{name}({', '.join(args)})`"
    assert documented[name] == args, f"docs/hooks.md lists {name}{documented[name]}, the spec takes {args}"


def test_docs_describe_no_hook_that_does_not_exist() -> None:
    extra = set(_documented()) - set(_specs())
    assert not extra, f"docs/hooks.md documents hooks that conceptedit/api/hooks.py does not declare: {sorted(extra)}"


def test_every_hookspec_has_a_docstring() -> None:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    functions = {n: f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, marker)}
    assert set(functions) == set(_specs())
    for name, function in functions.items():
        doc = inspect.getdoc(function) or ""
        assert doc.strip(), f"hookspec {name} has no docstring"
        for arg in inspect.signature(function).parameters:
            assert re.search(rf"^\s*{arg}:", doc, re.MULTILINE), f"{name}'s docstring does not describe {arg!r}"


class _Observer:
    """Lifecycle plugin writing (who, event, index, method) into a log shared by every observer."""

    def __init__(self, who: str, log: list[tuple[str, str, int, str]]) -> None:
        self.who, self.log = who, log  # no __name__: both register under the class name, made unique

    @hookimpl
    def conceptedit_before_edit(self, edit: Any, index: int) -> None:
        self.log.append((self.who, "before_edit", index, edit.method))

    @hookimpl
    def conceptedit_after_edit(self, edit: Any, index: int, outcome: Any) -> None:
        self.log.append((self.who, "after_edit", index, outcome.method))


def test_lifecycle_hooks_follow_recipe_order_not_pluggy_order(tmp_path: Path) -> None:
    log: list[tuple[str, str, int, str]] = []
    # the training edit comes first, so recipe order differs from both registration and name order
    recipe = tiny_recipe(
        {"method": "test_q_steer", "training": {"steps": 2}},
        {"method": "test_eot_map", "params": {"concepts": "cats"}},
        concepts={"cats": {"pairs": [["a cat", "a dog"]]}},
    )
    first, second = Recorder(), Recorder()
    with isolated_host(FakeMethodsPlugin(), _Observer("A", log), _Observer("B", log), first, second) as host:
        result = conceptedit.apply(recipe, out=tmp_path / "run", quiet=True)
    assert {"_Observer", "_Observer-2", "Recorder", "Recorder-2"} <= set(host.infos)

    expected = [
        ("before_edit", 0, "test_q_steer"),
        ("after_edit", 0, "test_q_steer"),
        ("before_edit", 1, "test_eot_map"),
        ("after_edit", 1, "test_eot_map"),
    ]
    for who in "AB":
        assert [entry[1:] for entry in log if entry[0] == who] == expected, who
    # every observer hears about edit 0 before anyone hears about edit 1
    assert [entry[2] for entry in log] == [0, 0, 0, 0, 1, 1, 1, 1]
    # pluggy itself is last-registered-first: B (registered second) is called before A
    assert [entry[0] for entry in log[:2]] == ["B", "A"]
    # two instances of one recorder class both registered, and both saw the recipe's order
    assert first.calls == second.calls
    assert [c for c in first.calls if c[0] != "train_step"] == [
        ("before_edit", 0),
        ("after_edit", (0, len(result.outcomes[0].changed))),
        ("before_edit", 1),
        ("after_edit", (1, len(result.outcomes[1].changed))),
        ("after_run", str(tmp_path / "run")),
    ]
    assert [c[1][0] for c in first.calls if c[0] == "train_step"] == [1, 2]
    assert first.calls.index(("before_edit", 1)) > max(i for i, c in enumerate(first.calls) if c[0] == "train_step")
    # and the edits themselves ran in recipe order
    assert [o.method for o in result.outcomes] == ["test_q_steer", "test_eot_map"]
    assert all(name.endswith("to_q.weight") for name in result.outcomes[0].changed)
    assert all(name.endswith("to_v.weight") for name in result.outcomes[1].changed)
