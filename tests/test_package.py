"""The package surface: public names, and no module shadowed by a public attribute."""

import importlib
import pkgutil
import types

import pytest

import ppzoo


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(ppzoo.__path__, prefix="ppzoo.") if "pytest_plugin" not in m.name
    )


@pytest.mark.parametrize("name", _modules())
def test_every_module_imports_as_itself(name):
    """``importlib.import_module("ppzoo.X")`` and ``import ppzoo.X as m`` both give the module."""
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType) and module.__name__ == name
    parent, _, attr = name.rpartition(".")
    assert getattr(importlib.import_module(parent), attr) is module, f"{name} is shadowed by a public name"


def test_public_functions_are_functions():
    import ppzoo.build
    import ppzoo.planner
    import ppzoo.registry
    import ppzoo.runtime

    assert ppzoo.plan is ppzoo.planner.plan
    assert ppzoo.adapters is ppzoo.registry.adapters
    assert ppzoo.pipeline is ppzoo.build.pipeline and ppzoo.Pipeline is ppzoo.runtime.Pipeline
    assert set(ppzoo.__all__) <= set(dir(ppzoo)) | {"pipeline", "Pipeline", "RankError"}


def test_monkeypatch_reaches_a_module_by_name(monkeypatch):
    monkeypatch.setattr("ppzoo.split._SEARCH_ACTIONS", 7)
    assert importlib.import_module("ppzoo.split")._SEARCH_ACTIONS == 7


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ppzoo.nope  # noqa: B018
