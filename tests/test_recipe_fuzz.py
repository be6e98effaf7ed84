"""Structure-aware fuzzing of the shipped recipes: every mutant loads or raises RecipeError, nothing else.

Each mutant starts from one recipe in ``recipes/`` and changes it the way a hurried user or a
broken generator would: a value replaced by junk (wrong types, NaN/inf, huge numbers, unicode,
control characters, absolute and ``..`` paths, over-long or NUL-holding paths, empty strings),
a key deleted or renamed, a value wrapped in a list or a map, a line given twice, a YAML tag
put in front of a value, deep nesting, or the text cut short. The mutants are loaded in this
process (no model is loaded, nothing runs), so thousands take seconds.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import traceback
from pathlib import Path
from typing import Any

import pytest
import yaml

from conceptedit.errors import RecipeError
from conceptedit.plugins import new_host
from conceptedit.recipe.loader import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MUTANTS_PER_RECIPE = 300
# libyaml's C reader and writer, where PyYAML has them: the mutants are made 10x faster
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
FAST_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
MIN_MUTANTS = 2000

JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**64 + 1,
    -(2**70),
    10**400,
    0.5,
    -1e-30,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    " ",
    "\t",
    "nan",
    "yes",
    "{}",
    "[]",
    "{x}",
    "{} {}",
    "红色的圆",
    "é\u0301\u200b\ufeff",
    "\U0001f534 emoji",
    "\x00",
    "a\x00b",
    "\x07\x1b[31m\x7f",
    "line\nbreak",
    "\r\n",
    "a" * 5000,
    "x" * 300 + "/y",
    "/".join(["d"] * 3000),
    "/",
    "/etc/passwd",
    "/nonexistent/abs/path.yaml",
    "../" * 40 + "etc",
    "../recipes",
    "..",
    ".",
    "~",
    "~nobody/x",
    "C:\\Windows\\system32",
    "builtin:",
    "builtin:nope",
    "builtin:tiny-sd",
    "owner/name",
    "file.ckpt",
    "model.safetensors",
    "cpu",
    "cuda:99",
    "trce_eot",
    "group",
    [],
    [None],
    [1, [2, [3]]],
    ["a", "b"],
    [["a", "b"]],
    {},
    {"x": 1},
    {"method": "trce_eot"},
    {"group": "g", "edits": []},
    {"id": None},
]
TAGS = ["!!binary", "!!set", "!!timestamp", "!!python/object:os.system", "!!python/name:os.system", "!custom", "!!str"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``node`` (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(_paths(value, (*prefix, i)))
    return out


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    node = data
    for part in path[:-1]:
        node = node[part]
    return node


DEEP = "__deeply_nested__"


def _deep(depth: int, rng: random.Random) -> str:
    """Flow-style YAML nested ``depth`` levels, lists and maps mixed (written as text: dumping recurses)."""
    kinds = [rng.random() < 0.5 for _ in range(depth)]
    return "".join("[" if k else "{k: " for k in kinds) + "leaf" + "".join("]" if k else "}" for k in reversed(kinds))


def _structural(data: dict[str, Any], rng: random.Random) -> None:
    """One mutation of the parsed recipe, in place."""
    paths = _paths(data)
    path = rng.choice(paths)
    parent, last = _parent(data, path), path[-1]
    op = rng.randrange(7)
    if op <= 2:
        parent[last] = rng.choice(JUNK)
    elif op == 3 and isinstance(parent, dict):
        del parent[last]
    elif op == 3:
        parent.pop(last)
    elif op == 4 and isinstance(parent, dict):
        renamed = rng.choice([str(last)[:-1], str(last) + "s", str(last).upper(), " " + str(last), "", "x" * 300])
        parent[renamed] = parent.pop(last)
    elif op == 4:
        parent.insert(last, rng.choice(JUNK))
    elif op == 5:
        parent[last] = [parent[last]] if rng.random() < 0.5 else {"value": parent[last]}
    else:
        parent[last] = DEEP


def _textual(text: str, rng: random.Random) -> str:
    """One mutation of the recipe's text: duplicate a line, tag a value, nest brackets, cut it short."""
    lines = text.splitlines(keepends=True)
    op = rng.randrange(5)
    if op == 0:
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif op == 1:
        candidates = [i for i, line in enumerate(lines) if ": " in line and not line.lstrip().startswith("#")]
        if candidates:
            i = rng.choice(candidates)
            key, _, value = lines[i].partition(": ")
            lines[i] = f"{key}: {rng.choice(TAGS)} {value}"
    elif op == 2:
        depth = rng.choice([100, 300, 1000, 5000])
        opener, closer = rng.choice([("[", "]"), ("{a: ", "}")])
        lines.append("nested: " + opener * depth + "1" + closer * depth + "\n")
    elif op == 3:
        cut = rng.randrange(len(text))
        return text[:cut]
    else:
        i = rng.randrange(len(lines))
        lines[i] = lines[i].replace(" ", rng.choice(["\t", "  ", "\x00", "\u00a0", ""]), 1)
    return "".join(lines)


def _mutants(source: Path, count: int, rng: random.Random) -> list[str]:
    text = source.read_text(encoding="utf-8")
    original = yaml.load(text, Loader=FAST_LOADER)
    out = []
    for _ in range(count):
        if rng.random() < 0.7:
            data = copy.deepcopy(original)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                _structural(data, rng)
            unicode = rng.random() < 0.5
            dumped = yaml.dump(data, Dumper=FAST_DUMPER, allow_unicode=unicode, sort_keys=False, width=10**6)
            out.append(dumped.replace(DEEP, _deep(rng.choice([50, 200, 400, 1500]), rng)))
        else:
            out.append(_textual(text, rng))
    return out


