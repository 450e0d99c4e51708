"""Conformance cases as pytest parameters: the ``ppzoo_adapters`` marker's arguments → ``pytest.param``s.

:mod:`ppzoo.testing.pytest_plugin` uses this for the marker; :func:`parametrize_with_checks` offers
the same as a decorator. Importing this module does not register the plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from ppzoo import registry
from ppzoo.adapter import Adapter
from ppzoo.testing.kit import CHECKS, Check, cases
from ppzoo.testing.step import check_distributed_step

__all__ = ["MARKER", "ConformanceCase", "case_params", "parametrize_with_checks"]

#: the marker that names the adapters a test checks
MARKER = "ppzoo_adapters"


class ConformanceCase:
    """A test's view of one check for one adapter; the adapter is looked up when the test runs,
    so a registry reset between collection and run does not leave a stale adapter object."""

    def __init__(self, adapter: str | Adapter, check: Check, *, skip: str | None = None):
        self._adapter = adapter
        self.check = check
        self.skip = skip
        self._step_problems: Callable[[], dict[str, list[str]]] | None = None

    @property
    def adapter(self) -> Adapter:
        if isinstance(self._adapter, Adapter):
            return self._adapter
        return _registered(self._adapter)

    @property
    def id(self) -> str:
        name = self._adapter if isinstance(self._adapter, str) else self._adapter.name
        return f"{name}-{self.check.name}"

    def run(self) -> None:
        """Run the check; raises ``AssertionError`` naming every problem when it fails."""
        adapter = self.adapter
        if self.check.function is check_distributed_step and self._step_problems is not None:
            check_distributed_step(adapter, problems=self._step_problems()[adapter.name])
        else:
            self.check.function(adapter)

    def __repr__(self) -> str:
        return f"<ConformanceCase {self.id}>"


def _registered(name: str) -> Adapter:
    found = registry.adapters()
    if name not in found:
        off = os.environ.get("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0")
        raise pytest.UsageError(
            f"{MARKER} names adapter {name!r}, which is not registered (registered: {', '.join(found) or 'none'}); "
            + ("entry points are off (PPZOO_DISABLE_PLUGIN_AUTOLOAD is set); " if off else "")
            + "install the package that provides it, or pass an Adapter instance"
        )
    return found[name]


def parametrize_with_checks(
    *adapters: str | Adapter, expected_failures: dict[str, str] | None = None, select: Sequence[str] | None = None
) -> pytest.MarkDecorator:
    """``@parametrize_with_checks(...)``: the ``ppzoo_adapters`` marker as a parametrize decorator.

    Takes the same arguments; use it where the marker cannot be registered before the test module
    is imported (the plugin enabled from that module rather than from ``conftest.py``).
    """
    return pytest.mark.parametrize(
        "ppzoo_case", case_params(list(adapters), expected_failures=expected_failures, select=select), indirect=True
    )


def case_params(
    refs: list[Any], *, expected_failures: dict[str, str] | None = None, select: Sequence[str] | None = None
) -> list:
    """One ``pytest.param`` per adapter and check, id ``<adapter>-<check>``, marked skip or strict xfail;
    the distributed step is also marked ``distributed`` (it starts processes)."""
    expected = dict(expected_failures or {})
    params, used = [], set()
    for ref in refs:
        if not isinstance(ref, (str, Adapter)):
            raise pytest.UsageError(f"{MARKER} takes adapter names or Adapter instances, got {ref!r}")
        adapter = ref if isinstance(ref, Adapter) else _registered(ref)
        mine = {}
        for key, reason in expected.items():
            check = key.removeprefix(f"{adapter.name}-")
            if key in {c.name for c in CHECKS} or key != check:
                mine[check] = reason
                used.add(key)
        for case in cases(adapter, expected_failures=mine, select=select):
            marks = []
            if case.skip:
                marks.append(pytest.mark.skip(reason=case.skip))
            if case.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
            if case.check.function is check_distributed_step:
                # NOTE: it starts a process group; ``-m "not distributed"`` leaves it out
                marks.append(pytest.mark.distributed)
            params.append(pytest.param(ConformanceCase(ref, case.check, skip=case.skip), id=case.id, marks=marks))
    unused = sorted(set(expected) - used)
    if unused:
        raise pytest.UsageError(
            f"{MARKER} expected_failures keys {unused} name no check of these adapters; "
            f"use a check name ({', '.join(c.name for c in CHECKS)}) or an '<adapter>-<check>' id"
        )
    return params
