"""The ppzoo plugin hooks.

A plugin is any module or object with functions decorated by :data:`hookimpl` whose names match
the specs below. Built-in adapters are plugins too (``ppzoo.architectures.*``); third-party packages are
discovered through the entry-point group ``ppzoo``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from ppzoo.adapter import Adapter
    from ppzoo.planner import Plan

__all__ = ["hookspec", "hookimpl", "ppzoo_register_adapters", "ppzoo_adapter_for", "ppzoo_validate"]

hookspec = pluggy.HookspecMarker("ppzoo")
hookimpl = pluggy.HookimplMarker("ppzoo")


@hookspec
def ppzoo_register_adapters(register: Callable[["Adapter"], None]) -> None:
    """Register the adapters this plugin provides by calling ``register(adapter)`` for each."""


@hookspec(firstresult=True)
def ppzoo_adapter_for(config: Any) -> "Adapter | None":
    """Claim a model config that matching by ``model_type`` / ``architectures`` would not.

    Return the adapter that handles ``config``, or None to let other plugins and the built-in
    matching decide. Stops at the first non-None result.
    """


@hookspec
def ppzoo_validate(config: Any, plan: "Plan | None") -> list[str] | None:
    """Return problems (one sentence each) that make ``config`` unusable under ``plan``.

    Every plugin may add rules; all problems from all plugins are reported together.
    ``plan`` is None when validating a config before any plan exists.
    """
