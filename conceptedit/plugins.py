"""Plugin discovery and the registries the rest of conceptedit reads.

Plugins come from three places only:

* installed distributions that declare an entry point in the ``conceptedit`` group (the
  built-in methods under ``plugins/`` ship exactly this way);
* Python files or folders the user names (``plugins:`` in a recipe, ``--plugins-dir``);
* objects registered in-process (tests, notebooks).

Each entry point is loaded on its own: one that fails is recorded with its error and listed
by ``conceptedit plugins`` instead of crashing the host, and a run fails only when it needs
what that plugin would have provided. Environment variables narrow what loads:

* ``CONCEPTEDIT_LOAD_PLUGINS=a,b`` loads only these entry points or distributions (empty: none);
* ``CONCEPTEDIT_DISABLE_PLUGINS=a,b`` blocks these;
* ``CONCEPTEDIT_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from conceptedit.api import hooks
from conceptedit.api.paths import path_text_problem, shown
from conceptedit.errors import PluginError, UnknownMethodError, UnknownSuiteError

if TYPE_CHECKING:
    from conceptedit.api.backbone import BackboneAdapter
    from conceptedit.api.concepts import ConceptSource
    from conceptedit.api.evaluator import Evaluator
    from conceptedit.api.export import Exporter
    from conceptedit.api.method import EditMethod
    from conceptedit.api.suite import PromptSuite

ENTRY_POINT_GROUP = "conceptedit"
#: Engine modules that register engine-level defaults (backbones, exporters) as plugins.
CORE_PLUGINS = ("conceptedit.models.defaults", "conceptedit.io.exporters")


@dataclass
class PluginInfo:
    """One plugin as ``conceptedit plugins`` shows it."""

    name: str
    source: str  # "core", "entry point", "path", "registered"
    location: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)


@dataclass
class Registry:
    """What the loaded plugins registered."""

    methods: dict[str, type[EditMethod]] = field(default_factory=dict)
    method_origin: dict[str, str] = field(default_factory=dict)
    backbones: list[type[BackboneAdapter]] = field(default_factory=list)
    exporters: dict[str, Exporter] = field(default_factory=dict)
    evaluators: dict[str, type[Evaluator]] = field(default_factory=dict)
    suites: dict[str, type[PromptSuite]] = field(default_factory=dict)
    concept_sources: dict[str, type[ConceptSource[Any]]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)


class PluginHost:
    """A pluggy manager plus bookkeeping of where each plugin came from and what failed."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hooks.PROJECT_NAME)
        self.pm.add_hookspecs(hooks)
        self._infos: dict[str, PluginInfo] = {}
        self._origins: dict[tuple[str, str], str] = {}  # (source, where from) -> plugin name
        self._registry: Registry | None = None
        if os.environ.get("CONCEPTEDIT_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda msg: print(msg, file=sys.stderr, end=""))
            self.pm.enable_tracing()

    # loading ------------------------------------------------------------------------

    def load_core(self) -> None:
        for module_name in CORE_PLUGINS:
            module = importlib.import_module(module_name)
            self._register(module, module_name, PluginInfo(module_name, "core", module_name))

    def load_entry_points(self, distributions: Iterable[Any] | None = None) -> None:
        """Load every ``conceptedit`` entry point, honouring the environment filters."""
        only = _env_list("CONCEPTEDIT_LOAD_PLUGINS")
        blocked = set(_env_list("CONCEPTEDIT_DISABLE_PLUGINS") or [])
        dists = importlib.metadata.distributions() if distributions is None else distributions
        for dist in dists:
            dist_name = dist.metadata["Name"] or "?"
            for ep in dist.entry_points:
                origin = ("entry point", f"{dist_name}:{ep.name}")
                if ep.group != ENTRY_POINT_GROUP or origin in self._origins:
                    continue  # a distribution found twice on sys.path loads once
                names = {ep.name, dist_name}
                if (only is not None and not names & set(only)) or names & blocked:
                    continue
                name = self._free_name(ep.name)  # two distributions may use the same entry-point name
                self._origins[origin] = name
                info = PluginInfo(name, "entry point", ep.value, dist_name, dist.version)
                try:
                    module = ep.load()
                except Exception as exc:  # a broken plugin must not take the host down
                    info.error = _describe(exc)
                    self._infos[name] = info
                    continue
                self._register(module, name, info)

    def load_path(self, path: str | Path, base: Path | None = None) -> None:
        """Load a plugin from a ``.py`` file, or every ``.py`` file in a folder."""
        problem = path_text_problem(str(path))
        if problem is not None:
            raise PluginError(f"plugin path {shown(str(path))}: the path {problem}")
        target = Path(path).expanduser()
        if base is not None and not target.is_absolute():
            target = base / target
        if target.is_dir():
            for file in sorted(target.glob("*.py")):
                self.load_path(file)
            return
        if not target.is_file():
            raise PluginError(f"plugin path {str(path)!r} does not exist (looked for {target})")
        origin = ("path", str(target.resolve()))
        if origin in self._origins:
            return  # named by both a recipe and --plugins-dir, or a recipe applied twice: load once
        name = self._free_name(target.stem)  # my_edit.py in two folders: my_edit, my_edit-2
        module_name = f"conceptedit_local_{name.replace('-', '_')}"
        spec = importlib.util.spec_from_file_location(module_name, target)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin path {target} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise PluginError(f"plugin file {target} failed to import: {_describe(exc)}") from exc
        self._origins[origin] = name
        self._register(module, name, PluginInfo(name, "path", str(target)))

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin object (tests, notebooks); returns the name it got.

        Two objects of one class (two recorders, say) both register: the second gets
        ``Name-2``. Registering the same object again does nothing.
        """
        existing = self.pm.get_name(plugin)
        if existing is not None:
            return existing
        label = self._free_name(name or getattr(plugin, "__name__", None) or type(plugin).__name__)
        self._register(plugin, label, PluginInfo(label, "registered", repr(plugin)))
        return label

    def unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._infos.pop(name, None)
        self._origins = {k: v for k, v in self._origins.items() if v != name}
        self._registry = None

    def _free_name(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``... when another plugin already has it."""
        candidate, n = name, 1
        while candidate in self._infos or self.pm.has_plugin(candidate):
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def _register(self, plugin: object, name: str, info: PluginInfo) -> None:
        if self.pm.is_registered(plugin):
            return  # two entry points naming one module
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            info.error = f"invalid plugin: {exc}"
        info.hooks = sorted(h.name for h in (self.pm.get_hookcallers(plugin) or []))
        self._infos[name] = info
        self._registry = None

    # registries ---------------------------------------------------------------------

    @property
    def infos(self) -> dict[str, PluginInfo]:
        """Every plugin by name, failed ones included; ``provides`` and errors are up to date."""
        _ = self.registry  # registering can fail or add methods: collect before reporting
        return self._infos

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> Registry:
        # A plugin whose registration hook raises is failed as a whole: it is unregistered (so
        # its lifecycle hooks never run either) and the registries are collected again without it.
        while True:
            reg, failed = self._collect_once()
            if not failed:
                return reg
            for name in failed:
                if self.pm.has_plugin(name):
                    self.pm.unregister(name=name)
                if name in self._infos:
                    self._infos[name].hooks = []

    def _collect_once(self) -> tuple[Registry, set[str]]:
        # Walk implementations in registration order (pluggy would call them last-first) so
        # each registration is attributed to its plugin and later plugins override earlier ones.
        reg = Registry()
        failed: set[str] = set()
        for info in self._infos.values():
            info.provides = []
        for hook, field_name, check in REGISTRATION_HOOKS:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                found = self._registrations(impl, check)
                if found is None:
                    failed.add(impl.plugin_name)
                for obj in found or []:
                    self._add(reg, field_name, obj, impl.plugin_name)
        # later registrations are tried first, so a plugin can take over a built-in family
        reg.backbones.reverse()
        return reg, failed

    def _registrations(self, impl: pluggy.HookImpl, check: Callable[[Any, str], Any] | None = None) -> list[Any] | None:
        """What one plugin's registration hook registers; None (plugin recorded as failed) if it raises."""
        found: list[Any] = []

        def register(obj: Any) -> None:
            found.append(check(obj, impl.plugin_name) if check else obj)

        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except Exception as exc:  # a plugin's bug must not take every command down
            info = self._infos.get(impl.plugin_name)
            if info is not None:
                info.error = f"{impl.function.__name__} raised {_describe(exc)}"
            return None
        return found

    def _add(self, reg: Registry, field_name: str, obj: Any, origin: str) -> None:
        """File one registered object: backbones in a list, the rest by name (methods with provenance)."""
        if field_name == "methods":
            self._add_method(reg, obj, origin)
            return
        entries = getattr(reg, field_name)
        if isinstance(entries, list):
            entries.append(obj)
        else:
            entries[obj.name] = obj
        info = self._infos.get(origin)
        if field_name in PROVIDES_LABELS and info is not None:
            label = PROVIDES_LABELS[field_name].format(obj.name)
            if label not in info.provides:
                info.provides.append(label)

    def _add_method(self, reg: Registry, cls: type[EditMethod], origin: str) -> None:
        info = self._infos.get(origin)
        if cls.name in reg.methods and reg.methods[cls.name] is not cls:
            reg.conflicts.append(
                f"method {cls.name!r} is registered by both {reg.method_origin[cls.name]!r} and {origin!r}; "
                f"using {origin!r}"
            )
        reg.methods[cls.name] = cls
        reg.method_origin[cls.name] = origin
        if info is not None and cls.name not in info.provides:
            info.provides.append(cls.name)

    # queries ------------------------------------------------------------------------

    def method(self, name: str) -> type[EditMethod]:
        methods = self.registry.methods
        if name in methods:
            return methods[name]
        raise UnknownMethodError(self.explain_missing_method(name))

    def suite(self, name: str) -> type[PromptSuite]:
        suites = self.registry.suites
        if name in suites:
            return suites[name]
        from difflib import get_close_matches

        text = f"no installed plugin provides prompt suite {name!r}"
        close = get_close_matches(name, list(suites), n=1)
        text += f"; did you mean {close[0]!r}?" if close else f"; installed: {', '.join(sorted(suites)) or 'none'}"
        note = self.failure_note()
        raise UnknownSuiteError(f"{text}; {note}" if note else text)

    def explain_missing_method(self, name: str) -> str:
        from difflib import get_close_matches

        text = f"no installed plugin provides edit method {name!r}"
        close = get_close_matches(name, list(self.registry.methods), n=1)
        if close:
            text += f"; did you mean {close[0]!r}?"
        note = self.failure_note()
        return f"{text}; {note}" if note else text

    def failure_note(self) -> str | None:
        """``plugins that failed to load: NAME (ERROR), ...``, or None: for messages about a missing method."""
        broken = self.failed()
        if not broken:
            return None
        return "plugins that failed to load: " + ", ".join(f"{i.name} ({i.error})" for i in broken)

    def failed(self) -> list[PluginInfo]:
        return [info for info in self.infos.values() if info.error]


def _check_method(cls: Any, origin: str) -> type[EditMethod]:
    """``cls`` if it is a usable method class; a :class:`PluginError` naming the plugin if not."""
    from conceptedit.api.method import EditMethod

    if not (isinstance(cls, type) and issubclass(cls, EditMethod)):
        raise PluginError(f"plugin {origin!r} registered {cls!r}, which is not an EditMethod subclass")
    for attr in ("name", "summary", "kind"):
        if not getattr(cls, attr, None):
            raise PluginError(f"method class {cls.__qualname__} from plugin {origin!r} must set `{attr}`")
    return cls


def _check_concept_source(cls: Any, origin: str) -> type[ConceptSource[Any]]:
    """``cls`` if it is a usable concept source class; a :class:`PluginError` naming the plugin if not."""
    from pydantic import BaseModel

    from conceptedit.api.concepts import ConceptSource

    if not (isinstance(cls, type) and issubclass(cls, ConceptSource)):
        raise PluginError(f"plugin {origin!r} registered {cls!r}, which is not a ConceptSource subclass")
    for attr in ("name", "summary"):
        if not getattr(cls, attr, None):
            raise PluginError(f"concept source class {cls.__qualname__} from plugin {origin!r} must set `{attr}`")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)) or "source" in options.model_fields:
        raise PluginError(
            f"concept source class {cls.__qualname__} from plugin {origin!r}: `Options` must be a pydantic model "
            "(a ConceptSourceOptions subclass) without a `source` field"
        )
    return cls


