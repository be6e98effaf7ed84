"""The layering rule of the design review §4(c) (issue 12), enforced by reading every module's imports.

Layers, left to right; a module imports only modules of its own layer or of layers to its left::

    errors <- api <- io <- {data, models, shapes} <- plugins <- recipe <- {engine | evaluation}
           <- run <- {cli, toolkit, testing, __main__} <- face

* ``face`` is the package ``conceptedit`` itself (``conceptedit/__init__.py``). It is the
  rightmost layer on its own: no module inside the package imports it, not even ``cli``,
  ``toolkit`` or ``testing``; they import the module that defines a name.
* ``engine`` and ``evaluation`` share a layer but never import each other (``run`` calls both).
* Every import counts: module level, under ``if TYPE_CHECKING:``, and inside functions (lazy).
  The few accepted exceptions are in ``ALLOWED`` below, each with its reason.
* The module graph has no cycle, type-only and lazy edges included.
* Plugins (``plugins/conceptedit_builtin``, ``plugins/example-plugin/src``) import only
  ``conceptedit`` and ``conceptedit.toolkit`` (their tests also ``conceptedit.testing``) and never
  another plugin.
* Function length is ``end_lineno - lineno + 1`` of the ``def`` (decorators not counted, docstring
  and comments counted; nested functions are measured too). No function in ``conceptedit/`` is over
  60 lines unless a ``#`` comment containing the word "long" or "why" sits on its ``def`` line, on
  the line just above the ``def`` or just above its first decorator, e.g.
  ``# long: one linear recipe walk; splitting it hides the order``.
* ``conceptedit.run.apply`` is at most 40 lines.

``import a.b`` and ``from a import b`` point at module ``a.b`` when that module exists, else at
``a`` (a name imported from a package points at the package's ``__init__``). The implicit import
of parent packages is not an edge. Run ``pytest tests/test_layering.py -rP`` to see the measured
numbers (violations, cycles, largest function) also when everything passes.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "conceptedit"

# Left to right. The group of ``conceptedit.X...`` is ``X``; the package itself is ``face``.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("api",),
    ("io",),
    ("data", "models", "shapes", "attacks"),
    ("plugins",),
    ("recipe",),
    ("engine", "evaluation"),
    ("run", "export_run"),
    ("cli", "toolkit", "testing", "__main__"),
    ("face",),
)
LAYER_OF = {group: i for i, groups in enumerate(LAYERS) for group in groups}
APART = {frozenset({"engine", "evaluation"})}  # same layer, yet never import each other

# Accepted exceptions to the layer rule: (importer, imported) -> why. Keep it at most 3 and
# lazy (inside a function) only; an entry no import uses any more fails, so delete it then.
ALLOWED: dict[tuple[str, str], str] = {}
MAX_ALLOWED = 3

PUBLIC_FACES = {"conceptedit", "conceptedit.toolkit"}
PLUGIN_PACKAGES = ("conceptedit_builtin", "conceptedit_example")
_EXAMPLE = ROOT / "plugins" / "example-plugin"
# (folder, the folder module names start from, what it may import of conceptedit, plugin packages
# it must not import). Each built-in module is a plugin of its own, so none imports another.
PLUGIN_TREES = (
    (ROOT / "plugins" / "conceptedit_builtin", ROOT / "plugins", PUBLIC_FACES, set(PLUGIN_PACKAGES)),
    (_EXAMPLE / "src", _EXAMPLE / "src", PUBLIC_FACES, {"conceptedit_builtin"}),
    (_EXAMPLE / "tests", _EXAMPLE / "tests", PUBLIC_FACES | {"conceptedit.testing"}, {"conceptedit_builtin"}),
)

MAX_FUNCTION_LINES = 60
MAX_APPLY_LINES = 40
EXEMPT_COMMENT = re.compile(r"#.*\b(long|why)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Edge:
    importer: str
    target: str
    path: Path
    line: int
    kind: str  # "runtime", "type" (under TYPE_CHECKING) or "lazy" (inside a function)

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} {self.importer} -> {self.target} ({self.kind})"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {_module_name(p, ROOT): p for p in sorted(PACKAGE.rglob("*.py"))}


def _group(module: str) -> str | None:
    parts = module.split(".")
    group = "face" if len(parts) == 1 else parts[1]
    return group if group in LAYER_OF else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str, known: set[str]) -> list[tuple[str, int, str]]:
    """(target, line, kind) for every import in ``path``.

    The target is the imported module; a name imported from a module points at that module. A
    target that is no module of the package (``conceptedit.gone``) is kept as written.
    """
    found: list[tuple[str, int, str]] = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and kind == "runtime":
            kind = "lazy"
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "type")
            for child in node.orelse:
                visit(child, kind)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, kind) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages up from the importer's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in known else base, node.lineno, kind))
        for child in ast.iter_child_nodes(node):
            visit(child, kind)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "runtime")
    return found


@cache
def _edges() -> tuple[Edge, ...]:
    """Every import between two modules of the package (self-imports left out)."""
    modules = _modules()
    known = set(modules)
    edges = []
    for module, path in modules.items():
        for target, line, kind in _imports(path, module, known):
            if (target == "conceptedit" or target.startswith("conceptedit.")) and target != module:
                edges.append(Edge(module, target, path, line, kind))
    return tuple(edges)


def _violations() -> list[Edge]:
    bad = []
    for edge in _edges():
        source, target = _group(edge.importer), _group(edge.target)
        if source is None or target is None or (edge.importer, edge.target) in ALLOWED:
            continue  # unmapped modules are reported by their own test
        if LAYER_OF[target] > LAYER_OF[source] or frozenset({source, target}) in APART:
            bad.append(edge)
    return bad


def _cycles() -> list[list[Edge]]:
    """One cycle per strongly connected component of the module graph (Tarjan), as edges."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in _edges():
        graph.setdefault(edge.importer, {}).setdefault(edge.target, edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in components:  # the shortest cycle through the component's first module (BFS)
        start = min(component)
        parent: dict[str, Edge] = {}
        queue = deque([start])
        closing: Edge | None = None
        while closing is None:
            node = queue.popleft()
            for succ, edge in sorted(graph.get(node, {}).items()):
                if succ == start:
                    closing = edge
                    break
                if succ in component and succ not in parent:
                    parent[succ] = edge
                    queue.append(succ)
        cycle = [closing]
        while cycle[0].importer != start:
            cycle.insert(0, parent[cycle[0].importer])
        cycles.append(cycle)
    return cycles


@dataclass(frozen=True)
class Function:
    path: Path
    line: int
    name: str
    length: int
    exempt: bool

    def __str__(self) -> str:
        note = " (commented)" if self.exempt else ""
        return f"{self.path.relative_to(ROOT)}:{self.line} {self.name}: {self.length} lines{note}"


def _functions_of(path: Path) -> list[Function]:
    """Every ``def`` in one file, methods and nested functions included, with its length."""
    source = path.read_text(encoding="utf-8")
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {tok.start[0]: tok.string for tok in tokens if tok.type == tokenize.COMMENT}
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                lines = {child.lineno, child.lineno - 1, first - 1}  # where the long/why comment may sit
                exempt = any(EXEMPT_COMMENT.search(comments.get(n, "")) for n in lines)
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                found.append(Function(path, child.lineno, name, length, exempt))
                walk(child, f"{name}.")
            else:
                walk(child, f"{prefix}{child.name}." if isinstance(child, ast.ClassDef) else prefix)

    walk(ast.parse(source, filename=str(path)), f"{_module_name(path, ROOT)}:")
    return found


@cache
def _functions() -> tuple[Function, ...]:
    return tuple(f for path in _modules().values() for f in _functions_of(path))


def _plugin_problems() -> list[str]:
    """Imports of plugin code that reach past the public faces or into another plugin."""
    known = set(_modules())
    problems = []
    for root, base, may_import, others in PLUGIN_TREES:
        for path in sorted(root.rglob("*.py")):
            module = _module_name(path, base)
            for target, line, kind in _imports(path, module, known):
                top = target.split(".")[0]
                if (top == "conceptedit" and target not in may_import) or top in others:
                    problems.append(f"{path.relative_to(ROOT)}:{line} {module} -> {target} ({kind})")
    return problems


def _summary() -> str:
    edges = _edges()
    functions = sorted(_functions(), key=lambda f: -f.length)
    long_ones = [f for f in functions if f.length > MAX_FUNCTION_LINES]
    kinds = {k: sum(e.kind == k for e in edges) for k in ("runtime", "type", "lazy")}
    return "\n".join(
        [
            f"modules: {len(_modules())}, internal imports: {len(edges)} {kinds}",
            f"layer violations: {len(_violations())} (allow-listed: {len(ALLOWED)})",
            f"cycles: {len(_cycles())}",
            f"plugin import problems: {len(_plugin_problems())}",
            f"largest function: {functions[0] if functions else None}",
            f"functions over {MAX_FUNCTION_LINES} lines: {len(long_ones)}"
            f" ({sum(not f.exempt for f in long_ones)} without a comment)",
        ]
    )


def _report(title: str, items: list[str]) -> str:
    text = f"{title}: {len(items)}\n" + "\n".join(f"  {item}" for item in items)
    print(f"{_summary()}\n\n{text}")
    return text


def test_every_module_has_a_layer() -> None:
    unmapped = [m for m in _modules() if _group(m) is None]
    assert not unmapped, _report("modules without a layer (add them to LAYERS)", unmapped)


def test_internal_imports_name_existing_modules() -> None:
    known = set(_modules())
    missing = [str(e) for e in _edges() if e.target not in known]
    assert not missing, _report("imports of conceptedit modules that do not exist", missing)


def test_modules_import_only_their_own_layer_or_layers_to_the_left() -> None:
    bad = [str(e) for e in _violations()]
    assert not bad, _report("layer violations (file:line importer -> imported)", bad)


def test_engine_and_evaluation_never_import_each_other() -> None:
    wings = {"engine", "evaluation"}
    bad = [str(e) for e in _edges() if {_group(e.importer), _group(e.target)} == wings]
    assert not bad, _report("imports between engine and evaluation", bad)


def test_allow_list_is_small_lazy_and_used() -> None:
    assert len(ALLOWED) <= MAX_ALLOWED, f"ALLOWED has {len(ALLOWED)} entries, at most {MAX_ALLOWED}"
    used = {(e.importer, e.target) for e in _edges()}
    stale = [f"{a} -> {b}" for a, b in ALLOWED if (a, b) not in used]
    eager = [str(e) for e in _edges() if (e.importer, e.target) in ALLOWED and e.kind != "lazy"]
    assert not stale, _report("ALLOWED entries no import uses any more (delete them)", stale)
    assert not eager, _report("ALLOWED imports that are not inside a function", eager)


def test_module_graph_has_no_cycle_type_only_and_lazy_imports_included() -> None:
    cycles = _cycles()
    shown = [" -> ".join([c[0].importer, *(e.target for e in c)]) + "".join(f"\n    {e}" for e in c) for c in cycles]
    assert not cycles, _report("import cycles", shown)


def test_plugins_import_only_the_public_faces_and_never_each_other() -> None:
    problems = _plugin_problems()
    assert not problems, _report("plugin imports outside conceptedit / conceptedit.toolkit", problems)


def test_no_function_over_60_lines_without_a_comment_saying_why() -> None:
    long_ones = [str(f) for f in _functions() if f.length > MAX_FUNCTION_LINES and not f.exempt]
    assert not long_ones, _report(f"functions over {MAX_FUNCTION_LINES} lines without a long/why comment", long_ones)


def test_run_apply_is_at_most_40_lines() -> None:
    run = PACKAGE / "run.py"
    assert run.exists(), (
        "conceptedit/run.py does not exist yet: run.apply (plan -> load -> edits -> guards ->"
        " evaluation -> manifest -> publish, <= 40 lines) must live there (design review §4c)"
    )
    tree = ast.parse(run.read_text(encoding="utf-8"))
    apply = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "apply"]
    assert apply, "conceptedit/run.py has no top-level def apply"
    assert apply[0].end_lineno is not None
    length = apply[0].end_lineno - apply[0].lineno + 1
    print(f"run.apply: {length} lines (conceptedit/run.py:{apply[0].lineno})")
    assert length <= MAX_APPLY_LINES, f"run.apply is {length} lines, at most {MAX_APPLY_LINES}"


def test_print_measurements() -> None:
    """Always passes; shows the numbers with ``-rP`` or ``-s``."""
    long_ones = sorted((f for f in _functions() if f.length > MAX_FUNCTION_LINES), key=lambda f: -f.length)
    print(_summary())
    print("\n".join(["functions over 60 lines:", *(f"  {f}" for f in long_ones)]))
