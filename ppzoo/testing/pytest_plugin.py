"""An opt-in pytest plugin: the conformance kit as test items, and a temporary-plugin fixture.

Enable it explicitly (ppzoo never registers it through ``pytest11``), in a ``conftest.py`` or a test
module::

    pytest_plugins = ["ppzoo.testing.pytest_plugin"]     # or: pytest -p ppzoo.testing.pytest_plugin

Then every test that takes the argument ``ppzoo_case`` runs once per adapter and check, with ids
``<adapter>-<check>`` (select with ``-k cohere-stage_chain``)::

    pytestmark = pytest.mark.ppzoo_adapters("cohere", expected_failures={"buffers": "issue #12"})

    def test_conformance(ppzoo_case):
        ppzoo_case.run()

``ppzoo_adapters`` takes registered adapter names or ``Adapter`` instances; without the marker every
registered adapter is checked. ``expected_failures`` keys are check names (for every adapter of the
marker) or test ids; each becomes a strict xfail with its reason. Checks the adapter's capabilities
rule out are skipped with the reason.

The ``ppzoo_plugin`` fixture registers plugins for one test and always unregisters them.
"""

from __future__ import annotations

import contextlib
import json
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ppzoo import registry
from ppzoo.adapter import Adapter
from ppzoo.testing.kit import CHECKS, Check, checks
from ppzoo.testing.step import check_distributed_step, distributed_step_problems

__all__ = ["ppzoo_case", "ppzoo_plugin"]

_MARKER = "ppzoo_adapters"
_STEP_PROBLEMS = pytest.StashKey[dict]()


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
        raise pytest.UsageError(
            f"{_MARKER} names adapter {name!r}, which is not registered (registered: {', '.join(found) or 'none'}); "
            "install the package that provides it, or pass an Adapter instance"
        )
    return found[name]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(*adapters, expected_failures=None): adapters (names or Adapter instances) the "
        "ppzoo conformance checks run on; expected_failures maps a check name or test id to a reason",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "ppzoo_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker(_MARKER)
    refs: list[Any] = list(marker.args) if marker and marker.args else list(registry.adapters())
    expected: dict[str, str] = dict(marker.kwargs.get("expected_failures") or {}) if marker else {}
    params, used = [], set()
    for ref in refs:
        if not isinstance(ref, (str, Adapter)):
            raise pytest.UsageError(f"{_MARKER} takes adapter names or Adapter instances, got {ref!r}")
        adapter = ref if isinstance(ref, Adapter) else _registered(ref)
        mine = {}
        for key, reason in expected.items():
            check = key.removeprefix(f"{adapter.name}-")
            if key in {c.name for c in CHECKS} or key != check:
                mine[check] = reason
                used.add(key)
        for case in checks(adapter, expected_failures=mine):
            marks = []
            if case.skip:
                marks.append(pytest.mark.skip(reason=case.skip))
            if case.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
            params.append(pytest.param(ConformanceCase(ref, case.check, skip=case.skip), id=case.id, marks=marks))
    unused = sorted(set(expected) - used)
    if unused:
        raise pytest.UsageError(
            f"{_MARKER} expected_failures keys {unused} name no check of these adapters; "
            f"use a check name ({', '.join(c.name for c in CHECKS)}) or an '<adapter>-<check>' id"
        )
    metafunc.parametrize("ppzoo_case", params, indirect=True)


@pytest.fixture
def ppzoo_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ConformanceCase:
    """One conformance check for one adapter (parametrized by the plugin); call ``.run()``."""
    case: ConformanceCase = request.param
    case._step_problems = lambda: _session_step_problems(request.session, tmp_path_factory)
    return case


def _session_step_problems(session: pytest.Session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The distributed step problems of every adapter selected in this run, found in ONE process
    group: the first distributed item runs the group for all; with pytest-xdist the first worker
    to take the lock runs it and the others read its results."""
    found = session.config.stash.get(_STEP_PROBLEMS, None)
    if found is not None:
        return found
    adapters = {}
    for item in session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("ppzoo_case")
        if isinstance(case, ConformanceCase) and case.check.function is check_distributed_step and not case.skip:
            adapter = case.adapter
            adapters.setdefault(adapter.name, adapter)
    worker = getattr(session.config, "workerinput", None)
    if worker is None:
        found = _run_group(list(adapters.values()))
    else:
        from filelock import FileLock

        # NOTE: the base temp's parent is shared by the workers of one run; the run id keeps
        # results of earlier runs out.
        path = Path(tmp_path_factory.getbasetemp()).parent / f"ppzoo-step-{worker['testrunuid']}.json"
        with FileLock(f"{path}.lock"):
            if path.is_file():
                found = json.loads(path.read_text())
            else:
                found = _run_group(list(adapters.values()))
                path.write_text(json.dumps(found))
    session.config.stash[_STEP_PROBLEMS] = found
    return found


def _run_group(adapters: list[Adapter]) -> dict[str, list[str]]:
    try:
        return distributed_step_problems(adapters)
    except Exception:  # noqa: BLE001 - reported on every distributed item
        return {a.name: [f"the process group could not run:\n{traceback.format_exc()}"] for a in adapters}


@pytest.fixture
def ppzoo_plugin() -> Iterator[Callable[..., object]]:
    """``ppzoo_plugin(obj, name=None)`` registers ``obj`` as a ppzoo plugin until the test ends.

    The plugin is unregistered even when the test fails; registering a broken plugin raises
    ``ppzoo.registry.PluginError`` and leaves nothing behind.
    """
    with contextlib.ExitStack() as stack:

        def register(obj: object, name: str | None = None) -> object:
            return stack.enter_context(registry.plugin(obj, name))

        yield register