#: How ``conceptedit plugins`` lists what a plugin registered into these registries (methods
#: are listed by bare name, see ``_add_method``).
PROVIDES_LABELS: dict[str, str] = {"concept_sources": "concept source {}"}

#: The registration hooks, collected in this order: (hook, the :class:`Registry` field it fills,
#: the check each registered object passes first, or None).
REGISTRATION_HOOKS: tuple[tuple[str, str, Callable[[Any, str], Any] | None], ...] = (
    ("conceptedit_register_methods", "methods", _check_method),
    ("conceptedit_register_backbones", "backbones", None),
    ("conceptedit_register_exporters", "exporters", None),
    ("conceptedit_register_evaluators", "evaluators", None),
    ("conceptedit_register_suites", "suites", None),
    ("conceptedit_register_concept_sources", "concept_sources", _check_concept_source),
)


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe(exc: BaseException) -> str:
    """``Type: message (file.py:line)``, pointing at the plugin's line rather than at this module."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    frame = frames[-1] if frames else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


_host: PluginHost | None = None


def get_host(*, reload: bool = False) -> PluginHost:
    """The process-wide plugin host, loading core plugins and entry points on first use."""
    global _host
    if _host is None or reload:
        host = PluginHost()
        host.load_core()
        host.load_entry_points()
        _host = host
    return _host


def set_host(host: PluginHost | None) -> None:
    """Replace the process-wide host (tests use this to isolate plugin sets)."""
    global _host
    _host = host


def new_host(*, entry_points: bool = True) -> PluginHost:
    """A fresh host with the core plugins, and entry points unless told otherwise."""
    host = PluginHost()
    host.load_core()
    if entry_points:
        host.load_entry_points()
    return host
