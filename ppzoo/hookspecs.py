"""The ppzoo plugin hooks.

A plugin is any module or object with functions decorated by :data:`hookimpl` whose names match
the specs below. Built-in adapters are plugins too (``ppzoo.architectures.*``), and so are ppzoo's own
validation rules (``ppzoo.rules``); third-party packages are discovered through the entry-point
group ``ppzoo``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ppzoo.adapter import Adapter
    from ppzoo.planner import Plan
    from ppzoo.validation import Problem, Settings

__all__ = ["hookspec", "hookimpl", "ppzoo_register_adapters", "ppzoo_adapter_for", "ppzoo_validate"]

hookspec = pluggy.HookspecMarker("ppzoo")
hookimpl = pluggy.HookimplMarker("ppzoo")


@hookspec
def ppzoo_register_adapters(register: Callable[[Adapter], None]) -> None:
    """Register the adapters this plugin provides by calling ``register(adapter)`` for each."""


@hookspec(firstresult=True)
def ppzoo_adapter_for(config: Any) -> Adapter | None:
    """Claim a model config that matching by ``model_type`` / ``architectures`` would not.

    Return the adapter that handles ``config``, or None to let other plugins and the built-in
    matching decide. Stops at the first non-None result.
    """


@hookspec
def ppzoo_validate(config: Any, adapter: Adapter, plan: Plan | None, settings: Settings) -> list[Problem] | None:
    """Return the problems that make ``config`` unusable with ``adapter`` under ``plan`` and ``settings``.

    Every plugin may add rules; ppzoo's own are a built-in plugin too (:mod:`ppzoo.rules`, called
    first), and all problems from all plugins are reported together, before any process group
    communication. Each is a :class:`ppzoo.validation.Problem` with a stable ``code``.
    ``plan`` is None before the split exists; ``settings`` (:class:`ppzoo.validation.Settings`)
    holds the run settings, with None for what is not known yet.
    """
