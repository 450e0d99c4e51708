"""The plugin registry: the only code that calls ``pm.hook.*``.

:class:`PluginManager` is pluggy's, as pytest's is: built-in modules are registered first
(:data:`BUILTIN_PLUGINS`, ppzoo's own validation rules before the adapters), then every entry point
of the group ``ppzoo`` through pluggy's ``load_setuptools_entrypoints``, then ``check_pending()``.
Blocking is pluggy's ``set_blocked``, and the distribution behind an entry point is pluggy's
``list_plugin_distinfo()``. pluggy calls the last registered plugin first; when two plugins
register an adapter for the same model type the later one wins, with a warning naming both.
Plugins load lazily, once.

Environment:
    PPZOO_DISABLE_PLUGIN_AUTOLOAD=1   load built-ins only, no entry points
    PPZOO_BLOCK_PLUGINS=a,b           skip the entry points (or built-in modules) named a and b
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pluggy

from ppzoo import hookspecs
from ppzoo.adapter import Adapter
from ppzoo.capabilities import parse_capabilities
from ppzoo.validation import Problem, Settings, ValidationError

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "ESSENTIAL_PLUGINS",
    "PluginError",
    "PluginManager",
    "UnknownArchitectureError",
    "ValidationError",
    "adapter_for",
    "adapter_source",
    "adapters",
    "plugin",
    "problems",
    "reset",
    "validate",
]

ENTRY_POINT_GROUP = "ppzoo"
#: built-in plugins that cannot be blocked: without them nothing checks a config before it runs
ESSENTIAL_PLUGINS: tuple[str, ...] = ("ppzoo.rules",)
BUILTIN_PLUGINS: tuple[str, ...] = ESSENTIAL_PLUGINS + (
    "ppzoo.architectures.llama",
    "ppzoo.architectures.mistral",
    "ppzoo.architectures.qwen2",
    "ppzoo.architectures.gemma",
    "ppzoo.architectures.phi3",
    "ppzoo.architectures.olmo2",
    "ppzoo.architectures.granite",
    "ppzoo.architectures.mixtral",
    "ppzoo.architectures.qwen_moe",
    "ppzoo.architectures.generic",
    "ppzoo.architectures.native",
)


class PluginError(RuntimeError):
    """A plugin failed to load, to register, or broke the hook contract."""


class UnknownArchitectureError(ValueError):
    """No registered adapter handles a config."""


@dataclass(frozen=True)
class _Entry:
    adapter: Adapter
    source: str  # who registered it, e.g. "ppzoo (built-in ppzoo.architectures.llama)"


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager for the ``ppzoo`` hooks, plus the adapters each plugin registers.

    Registering a plugin also checks its hooks (``check_pending``) and calls its
    ``ppzoo_register_adapters``; a plugin that fails either is unregistered again, with what it
    registered, and reported as a :class:`PluginError` naming it.
    """

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self.entries: dict[object, list[_Entry]] = {}  # per plugin, in registration order
        self.by_name: dict[str, _Entry] = {}
        self.by_model_type: dict[str, _Entry] = {}
        self._deferring = False

    # -- loading -------------------------------------------------------------------------------
    def load(self, *, autoload: bool, blocked: list[str]) -> None:
        """Block ``blocked``, register the built-ins, then (with ``autoload``) the entry points."""
        for name in blocked:
            self._block(name)
        for modname in BUILTIN_PLUGINS:
            if not self.is_blocked(modname):
                self.register(importlib.import_module(modname), modname)
        if autoload:
            self._load_entry_points()

    def _block(self, name: str) -> None:
        builtin = {m: m for m in BUILTIN_PLUGINS} | {m.rsplit(".", 1)[-1]: m for m in BUILTIN_PLUGINS}
        if builtin.get(name) in ESSENTIAL_PLUGINS:
            raise PluginError(
                f"PPZOO_BLOCK_PLUGINS names {name!r}: {builtin[name]} holds ppzoo's own validation rules and "
                "cannot be blocked; remove it from PPZOO_BLOCK_PLUGINS"
            )
        self.set_blocked(name)
        if name in builtin:
            self.set_blocked(builtin[name])

    def _load_entry_points(self) -> None:
        # NOTE: one entry point a time through pluggy's loader, so that a plugin failing to import
        # is named; its adapters are registered once pluggy has recorded its distribution.
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.is_blocked(ep.name) or self.get_plugin(ep.name) is not None:
                continue
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            source = f"{dist} (entry point {ep.name!r} = {ep.value})"
            self._deferring = True
            try:
                self.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
            except pluggy.PluginValidationError as exc:
                self._drop(self.get_plugin(ep.name))
                raise PluginError(f"ppzoo plugin {source} is invalid: {exc}") from exc
            except Exception as exc:
                raise PluginError(
                    f"ppzoo plugin {source} failed to import: {type(exc).__name__}: {exc}. "
                    f"Fix or uninstall {dist}, or skip it with PPZOO_BLOCK_PLUGINS={ep.name}."
                ) from exc
            finally:
                self._deferring = False
            loaded = self.get_plugin(ep.name)
            if loaded is not None:
                self._activate(loaded)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """pluggy's ``register``, then the plugin's hooks are checked and its adapters registered.

        Raises:
            PluginError: the plugin's hooks are invalid, or registering its adapters failed.
        """
        try:
            registered = super().register(plugin, name)
        except pluggy.PluginValidationError as exc:
            self._drop(plugin)
            if self._deferring:
                raise
            raise PluginError(f"ppzoo plugin {self._describe(plugin, name)} is invalid: {exc}") from exc
        if registered is not None and not self._deferring:
            self._activate(plugin)
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        """pluggy's ``unregister``; the adapters the plugin registered go with it."""
        removed = super().unregister(plugin, name)
        if removed is not None and self.entries.pop(removed, None):
            self._rebuild_tables()
        return removed

    def source(self, plugin: object) -> str:
        """Who provides ``plugin``: ``ppzoo (built-in ...)``, ``<dist> (entry point ...)`` or a run-time name."""
        return self._describe(plugin, self.get_name(plugin))

    def _describe(self, plugin: object, name: str | None) -> str:
        name = name or self.get_canonical_name(plugin)
        if name in BUILTIN_PLUGINS:
            return f"ppzoo (built-in {name})"
        for registered, dist in self.list_plugin_distinfo():
            if registered is plugin:
                value = next(
                    (ep.value for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP and ep.name == name), "?"
                )
                return f"{dist.project_name} (entry point {name!r} = {value})"
        return f"{name} (registered at run time)"

    def _activate(self, plugin: object) -> None:
        source = self.source(plugin)
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:
            self._drop(plugin)
            raise PluginError(f"ppzoo plugin {source} is invalid: {exc}") from exc
        added = self.entries[plugin] = []
        for impl in self.hook.ppzoo_register_adapters.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            register = lambda adapter: added.append(self._add_adapter(adapter, source))  # noqa: E731
            try:
                impl.function(**({"register": register} if "register" in impl.argnames else {}))
            except Exception as exc:
                # NOTE: a half-registered plugin would stay in the hook tables and break every
                # later lookup; drop it and what it registered before failing.
                self._drop(plugin)
                if isinstance(exc, PluginError):
                    raise
                raise PluginError(
                    f"ppzoo plugin {source} raised while registering adapters: {type(exc).__name__}: {exc}"
                ) from exc

    def _drop(self, plugin: object | None) -> None:
        """Forget a plugin that failed half-way (pluggy may hold part of it)."""
        if plugin is not None and self.is_registered(plugin):
            self.unregister(plugin)
        self.entries.pop(plugin, None)
        self._rebuild_tables()

    # -- adapters ------------------------------------------------------------------------------
    def _rebuild_tables(self) -> None:
        # NOTE: from what the remaining plugins registered, in order; the adapter objects stay
        # the same, so references held elsewhere remain valid.
        self.by_name.clear()
        self.by_model_type.clear()
        for entries in self.entries.values():
            for entry in entries:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._add_adapter(entry.adapter, entry.source)

    def _add_adapter(self, adapter: Adapter, source: str) -> _Entry:
        if not isinstance(adapter, Adapter):
            raise PluginError(f"ppzoo plugin {source} registered {adapter!r}, which is not a ppzoo.Adapter instance")
        try:
            # NOTE: the class was checked when defined; this catches capabilities set on the instance
            parse_capabilities(adapter.capabilities, owner=f"adapter {adapter.name!r}")
        except (TypeError, ValueError) as exc:
            raise PluginError(f"ppzoo plugin {source}: {exc}") from exc
        entry = _Entry(adapter, source)
        for model_type in adapter.model_types:
            previous = self.by_model_type.get(model_type)
            if previous is not None and previous.source != source:
                warnings.warn(
                    f"ppzoo: adapter {adapter.name!r} from {source} overrides adapter "
                    f"{previous.adapter.name!r} from {previous.source} for model_type {model_type!r}",
                    stacklevel=2,
                )
            self.by_model_type[model_type] = entry
        self.by_name[adapter.name] = entry
        return entry


