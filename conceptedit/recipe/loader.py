"""Reading, overriding and validating recipes, with errors that point at the YAML line.

Everything wrong with a recipe is collected and raised at once as one
:class:`~conceptedit.errors.RecipeError`: each issue names the file, line, YAML path and,
where one exists, a did-you-mean.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path
from typing import Any, cast, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from conceptedit.api.edits import PromptPair
from conceptedit.api.paths import path_text_problem, shown
from conceptedit.api.recipe import ConceptRefMarker, GroupBase, RecipeBase
from conceptedit.errors import PluginError, RecipeError, RecipeIssue, did_you_mean
from conceptedit.models.loading import builtin_family, model_id_problem
from conceptedit.plugins import PluginHost, get_host
from conceptedit.recipe.concepts import ConceptFileError, GenerateError, expand_concepts, generate_concepts
from conceptedit.recipe.schema import RecipeSchema


@dataclass
class LoadedRecipe:
    """A validated recipe with where it came from.

    Attributes:
        recipe: The validated recipe (defaults filled, overrides applied).
        source: The recipe file, or None for a recipe given as data.
        text: The recipe file's text as given (None for data).
        base_dir: Folder that relative paths in the recipe are resolved against.
        overrides: The ``--set`` overrides applied, in order.
        host: The plugin host the recipe was validated against.
        concepts: Every concept set of the recipe expanded to its prompt pairs, once, here.
    """

    recipe: RecipeBase
    source: Path | None
    text: str | None
    base_dir: Path
    overrides: list[str]
    host: PluginHost
    concepts: dict[str, list[PromptPair]] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return self.source.stem if self.source else "recipe"


def load_recipe(
    recipe: str | Path | dict[str, Any],
    *,
    overrides: list[str] | None = None,
    host: PluginHost | None = None,
) -> LoadedRecipe:
    """Read (if a path), override, load the plugins it names, and validate a recipe."""
    host = host or get_host()
    overrides = list(overrides or [])
    if isinstance(recipe, dict):
        source, text, base_dir, lines = None, None, Path.cwd(), _LineIndex(None)
        too_deep = _too_deep(recipe)
        if too_deep is not None:
            raise RecipeError(None, [too_deep])
        data: Any = copy.deepcopy(recipe)
    else:
        problem = path_text_problem(str(recipe))
        if problem is not None:
            issue = RecipeIssue("", f"the recipe path {problem}", suggestion="give the path of a .yaml recipe file")
            raise RecipeError(shown(str(recipe)), [issue])
        source = Path(recipe)
        if not source.is_file():
            raise RecipeError(str(source), [_missing_file_issue(source)])
        try:
            text = source.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            issue = RecipeIssue("", f"not UTF-8 text (byte {exc.start})", suggestion="save the recipe as UTF-8 YAML")
            raise RecipeError(str(source), [issue]) from None
        base_dir = source.resolve().parent
        data, lines = _parse_yaml(text, str(source))
    label = str(source) if source else None
    issues: list[RecipeIssue] = list(lines.duplicates)
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else f"single value ({str(data)[:40]!r})"
        issue = RecipeIssue(
            "", f"a recipe must be a YAML mapping (key: value lines), not a {kind}", 1, "start with `schema_version: 1`"
        )
        raise RecipeError(label, [*issues, issue])
    for item in overrides:
        refused = apply_override(data, item)
        if refused is not None:
            issues.append(refused)
    issues.extend(_load_recipe_plugins(data, base_dir, host, lines))
    issues.extend(_check_model_id(data, lines))
    schema = schema_for(host)
    try:
        model = schema.model.model_validate(data)
    except ValidationError as exc:
        issues.extend(_convert_errors(exc, schema, lines, host))
        raise RecipeError(label, _mark_overridden(issues, overrides)) from None
    concepts = _expand_concepts(model, base_dir, lines, issues, host)
    issues.extend(_cross_checks(model, schema, host, lines))
    issues.extend(_check_held_out(model, concepts, host, lines))
    if issues:
        raise RecipeError(label, _mark_overridden(issues, overrides))
    loaded = LoadedRecipe(model, source, text, base_dir, overrides, host, concepts)
    host.pm.hook.conceptedit_recipe_loaded(recipe=model, source=label)
    return loaded


def schema_for(host: PluginHost) -> RecipeSchema:
    """The recipe schema for the methods ``host`` has registered (built once per set of methods)."""
    return _schema(tuple(sorted(host.registry.methods.items())))


@lru_cache(maxsize=8)
def _schema(methods: tuple[tuple[str, type[Any]], ...]) -> RecipeSchema:
    return RecipeSchema(dict(methods))


def _missing_file_issue(source: Path) -> RecipeIssue:
    """The recipe file does not exist: suggest a similarly named recipe next to where it was looked for."""
    folder = source.parent if source.parent.is_dir() else None
    candidates = {p.stem: p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml")} if folder else {}
    close = get_close_matches(source.stem, list(candidates), n=1, cutoff=0.7)
    hint = f"did you mean {str(source.with_name(candidates[close[0]]))!r}?" if close else "check the path"
    return RecipeIssue("", f"recipe file not found (looked for {source.resolve()})", suggestion=hint)


def _mark_overridden(issues: list[RecipeIssue], overrides: list[str]) -> list[RecipeIssue]:
    """Point issues about overridden values at the command line instead of the file's line."""
    given = {item.partition("=")[0].strip(): item for item in overrides if "=" in item}
    for issue in issues:
        for path, item in given.items():
            if path and (issue.path == path or issue.path.startswith(path + ".")) and "--set" not in issue.message:
                issue.line = None
                issue.message += f" (value given on the command line: {item})"
                break
    return issues