def _load(path: Path, host: Any) -> str | None:
    """None if the recipe loaded or was refused with a RecipeError; else the foreign traceback."""
    try:
        load_recipe(path, host=host)
    except RecipeError as exc:
        assert exc.issues, f"a RecipeError without issues for {path}"
        for issue in exc.issues:
            assert issue.message, f"an issue without a message for {path}"
    except BaseException:  # the point of the test: anything else is a bug
        return traceback.format_exc(limit=4)
    return None


def test_every_mutant_of_every_shipped_recipe_loads_or_is_a_recipe_error(tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    shutil.copytree(RECIPES, folder)  # mutants sit beside the real concept and caption files
    sources = sorted(folder.glob("*.yaml"))
    assert sources, "no recipes shipped"
    host = new_host()
    rng = random.Random(20261201)
    foreign: list[str] = []
    tried = 0
    for source in sources:
        for k, text in enumerate(_mutants(source, max(MUTANTS_PER_RECIPE, MIN_MUTANTS // len(sources) + 1), rng)):
            mutant = source.with_name(f"mutant-{source.stem}-{k}.yaml")
            mutant.write_text(text, encoding="utf-8", errors="surrogatepass")
            problem = _load(mutant, host)
            tried += 1
            if problem is not None and len(foreign) < 5:
                foreign.append(f"--- {source.name} mutant {k}:\n{text[:600]}\n{problem}")
            mutant.unlink()
    assert tried >= MIN_MUTANTS
    assert not foreign, f"{len(foreign)}+ mutants escaped as foreign exceptions:\n" + "\n".join(foreign)


# The three crash classes the first fuzzing round found, pinned one by one: (recipe body after
# HEAD, the YAML path the error must name).
HEAD = "schema_version: 1\nmodel: builtin:tiny-sd\ndevice: cpu\n"
EDIT = "edits: [{method: uce}]\n"
CRASH_CASES: dict[str, tuple[str, str]] = {
    "deep flow list": ("edits: " + "[" * 600 + "]" * 600 + "\n", ""),
    "deep flow map": ("edits:\n  - method: trce_eot\n    params: " + "{a: " * 600 + "1" + "}" * 600 + "\n", ""),
    "deep block list": ("edits:\n" + "".join("  " * i + "- \n" for i in range(1, 600)), ""),
    "long model id": ("model: " + "m" * 5000 + "\n" + EDIT, "model.id"),
    "long name in model id": ("model: " + "x" * 300 + "/y\n" + EDIT, "model.id"),
    "NUL in model id": ('model: "a\\0b"\n' + EDIT, "model.id"),
    "long concept file": ("concepts: {c: {file: " + "c" * 5000 + "}}\n" + EDIT, "concepts.c.file"),
    "NUL in concept file": ('concepts: {c: {file: "a\\0b.json"}}\n' + EDIT, "concepts.c.file"),
    "long plugin path": ("plugins: [" + "p" * 5000 + "]\n" + EDIT, "plugins.0"),
    "NUL in plugin path": ('plugins: ["p\\0.py"]\n' + EDIT, "plugins.0"),
    "long output dir": ("output: {dir: " + "o" * 5000 + "}\n" + EDIT, "output.dir"),
}


@pytest.mark.parametrize("case", list(CRASH_CASES))
def test_crash_classes_are_recipe_errors_naming_file_line_field_and_fix(case: str, tmp_path: Path) -> None:
    body, field = CRASH_CASES[case]
    path = tmp_path / "recipe.yaml"
    head = HEAD.replace("model: builtin:tiny-sd\n", "") if body.startswith("model:") else HEAD
    path.write_text(head + body, encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, host=new_host())
    assert caught.value.source == str(path)
    issue = next((i for i in caught.value.issues if i.path == field), None)
    assert issue is not None, f"no issue at {field!r}: {caught.value}"
    assert issue.line is not None and issue.suggestion
    assert len(str(caught.value)) < 2000, "the message quotes the whole over-long value"


def test_a_recipe_path_that_is_too_long_or_holds_nul_is_a_recipe_error() -> None:
    for bad in ("r" * 5000 + ".yaml", "r\0.yaml"):
        with pytest.raises(RecipeError) as caught:
            load_recipe(bad, host=new_host())
        assert caught.value.issues[0].suggestion


def test_recipe_data_given_from_python_is_bounded_in_depth_too() -> None:
    data: dict[str, object] = {"schema_version": 1, "model": "builtin:tiny-sd"}
    nested: list[object] = []
    data["edits"] = nested
    for _ in range(5000):
        nested.append([])
        nested = nested[0]  # type: ignore[assignment]
    with pytest.raises(RecipeError, match="levels deep"):
        load_recipe(data, host=new_host())


def test_an_override_value_nested_too_deeply_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(HEAD + EDIT, encoding="utf-8")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(path, overrides=["edits.0.params=" + "[" * 2000 + "]" * 2000], host=new_host())


@pytest.mark.parametrize("bad", ["a\0b", "x" * 300 + "/y", "z" * 5000])
def test_unusable_paths_outside_recipes_are_the_projects_own_errors(bad: str, tmp_path: Path) -> None:
    """The Python API's and CLI's other path inputs: a model id, a run folder to load, ``--out``."""
    import conceptedit

    with pytest.raises(conceptedit.ModelLoadError, match="the id"):
        conceptedit.load_model(bad)
    with pytest.raises(conceptedit.RunDirError, match="the path"):
        conceptedit.load(None, bad)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HEAD + EDIT.replace("{method: uce}", "{method: sld}"), encoding="utf-8")
    with pytest.raises(conceptedit.RunDirError, match="--out"):
        conceptedit.apply(recipe, out=bad)
