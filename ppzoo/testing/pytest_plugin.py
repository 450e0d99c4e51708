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
marker) or test ids; each becomes a strict xfail with its reason, as does every entry of an
adapter's own ``Adapter.expected_failures`` (which ``ppzoo check`` honours too); ``select=[...]``
runs only the named checks. Checks the adapter's capabilities rule out are skipped with the reason.
``ppzoo.testing.parametrize.parametrize_with_checks(...)`` takes the same arguments as a decorator
(for a module that enables the plugin itself, where the marker would be unknown at import time).

The ``ppzoo_plugin`` fixture registers plugins for one test and always unregisters them.
"""

from __future__ import annotations

import contextlib
import json
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ppzoo import registry
from ppzoo.adapter import Adapter
from ppzoo.testing.parametrize import MARKER, ConformanceCase, case_params
from ppzoo.testing.step import check_distributed_step, distributed_step_problems

__all__ = ["ppzoo_case", "ppzoo_plugin"]
_STEP_PROBLEMS = pytest.StashKey[dict]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*adapters, expected_failures=None, select=None): adapters (names or Adapter "
        "instances) the ppzoo conformance checks run on; expected_failures maps a check name or test "
        "id to a reason; select names the checks to run (default all)",
    )
    config.addinivalue_line(
        "markers", "distributed: starts processes; the conformance kit's distributed_step cases carry it"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "ppzoo_case" not in metafunc.fixturenames or _parametrized_by_hand(metafunc):
        return
    marker = metafunc.definition.get_closest_marker(MARKER)
    refs = list(marker.args) if marker and marker.args else list(registry.adapters())
    kwargs = dict(marker.kwargs) if marker else {}
    metafunc.parametrize("ppzoo_case", case_params(refs, **kwargs), indirect=True)


def _parametrized_by_hand(metafunc: pytest.Metafunc) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if "ppzoo_case" in (names if isinstance(names, (list, tuple)) else [n.strip() for n in names.split(",")]):
            return True
    return False


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