_lock = threading.Lock()
_manager: PluginManager | None = None


def _get() -> PluginManager:
    global _manager
    with _lock:
        if _manager is None:
            manager = PluginManager()
            manager.load(
                autoload=os.environ.get("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "").strip() in ("", "0"),
                blocked=[n.strip() for n in os.environ.get("PPZOO_BLOCK_PLUGINS", "").split(",") if n.strip()],
            )
            _manager = manager
        return _manager


def reset() -> None:
    """Forget loaded plugins; the next call loads them again (reads the environment anew)."""
    global _manager
    with _lock:
        _manager = None


def adapters() -> dict[str, Adapter]:
    """Every registered adapter by name, in registration order."""
    return {name: entry.adapter for name, entry in _get().by_name.items()}


def adapter_source(adapter: Adapter) -> str:
    """Which plugin (distribution) registered ``adapter``."""
    for entry in _get().by_name.values():
        if entry.adapter is adapter:
            return entry.source
    return "unregistered"


def adapter_for(config: Any) -> Adapter:
    """The adapter that handles ``config``.

    A plugin's ``ppzoo_adapter_for`` hook decides first; then the registered adapters by
    ``model_type``, then by ``architectures``, then the fallback adapters (whose ``matches`` says
    whether they can take the config).

    Raises:
        UnknownArchitectureError: no adapter handles the config.
    """
    pm = _get()
    claimed = pm.hook.ppzoo_adapter_for(config=config)
    if claimed is not None:
        return claimed
    model_type = getattr(config, "model_type", None)
    if model_type in pm.by_model_type:
        return pm.by_model_type[model_type].adapter
    for arch in getattr(config, "architectures", None) or ():
        for entry in pm.by_name.values():
            if arch in entry.adapter.architectures:
                return entry.adapter
    for entry in pm.by_name.values():
        if entry.adapter.fallback and entry.adapter.matches(config):
            return entry.adapter
    known = ", ".join(sorted(pm.by_model_type)) or "none"
    raise UnknownArchitectureError(
        f"no ppzoo adapter for model_type {model_type!r}; registered: {known}. "
        "Write an Adapter subclass and register it from a plugin "
        "(entry point group 'ppzoo') — see docs/adapters.md."
    )


def problems(
    config: Any, plan: Any = None, *, adapter: Adapter | None = None, settings: Settings | None = None
) -> list[Problem]:
    """Every problem every plugin's ``ppzoo_validate`` finds (ppzoo's own rules first).

    Args:
        config: the model config.
        plan: the plan, or None before the split.
        adapter: the config's adapter (default: :func:`adapter_for`).
        settings: the run settings known so far (default: none known).

    Raises:
        PluginError: a rule returned something other than :class:`~ppzoo.validation.Problem` objects.
    """
    pm = _get()
    adapter = adapter or adapter_for(config)
    args = dict(config=config, adapter=adapter, plan=plan, settings=settings or Settings())
    found: list[Problem] = []
    for result in pm.hook.ppzoo_validate(**args):
        for problem in result or ():
            if not isinstance(problem, Problem):
                raise PluginError(
                    f"ppzoo plugin {_returning(pm, args, problem)} returned {problem!r} from ppzoo_validate; "
                    "return ppzoo.validation.Problem(code, message) objects — see docs/adapters.md"
                )
            found.append(problem)
    return found


def _returning(pm: PluginManager, args: dict, value: object) -> str:
    """Which plugin's ``ppzoo_validate`` returns ``value`` (asked again, on the error path only)."""
    for impl in pm.hook.ppzoo_validate.get_hookimpls():
        if value in (impl.function(**{k: args[k] for k in impl.argnames}) or ()):
            return pm.source(impl.plugin)
    return "(unknown)"


def validate(
    config: Any, plan: Any = None, *, adapter: Adapter | None = None, settings: Settings | None = None
) -> None:
    """Run every plugin's ``ppzoo_validate`` (ppzoo's own rules included); raise all problems at once.

    Args: as :func:`problems`.

    Raises:
        ValidationError: one or more rules failed; ``problems`` holds them, the message lists them.
    """
    found = problems(config, plan, adapter=adapter, settings=settings)
    if found:
        raise ValidationError(found, model_type=getattr(config, "model_type", None))


@contextlib.contextmanager
def plugin(obj: object, name: str | None = None) -> Iterator[object]:
    """Register ``obj`` as a plugin for the duration of a ``with`` block (tests, notebooks)."""
    pm = _get()
    pm.register(obj, name or getattr(obj, "__name__", None) or f"plugin-{id(obj)}")
    try:
        yield obj
    finally:
        if pm.is_registered(obj):
            pm.unregister(obj)