# --------------------------------------------------------------------------- YAML with lines


class _LineIndex:
    """Maps dotted YAML paths to 1-based line numbers."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[str, int] = {}
        #: Keys given twice in one mapping (YAML loaders silently keep the last one).
        self.duplicates: list[RecipeIssue] = []
        if root is not None:
            self._walk(root, "")

    def _walk(self, node: yaml.Node, path: str) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                child = f"{path}.{key.value}" if path else str(key.value)
                line = key.start_mark.line + 1
                if key.value in seen:
                    self.duplicates.append(
                        RecipeIssue(
                            child,
                            f"key {key.value!r} is given twice (lines {seen[key.value]} and {line})",
                            line,
                            "keep one of them; YAML would silently use the last",
                        )
                    )
                seen.setdefault(key.value, line)
                self.lines[child] = line
                self._walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                self._walk(value, f"{path}.{i}" if path else str(i))

    def line(self, path: str) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if "." not in path:
                return self.lines.get("")
            path = path.rsplit(".", 1)[0]


#: Deepest nesting of lists and mappings a recipe may have. The deepest real recipe has 6 levels;
#: the YAML reader and the validators recurse once or more per level, so without a bound a
#: pathological file ends in RecursionError (or worse) instead of a recipe error.
MAX_DEPTH = 64
_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
_DEPTH_HINT = f"a recipe nests at most {MAX_DEPTH} levels of lists and mappings; check for runaway brackets"


class _TooDeep(yaml.MarkedYAMLError):
    """Raised on the node that goes past :data:`MAX_DEPTH`."""


class _TagChecks:
    """PyYAML's constructors for explicit tags (``!!timestamp``, ``!!int`` ...) fail with
    AttributeError or ValueError on values that do not fit the tag; say where instead."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError, LookupError):
            problem = f"the value {shown(node.value)} does not fit its tag {node.tag}"
            raise yaml.constructor.ConstructorError(problem=problem, problem_mark=node.start_mark) from None


class _BoundedLoader(_TagChecks, yaml.SafeLoader):
    """The pure-Python safe loader, refusing nesting deeper than :data:`MAX_DEPTH` before it
    recurses into it. Its error messages are the ones recipe errors quote."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(problem=_TOO_DEEP, problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_FAST_LOADER: type | None = type("_FastLoader", (_TagChecks, yaml.CSafeLoader), {}) if yaml.__with_libyaml__ else None


def _read_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The YAML document in ``text``, as data and as the node tree the line index reads.

    With libyaml, a first pass over its events (no recursion, no objects built) bounds the
    depth, and libyaml composes the nodes: the pure-Python reader takes ~15 ms a recipe and
    is quadratic in the depth of one flow line. Text libyaml refuses is read again by the
    Python loader, whose error messages the recipe errors are written for.
    """
    loader = _BoundedLoader(text) if _FAST_LOADER is None or not _shallow_yaml(text) else _FAST_LOADER(text)
    try:
        root = loader.get_single_node()
        return (loader.construct_document(root) if root is not None else None), root
    finally:
        loader.dispose()


