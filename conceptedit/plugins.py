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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from conceptedit import hookspecs
from conceptedit.errors import PluginError, UnknownMethodError

if TYPE_CHECKING:
    from conceptedit.exporters import Exporter
    from conceptedit.methods import EditMethod
    from conceptedit.models.backbone import BackboneAdapter

ENTRY_POINT_GROUP = "conceptedit"
#: Engine modules that register engine-level defaults (backbones, exporters) as plugins.
CORE_PLUGINS = ("conceptedit.models.defaults", "conceptedit.exporters")


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
    conflicts: list[str] = field(default_factory=list)


class PluginHost:
    """A pluggy manager plus bookkeeping of where each plugin came from and what failed."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
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
        seen: set[tuple[str, str]] = set()
        for dist in dists:
            dist_name = dist.metadata["Name"] or "?"
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or (dist_name, ep.name) in seen:
                    continue
                seen.add((dist_name, ep.name))
                names = {ep.name, dist_name}
                if (only is not None and not names & set(only)) or names & blocked:
                    continue
                info = PluginInfo(ep.name, "entry point", ep.value, dist_name, dist.version)
                try:
                    module = ep.load()
                except Exception as exc:  # a broken plugin must not take the host down
                    info.error = _describe(exc)
                    self.infos[ep.name] = info
                    continue
                self._register(module, ep.name, info)

    def load_path(self, path: str | Path, base: Path | None = None) -> None:
        """Load a plugin from a ``.py`` file, or every ``.py`` file in a folder."""
        target = Path(path).expanduser()
        if base is not None and not target.is_absolute():
            target = base / target
        if target.is_dir():
            for file in sorted(target.glob("*.py")):
                self.load_path(file)
            return
        if not target.is_file():
            raise PluginError(f"plugin path {str(path)!r} does not exist (looked for {target})")
        name = f"conceptedit_local_{target.stem}"
        info = PluginInfo(target.stem, "path", str(target))
        spec = importlib.util.spec_from_file_location(name, target)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin path {target} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise PluginError(f"plugin file {target} failed to import: {_describe(exc)}") from exc
        self._register(module, target.stem, info)

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register an in-process plugin object (tests, notebooks)."""
        label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        self._register(plugin, label, PluginInfo(label, "registered", repr(plugin)))
        return label

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._registry = None

    def _register(self, plugin: object, name: str, info: PluginInfo) -> None:
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            return
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            info.error = f"invalid plugin: {exc}"
        info.hooks = sorted(h.name for h in (self.pm.get_hookcallers(plugin) or []))
        self.infos[name] = info
        self._registry = None

    # registries ---------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> Registry:
        # Walk implementations in registration order (pluggy would call them last-first) so
        # each registration is attributed to its plugin and later plugins override earlier ones.
        reg = Registry()
        hooks = self.pm.hook
        for impl in hooks.conceptedit_register_methods.get_hookimpls():
            info = self.infos.get(impl.plugin_name)
            impl.function(
                register=lambda cls, origin=impl.plugin_name, info=info: self._add_method(reg, cls, origin, info)
            )
        for impl in hooks.conceptedit_register_backbones.get_hookimpls():
            impl.function(register=reg.backbones.append)
        for impl in hooks.conceptedit_register_exporters.get_hookimpls():
            impl.function(register=lambda exp: reg.exporters.__setitem__(exp.name, exp))
        # later registrations are tried first, so a plugin can take over a built-in family
        reg.backbones.reverse()
        return reg

    def _add_method(self, reg: Registry, cls: type[EditMethod], origin: str, info: PluginInfo | None) -> None:
        from conceptedit.methods import EditMethod

        if not (isinstance(cls, type) and issubclass(cls, EditMethod)):
            raise PluginError(f"plugin {origin!r} registered {cls!r}, which is not an EditMethod subclass")
        for attr in ("name", "summary", "kind"):
            if not getattr(cls, attr, None):
                raise PluginError(f"method class {cls.__qualname__} from plugin {origin!r} must set `{attr}`")
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

    def explain_missing_method(self, name: str) -> str:
        from difflib import get_close_matches

        text = f"no installed plugin provides edit method {name!r}"
        close = get_close_matches(name, list(self.registry.methods), n=1)
        if close:
            text += f"; did you mean {close[0]!r}?"
        broken = [i for i in self.infos.values() if i.error]
        if broken:
            text += "; plugins that failed to load: " + ", ".join(f"{i.name} ({i.error})" for i in broken)
        return text

    def failed(self) -> list[PluginInfo]:
        return [info for info in self.infos.values() if info.error]


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
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
