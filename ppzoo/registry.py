"""The plugin registry: the only code that calls ``pm.hook.*``.

Built-in adapter modules are registered first, then every entry point in the group ``ppzoo``.
pluggy calls the last registered plugin first, and when two plugins register an adapter for the
same model type the later one wins, with a warning naming both. Plugins load lazily, once.

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
from dataclasses import dataclass
from typing import Any, Iterator

import pluggy

from ppzoo import hookspecs
from ppzoo.adapter import Adapter

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginError",
    "UnknownArchitectureError",
    "ValidationError",
    "adapter_for",
    "adapters",
    "plugin",
    "reset",
    "validate",
]

ENTRY_POINT_GROUP = "ppzoo"
BUILTIN_PLUGINS: tuple[str, ...] = (
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
)


class PluginError(RuntimeError):
    """A plugin failed to load, to register, or broke the hook contract."""


class UnknownArchitectureError(ValueError):
    """No registered adapter handles a config."""


class ValidationError(ValueError):
    """A config or plan breaks one or more adapter rules; ``problems`` lists them all."""

    def __init__(self, problems: list[str], *, model_type: str | None = None):
        self.problems = list(problems)
        head = f"ppzoo cannot run this {model_type or 'model'} as configured:"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


@dataclass(frozen=True)
class _Entry:
    adapter: Adapter
    source: str  # who registered it, e.g. "ppzoo (built-in ppzoo.architectures.llama)"


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("ppzoo")
        self.pm.add_hookspecs(hookspecs)
        self.sources: dict[object, str] = {}
        self.entries: dict[object, list[_Entry]] = {}  # per plugin, in registration order
        self.by_name: dict[str, _Entry] = {}
        self.by_model_type: dict[str, _Entry] = {}
        self._load()

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        blocked = {n.strip() for n in os.environ.get("PPZOO_BLOCK_PLUGINS", "").split(",") if n.strip()}
        for modname in BUILTIN_PLUGINS:
            if modname in blocked or modname.rsplit(".", 1)[-1] in blocked:
                continue
            module = importlib.import_module(modname)
            self._register_plugin(module, modname, f"ppzoo (built-in {modname})")
        if os.environ.get("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0"):
            return
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked:
                continue
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            source = f"{dist} (entry point {ep.name!r} = {ep.value})"
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"ppzoo plugin {source} failed to import: {type(exc).__name__}: {exc}. "
                    f"Fix or uninstall {dist}, or skip it with PPZOO_BLOCK_PLUGINS={ep.name}."
                ) from exc
            self._register_plugin(plugin, ep.name, source)

    def _register_plugin(self, plugin: object, name: str, source: str) -> None:
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise PluginError(f"ppzoo plugin {source} is invalid: {exc}") from exc
        self.sources[plugin] = source
        added = self.entries[plugin] = []
        for impl in self.pm.hook.ppzoo_register_adapters.get_hookimpls():
            if impl.plugin is plugin:
                try:
                    impl.function(register=lambda a, _s=source: added.append(self._add_adapter(a, _s)))
                except Exception as exc:
                    # NOTE: a half-registered plugin would stay in the hook tables and break
                    # every later lookup; drop it and what it registered before failing.
                    self._unregister_plugin(plugin)
                    if isinstance(exc, PluginError):
                        raise
                    raise PluginError(
                        f"ppzoo plugin {source} raised while registering adapters: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc

    def _unregister_plugin(self, plugin: object) -> None:
        self.sources.pop(plugin, None)
        self.entries.pop(plugin, None)
        self.pm.unregister(plugin)
        # Rebuild the adapter tables from what the remaining plugins registered, in order; the
        # adapter objects stay the same, so references held elsewhere remain valid.
        self.by_name.clear()
        self.by_model_type.clear()
        for entries in self.entries.values():
            for entry in entries:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._add_adapter(entry.adapter, entry.source)

    def _add_adapter(self, adapter: Adapter, source: str) -> _Entry:
        if not isinstance(adapter, Adapter):
            raise PluginError(
                f"ppzoo plugin {source} registered {adapter!r}, which is not a ppzoo.Adapter instance"
            )
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
_registry: _Registry | None = None


def _get() -> _Registry:
    global _registry
    with _lock:
        if _registry is None:
            _registry = _Registry()
        return _registry


def reset() -> None:
    """Forget loaded plugins; the next call loads them again (reads the environment anew)."""
    global _registry
    with _lock:
        _registry = None


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
    reg = _get()
    claimed = reg.pm.hook.ppzoo_adapter_for(config=config)
    if claimed is not None:
        return claimed
    model_type = getattr(config, "model_type", None)
    if model_type in reg.by_model_type:
        return reg.by_model_type[model_type].adapter
    for arch in getattr(config, "architectures", None) or ():
        for entry in reg.by_name.values():
            if arch in entry.adapter.architectures:
                return entry.adapter
    for entry in reg.by_name.values():
        if entry.adapter.fallback and entry.adapter.matches(config):
            return entry.adapter
    known = ", ".join(sorted(reg.by_model_type)) or "none"
    raise UnknownArchitectureError(
        f"no ppzoo adapter for model_type {model_type!r}; registered: {known}. "
        "Write an Adapter subclass and register it from a plugin "
        "(entry point group 'ppzoo') — see docs/adapters.md."
    )


def validate(config: Any, plan: Any = None, *, adapter: Adapter | None = None) -> None:
    """Run the adapter's rules and every plugin's ``ppzoo_validate``; raise all problems at once.

    Raises:
        ValidationError: one or more rules failed; the message lists every problem.
    """
    reg = _get()
    adapter = adapter or adapter_for(config)
    problems = list(adapter.validate(config, plan))
    for extra in reg.pm.hook.ppzoo_validate(config=config, plan=plan):
        problems.extend(extra or ())
    if problems:
        raise ValidationError(problems, model_type=getattr(config, "model_type", None))


@contextlib.contextmanager
def plugin(obj: object, name: str | None = None) -> Iterator[object]:
    """Register ``obj`` as a plugin for the duration of a ``with`` block (tests, notebooks)."""
    reg = _get()
    name = name or getattr(obj, "__name__", None) or f"plugin-{id(obj)}"
    reg._register_plugin(obj, name, f"{name} (registered at run time)")
    try:
        yield obj
    finally:
        reg._unregister_plugin(obj)