def _shallow_yaml(text: str) -> bool:
    """True if libyaml parses ``text`` and finds it at most :data:`MAX_DEPTH` deep; raises
    :class:`_TooDeep` if it is deeper; False if libyaml refuses the text."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.CSafeLoader):
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _TooDeep(problem=_TOO_DEEP, problem_mark=cast(yaml.Mark, event.start_mark))
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
    except _TooDeep:
        raise
    except yaml.MarkedYAMLError as exc:
        if "nesting depth" in str(exc.problem):  # libyaml's own limit (1,000), met while scanning ahead
            raise _TooDeep(problem=_TOO_DEEP, problem_mark=exc.problem_mark) from None
        return False
    except yaml.YAMLError:
        return False
    return True


def _too_deep(data: Any) -> RecipeIssue | None:
    """An issue for recipe data (given as Python objects) nested deeper than :data:`MAX_DEPTH`."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                return RecipeIssue(path, _TOO_DEEP, suggestion=_DEPTH_HINT)
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((value, depth + 1, f"{path}.{key}" if path else str(key)) for key, value in items)
    return None


def _parse_yaml(text: str, label: str) -> tuple[Any, _LineIndex]:
    try:
        data, root = _read_yaml(text)
    except _TooDeep as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise RecipeError(label, [RecipeIssue("", f"invalid YAML: {exc.problem}", line, _DEPTH_HINT)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        context = exc.context or ""
        if context and exc.context_mark is not None and exc.context_mark.line + 1 != line:
            context += f" that starts on line {exc.context_mark.line + 1}"
        problem = f"{exc.problem or 'invalid YAML'}" + (f" ({context})" if context else "")
        hint = "check indentation, colons, quotes and brackets"
        if "'\\t'" in problem:
            hint = "indent with spaces: YAML does not allow tabs"
        raise RecipeError(label, [RecipeIssue("", f"invalid YAML: {problem}", line=line, suggestion=hint)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(label, [RecipeIssue("", f"invalid YAML: {exc}")]) from None
    if data is None:
        hint = "a recipe needs `schema_version: 1`, `model:` and `edits:`"
        raise RecipeError(label, [RecipeIssue("", "the recipe is empty", suggestion=hint)])
    return data, _LineIndex(root)


# --------------------------------------------------------------------------- overrides


def apply_override(data: dict[str, Any], item: str) -> RecipeIssue | None:
    """Apply one ``a.b.0.c=value`` override in place (value parsed as YAML); an issue if it can't."""
    path, sep, raw = item.partition("=")
    path = path.strip()
    if not sep or not path:
        message = f"--set {item}: an override must look like path.to.key=value"
        return RecipeIssue(item, message, suggestion="e.g. edits.0.params.eta=1e-4")
    try:
        value = _read_yaml(raw)[0] if raw.strip() else ""
    except _TooDeep:
        return RecipeIssue(path, f"--set {shown(item)}: the value is nested too deeply", suggestion=_DEPTH_HINT)
    except yaml.YAMLError:
        value = raw
    parts = path.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        walked = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return RecipeIssue(walked, f"--set {item}: no list item {part!r}", suggestion=_index_hint(node))
            node = node[int(part)]
        elif isinstance(node, dict):
            if depth == 0 and part == "model" and isinstance(node.get(part), str):
                node[part] = {"id": node[part]}  # `model: NAME` is shorthand for `model: {id: NAME}`
            node = node.setdefault(part, {})
        else:
            return RecipeIssue(
                walked, f"--set {item}: {walked!r} is a value, not a mapping or list", suggestion="check the path"
            )
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            return RecipeIssue(path, f"--set {item}: no list item {last!r}", suggestion=_index_hint(node))
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return RecipeIssue(path, f"--set {item}: parent is a value, not a mapping or list", suggestion="check the path")
    return None


def _index_hint(items: list[Any]) -> str:
    if not items:
        return "the list is empty"
    return f"the list has {len(items)} item(s): use an index from 0 to {len(items) - 1}"


# --------------------------------------------------------------------------- model id


def _check_model_id(data: dict[str, Any], lines: _LineIndex) -> list[RecipeIssue]:
    """Catch model ids that cannot load without loading anything: the same decisions as ``load_model``."""
    spec = data.get("model")
    model_id = spec.get("id") if isinstance(spec, dict) else spec
    if not isinstance(model_id, str) or not model_id.strip() or path_text_problem(model_id):
        return []  # missing, empty, mistyped or not a usable path: the schema reports it
    problem = model_id_problem(model_id)
    if problem is None:
        return []
    message, hint = problem
    return [RecipeIssue("model.id", message, lines.line("model.id"), hint)]


# --------------------------------------------------------------------------- plugins


def _load_recipe_plugins(
    data: dict[str, Any], base_dir: Path, host: PluginHost, lines: _LineIndex
) -> list[RecipeIssue]:
    paths = data.get("plugins") or []
    if not isinstance(paths, list):
        return []  # the schema reports the type error
    issues = []
    for i, path in enumerate(paths):
        if not isinstance(path, str) or path_text_problem(path):
            continue  # the schema reports it
        try:
            host.load_path(path, base=base_dir)
        except PluginError as exc:
            issues.append(
                RecipeIssue(
                    f"plugins.{i}",
                    str(exc),
                    lines.line(f"plugins.{i}"),
                    "give a .py file or a folder of them, relative to the recipe",
                )
            )
    return issues


# --------------------------------------------------------------------------- error rendering


def _convert_errors(
    exc: ValidationError, schema: RecipeSchema, lines: _LineIndex, host: PluginHost
) -> list[RecipeIssue]:
    errors = exc.errors()
    # unknown keys per parent, so a missing key can point at its misspelling
    extra: dict[tuple[Any, ...], list[str]] = {}
    for err in errors:
        if err["type"] == "extra_forbidden":
            loc = _strip_tags(err["loc"], schema)
            extra.setdefault(loc[:-1], []).append(str(loc[-1]))
    issues = []
    for err in errors:
        loc = _strip_tags(err["loc"], schema)
        path = ".".join(str(part) for part in loc)
        kind = err["type"]
        message = err["msg"].removeprefix("Value error, ")
        ctx = err.get("ctx") or {}
        given = err.get("input")
        suggestion = None
        if kind == "extra_forbidden":
            message, suggestion = _unknown_key(str(loc[-1]), _allowed_keys(schema, err["loc"][:-1]))
        elif kind == "unknown_method":
            message, suggestion = _unknown_method(given, ctx, schema, host)
        elif kind == "missing":
            message, suggestion = _missing_key(loc, err["loc"], extra.get(loc[:-1], []), schema, lines)
        elif kind == "literal_error" and path == "schema_version":
            message += f", got {shown(given)}"
            suggestion = "this conceptedit reads schema_version 1; write `schema_version: 1`"
        elif kind == "literal_error":
            options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
            message += f", got {shown(given)}"
            close = get_close_matches(str(given), options, n=1, cutoff=0.8)
            if close:
                suggestion = f"did you mean {close[0]!r}?"
        elif kind == "string_pattern_mismatch" and path == "device":
            message = f"invalid device {shown(given)}"
            suggestion = "use auto, cpu, cuda, cuda:N or mps"
        elif kind in _BOUNDS:
            bound = next(iter(ctx.values()), None)
            message += f", got {shown(given)}"
            suggestion = f"use a value {_BOUNDS[kind]} {bound}"
        elif kind == "too_short" and len(loc) == 3 and loc[0] == "edits" and loc[2] == "edits":
            suggestion = "a group trains 2 or more training edits together; list a single edit directly under `edits:`"
        elif kind == "too_short" and path == "edits":
            suggestion = "add at least one `- method: NAME`; `conceptedit methods` lists them"
        else:
            if _is_scalar(given) and kind not in ("value_error", "assertion_error"):
                message += f", got {shown(given)}"
            suggestion = _TYPE_HINTS.get(kind)
            if kind == "list_type" and _is_scalar(given):
                suggestion = f"write a YAML list, e.g. [{str(given)[:40]}]"
        issues.append(RecipeIssue(path, message, lines.line(path), suggestion))
    return issues


def _unknown_key(key: str, allowed: list[str]) -> tuple[str, str | None]:
    close = get_close_matches(key, allowed, n=1, cutoff=0.5)
    if close:
        return f"unknown key {key!r}", f"did you mean {close[0]!r}?"
    return f"unknown key {key!r}", ("allowed keys: " + ", ".join(allowed)) if allowed else None


def _missing_key(
    loc: tuple[Any, ...], raw_loc: tuple[Any, ...], unknown_here: list[str], schema: RecipeSchema, lines: _LineIndex
) -> tuple[str, str | None]:
    """A required key is missing: point at a misspelt key beside it, or say what to add."""
    key = str(loc[-1])
    suggestion = _MISSING_HINTS.get(".".join(str(part) for part in loc))
    if key == "params":
        method = next((p for p in raw_loc if isinstance(p, str) and p in schema.methods), None)
        suggestion = f"`conceptedit methods {method or 'NAME'}` lists the required parameters"
    close = get_close_matches(key, unknown_here, n=1, cutoff=0.5)
    if close:
        where = lines.line(".".join(str(part) for part in (*loc[:-1], close[0])))
        at = f" (line {where})" if where else ""
        suggestion = f"rename {close[0]!r}{at} to {key!r}"
    return f"required key {key!r} is missing", suggestion


_MISSING_HINTS = {
    "schema_version": "add `schema_version: 1`",
    "model": "add `model: builtin:tiny-sd`, a hub id, a diffusers folder or a .safetensors file",
    "edits": "add `edits:` with at least one `- method: NAME`; `conceptedit methods` lists them",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_TYPE_HINTS = {
    "int_parsing": "write a whole number, e.g. 0",
    "int_type": "write a whole number, e.g. 0",
    "int_from_float": "write a whole number, e.g. 0",
    "float_parsing": "write a number, e.g. 1e-4",
    "float_type": "write a number, e.g. 1e-4",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a string (quote it if YAML reads it as something else)",
    "dict_type": "write a mapping of key: value lines",
    "model_type": "write a mapping of key: value lines",
    "model_attributes_type": "write a mapping of key: value lines",
    "path_text": "give a real file or folder path: no NUL characters, names of at most 255 bytes",
}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _unknown_method(given: Any, ctx: dict[str, Any], schema: RecipeSchema, host: PluginHost) -> tuple[str, str]:
    """Message and suggestion for an edit whose ``method:`` is missing, unknown, or not allowed where it is."""
    allowed = [t for t in str(ctx.get("known", "")).split(", ") if t and t != "group"]
    name = _tag_value(given)
    if name is None:
        return (
            "each edit needs a `method:` key (or `group:` for a training group)",
            "methods installed: " + ", ".join(allowed),
        )
    cls = schema.methods.get(str(name))
    if cls is not None and name not in allowed:
        return (
            f"method {name!r} is {cls.kind}; a training group holds only training methods",
            "move it out of the group, before or after it; training methods: " + ", ".join(allowed),
        )
    suggestion = did_you_mean(str(name), allowed, label="installed", cutoff=0.5)
    broken = host.failed()
    if broken:  # one of them may be the plugin that provides it
        suggestion += "; plugins that failed to load: " + ", ".join(f"{i.name} ({i.error})" for i in broken)
    else:
        suggestion += "; `conceptedit plugins` lists every plugin and method"
    return f"unknown edit method {name!r}", suggestion


def _tag_value(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("method")
    return None


def _strip_tags(loc: tuple[Any, ...], schema: RecipeSchema) -> tuple[Any, ...]:
    """Drop the union-tag parts pydantic inserts after a list index (``edits.0.<tag>.params``)."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and i > 0 and isinstance(loc[i - 1], int) and part in schema.tag_models:
            continue
        out.append(part)
    return tuple(out)


def _allowed_keys(schema: RecipeSchema, loc: tuple[Any, ...]) -> list[str]:
    model: Any = schema.model
    for part in loc:
        if isinstance(part, str) and part in schema.tag_models and not _has_field(model, part):
            model = schema.tag_models[part]
            continue
        model = _descend(model, part)
        if model is None:
            return []
    return list(model.model_fields) if _is_model(model) else []


def _has_field(model: Any, name: str) -> bool:
    return _is_model(model) and name in model.model_fields


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _descend(model: Any, part: Any) -> Any:
    """The type found one step below ``model`` at ``part`` (field, list index or dict key)."""
    if _is_model(model):
        if not isinstance(part, str) or part not in model.model_fields:
            return None
        return _unwrap(model.model_fields[part].annotation)
    origin = get_origin(model)
    if origin in (list, tuple):
        return _unwrap(get_args(model)[0])
    if origin is dict:
        return _unwrap(get_args(model)[1])
    return model  # a union of tagged edits: the tag part selects the member next


def _unwrap(annotation: Any) -> Any:
    """Strip Optional and Annotated so the walk reaches the model or container inside."""
    while True:
        args = get_args(annotation)
        if hasattr(annotation, "__metadata__"):
            annotation = args[0]
            continue
        models = [a for a in args if _is_model(a)]
        if get_origin(annotation) not in (list, tuple, dict) and len(models) == 1:
            annotation = models[0]
            continue
        return annotation


# --------------------------------------------------------------------------- cross-field checks


def _expand_concepts(
    recipe: RecipeBase, base_dir: Path, lines: _LineIndex, issues: list[RecipeIssue], host: PluginHost
) -> dict[str, list[PromptPair]]:
    """Each concept set's prompt pairs (its file read, or its source run, once, here); a set that
    cannot be expanded is an issue. A generated set's ``generate:`` block is replaced by the
    resolved one (every option, defaults included), so the resolved recipe reproduces its pairs."""
    out: dict[str, list[PromptPair]] = {}
    for name, concept_set in recipe.concepts.items():
        if concept_set.generate is not None:
            try:
                out[name], concept_set.generate = generate_concepts(concept_set, host.registry.concept_sources)
            except GenerateError as exc:
                issues.extend(_generate_issues(name, exc, lines, host))
            continue
        try:
            out[name] = expand_concepts(concept_set, base_dir)
        except ConceptFileError as exc:
            path = f"concepts.{name}.file"
            issues.append(RecipeIssue(path, str(exc), lines.line(path), "paths are relative to the recipe file"))
    return out


def _generate_issues(name: str, exc: GenerateError, lines: _LineIndex, host: PluginHost) -> list[RecipeIssue]:
    """One issue per problem of set ``name``'s ``generate:`` block, at ``concepts.<name>.generate.<option>``."""
    issues = []
    for problem in exc.problems:
        path = ".".join(part for part in (f"concepts.{name}.generate", problem.field) if part)
        suggestion = problem.suggestion
        note = host.failure_note() if problem.field == "source" else None
        if note:  # one of them may be the plugin that provides it
            suggestion = f"{suggestion}; {note}" if suggestion else note
        issues.append(RecipeIssue(path, problem.message, lines.line(path), suggestion))
    return issues


def _cross_checks(recipe: RecipeBase, schema: RecipeSchema, host: PluginHost, lines: _LineIndex) -> list[RecipeIssue]:
    issues: list[RecipeIssue] = []
    known_sets = list(recipe.concepts)
    for i, item in enumerate(recipe.edits):
        if isinstance(item, GroupBase):
            for j, member in enumerate(item.edits):
                prefix = f"edits.{i}.edits.{j}"
                if "training" in member.model_fields_set:
                    issues.append(
                        RecipeIssue(
                            f"{prefix}.training",
                            "a group member cannot set its own training loop",
                            lines.line(f"{prefix}.training"),
                            f"move it to edits.{i}.training",
                        )
                    )
                issues.extend(_check_refs(member, prefix, known_sets, lines))
        else:
            issues.extend(_check_refs(item, f"edits.{i}", known_sets, lines))
    issues.extend(_check_suites(recipe, host, lines))
    issues.extend(_check_backbones(recipe, lines))
    exporters = host.registry.exporters
    for k, fmt in enumerate(recipe.output.formats):
        if fmt not in exporters:
            issues.append(
                RecipeIssue(
                    f"output.formats.{k}",
                    f"unknown output format {fmt!r}",
                    lines.line(f"output.formats.{k}"),
                    did_you_mean(fmt, list(exporters)),
                )
            )
    issues.extend(_check_export_options(recipe, exporters, lines))
    return issues


def _check_backbones(recipe: RecipeBase, lines: _LineIndex) -> list[RecipeIssue]:
    """A method that does not support a built-in model's backbone family, with the method's reason
    (other models' families are known once loaded: ``apply`` refuses then, before any edit runs)."""
    family = builtin_family(recipe.model.id)
    if family is None:
        return []
    issues = []
    for i, item in enumerate(recipe.edits):
        members = item.edits if isinstance(item, GroupBase) else [item]
        for j, member in enumerate(members):
            problem = member.method_cls.backbone_problem(family)
            if problem is not None:
                path = f"edits.{i}.edits.{j}.method" if isinstance(item, GroupBase) else f"edits.{i}.method"
                fix = f"use a model of a family it supports, or another method on {recipe.model.id}"
                issues.append(RecipeIssue(path, problem, lines.line(path), fix))
    return issues


def _check_export_options(recipe: Any, exporters: dict[str, Any], lines: _LineIndex) -> list[RecipeIssue]:
    """Each ``output.export_options`` entry names a listed format and passes that format's options model."""
    issues = []
    for fmt, options in recipe.output.export_options.items():
        where = f"output.export_options.{fmt}"
        if fmt not in recipe.output.formats:
            issues.append(
                RecipeIssue(
                    where,
                    f"options for {fmt!r}, which output.formats does not list",
                    lines.line(where),
                    f"add {fmt} to output.formats or remove these options",
                )
            )
            continue
        if fmt not in exporters:
            continue  # reported as an unknown format above
        try:
            exporters[fmt].Options.model_validate(options)
        except ValidationError as exc:
            for e in exc.errors():
                field = ".".join(str(p) for p in e["loc"])
                known = ", ".join(exporters[fmt].Options.model_fields) or "none"
                issues.append(RecipeIssue(f"{where}.{field}", e["msg"], lines.line(where), f"{fmt}'s options: {known}"))
    return issues


def _check_refs(edit: Any, prefix: str, known: list[str], lines: _LineIndex) -> list[RecipeIssue]:
    issues = []
    params = edit.params
    for field_name, info in type(params).model_fields.items():
        if not any(isinstance(m, ConceptRefMarker) for m in info.metadata):
            continue
        value = getattr(params, field_name)
        values = value if isinstance(value, list) else [value]
        for ref in values:
            if ref is not None and ref not in known:
                path = f"{prefix}.params.{field_name}"
                close = get_close_matches(str(ref), known, n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else ("define it under `concepts:`" + (f" (have: {', '.join(known)})" if known else ""))
                )
                issues.append(RecipeIssue(path, f"no concept set named {ref!r}", lines.line(path), hint))
    return issues


def _check_held_out(
    recipe: RecipeBase, concepts: dict[str, list[PromptPair]], host: PluginHost, lines: _LineIndex
) -> list[RecipeIssue]:
    """An ``evaluate`` suite that holds prompts out of the edit refuses a recipe whose concept
    sets use them: an erasure rate on prompts the edit saw is not an erasure rate."""
    prompts = [p for pairs in concepts.values() for pair in pairs for p in (pair.source, pair.target)]
    issues: list[RecipeIssue] = []
    for k, spec in enumerate(recipe.evaluate):
        cls = host.registry.suites.get(spec.suite)
        try:
            suite = cls(cls.Options.model_validate(spec.options)) if cls is not None else None
        except ValidationError:
            continue  # reported by _check_suites
        problems = suite.overlap_with(prompts) if suite is not None else []
        if problems:
            shown_problems = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            issues.append(
                RecipeIssue(
                    f"evaluate.{k}",
                    f"suite {spec.suite!r} holds out words the recipe's concept sets use: {shown_problems}",
                    lines.line(f"evaluate.{k}"),
                    "take those phrasings and context words out of the concept sets (a generate: block's "
                    "exclude_contexts does it), or evaluate on a suite the edit may see",
                )
            )
    return issues


def _check_suites(recipe: RecipeBase, host: PluginHost, lines: _LineIndex) -> list[RecipeIssue]:
    """Every ``evaluate`` entry names an installed suite and gives it valid options."""
    issues: list[RecipeIssue] = []
    suites = host.registry.suites
    for k, spec in enumerate(recipe.evaluate):
        path = f"evaluate.{k}"
        cls = suites.get(spec.suite)
        if cls is None:
            hint = did_you_mean(spec.suite, sorted(suites))
            issues.append(
                RecipeIssue(f"{path}.suite", f"unknown prompt suite {spec.suite!r}", lines.line(f"{path}.suite"), hint)
            )
            continue
        try:
            cls.Options.model_validate(spec.options)
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(x) for x in (path, "options", *error["loc"]))
                issues.append(
                    RecipeIssue(
                        where,
                        error["msg"],
                        lines.line(where) or lines.line(f"{path}.options"),
                        f"options of {spec.suite}: {', '.join(cls.Options.model_fields)}",
                    )
                )
    return issues
