"""Third-party plugins: discovery through the ``ppzoo`` entry-point group, overrides, the
environment switches, broken plugins, and the hook reference in docs/adapters.md.

Each test that needs entry points builds a real distribution on ``sys.path`` (a ``*.dist-info``
directory with ``METADATA`` and ``entry_points.txt`` next to the plugin module), which
``importlib.metadata`` discovers like an installed package.
"""

import importlib.metadata
import inspect
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
from transformers import CohereConfig, LlamaConfig

import ppzoo
from ppzoo import hookspecs, registry
from ppzoo.architectures.llama import TINY
from ppzoo.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"

FAKEARCH = """
from ppzoo import hookimpl
from ppzoo.architectures.llama import LlamaAdapter

CALLS = []

class FakeArchAdapter(LlamaAdapter):
    name = "fakearch"
    model_types = ("fakearch",)

@hookimpl
def ppzoo_register_adapters(register):
    CALLS.append(1)
    register(FakeArchAdapter())
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, entry_name, source)``: a distribution whose entry point loads ``source``.

    Entry points are switched on (``tests/conftest.py`` switches them off by default) and the
    registry starts afresh; the modules are forgotten afterwards.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("PPZOO_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    modules = []

    def _install(dist: str, entry_name: str, source: str) -> str:
        module = f"{dist.replace('-', '_')}_{len(modules)}_{tmp_path.name}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[ppzoo]\n{entry_name} = {module}\n")
        modules.append(module)
        return module

    registry.reset()
    yield _install
    for module in modules:
        sys.modules.pop(module, None)
    registry.reset()


def test_an_installed_plugin_is_discovered_through_its_entry_point(install, capsys):
    module = install("ppzoo-fakearch", "fakearch", FAKEARCH)
    adapter = ppzoo.adapter_for(types.SimpleNamespace(model_type="fakearch"))
    assert type(adapter).__name__ == "FakeArchAdapter"
    assert registry.adapter_source(adapter) == f"ppzoo-fakearch (entry point 'fakearch' = {module})"
    assert main(["list"]) == 0
    assert f"fakearch       fakearch                         ppzoo-fakearch (entry point 'fakearch' = {module})" in (
        capsys.readouterr().out.splitlines()
    )


def test_plugins_load_lazily_and_once(install):
    module = install("ppzoo-fakearch", "fakearch", FAKEARCH)
    assert module not in sys.modules
    for _ in range(3):
        registry.adapters()
        ppzoo.adapter_for(types.SimpleNamespace(model_type="fakearch"))
    assert sys.modules[module].CALLS == [1]


def test_the_example_package_is_discovered_when_installed(monkeypatch):
    try:
        dist = importlib.metadata.distribution("ppzoo-cohere")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("examples/ppzoo-cohere is not installed (python -m pip install -e examples/ppzoo-cohere)")
    monkeypatch.delenv("PPZOO_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry.reset()
    (entry_point,) = [ep for ep in dist.entry_points if ep.group == "ppzoo"]
    adapter = ppzoo.adapter_for(CohereConfig())
    assert (adapter.name, type(adapter).__module__) == ("cohere", "ppzoo_cohere")
    assert registry.adapter_source(adapter) == f"ppzoo-cohere (entry point {entry_point.name!r} = {entry_point.value})"
    assert "tied_embeddings" in adapter.capabilities


def test_a_plugin_overrides_a_builtin_with_a_warning_naming_both_distributions(install):
    module = install(
        "ppzoo-llama-plus",
        "llama-plus",
        """
        from ppzoo import hookimpl
        from ppzoo.architectures.llama import LlamaAdapter

        class LlamaPlus(LlamaAdapter):
            name = "llama-plus"

        @hookimpl
        def ppzoo_register_adapters(register):
            register(LlamaPlus())
        """,
    )
    with pytest.warns(UserWarning) as warned:
        adapter = ppzoo.adapter_for(LlamaConfig())
    assert adapter.name == "llama-plus"
    assert [str(w.message) for w in warned] == [
        f"ppzoo: adapter 'llama-plus' from ppzoo-llama-plus (entry point 'llama-plus' = {module}) overrides "
        "adapter 'llama' from ppzoo (built-in ppzoo.architectures.llama) for model_type 'llama'"
    ]


def test_disable_autoload_loads_builtins_only(install, monkeypatch):
    module = install("ppzoo-fakearch", "fakearch", FAKEARCH)
    monkeypatch.setenv("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.reset()
    with pytest.raises(registry.UnknownArchitectureError) as raised:
        ppzoo.adapter_for(types.SimpleNamespace(model_type="fakearch"))
    assert "registered: " in str(raised.value) and "fakearch" not in str(raised.value).split("registered: ")[1]
    assert module not in sys.modules
    sources = {registry.adapter_source(a) for a in registry.adapters().values()}
    adapter_modules = set(registry.BUILTIN_PLUGINS) - set(registry.ESSENTIAL_PLUGINS)
    assert sources == {f"ppzoo (built-in {module})" for module in adapter_modules}
    monkeypatch.setenv("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "0")  # as in pytest: "0" leaves autoload on
    registry.reset()
    assert "fakearch" in registry.adapters()


def test_block_plugins_skips_named_entry_points_and_builtins(install, monkeypatch):
    blocked = install("ppzoo-fakearch", "fakearch", FAKEARCH)
    kept = install("ppzoo-other", "other", FAKEARCH.replace('"fakearch"', '"otherarch"'))
    monkeypatch.setenv("PPZOO_BLOCK_PLUGINS", "fakearch, mistral")
    registry.reset()
    names = set(registry.adapters())
    assert "otherarch" in names and kept in sys.modules
    assert "fakearch" not in names and blocked not in sys.modules
    assert "mistral" not in names and "llama" in names
    pm = registry._get()  # blocking is pluggy's: the names stay blocked, registering them is a no-op
    assert pm.is_blocked("fakearch") and pm.is_blocked("ppzoo.architectures.mistral")
    assert pm.register(types.ModuleType("late"), "fakearch") is None


@pytest.mark.parametrize("name", ["rules", "ppzoo.rules"])
def test_the_core_rules_cannot_be_blocked(install, monkeypatch, name):
    monkeypatch.setenv("PPZOO_BLOCK_PLUGINS", f"mistral,{name}")
    registry.reset()
    with pytest.raises(registry.PluginError) as raised:
        registry.adapters()
    assert str(raised.value) == (
        f"PPZOO_BLOCK_PLUGINS names {name!r}: ppzoo.rules holds ppzoo's own validation rules and cannot be blocked; "
        "remove it from PPZOO_BLOCK_PLUGINS"
    )


def test_the_distribution_of_an_entry_point_plugin_is_pluggys_distinfo(install):
    module = install("ppzoo-fakearch", "fakearch", FAKEARCH)
    pm = registry._get()
    (dist,) = [d for plugin, d in pm.list_plugin_distinfo() if plugin is sys.modules[module]]
    assert dist.project_name == "ppzoo-fakearch"
    assert pm.source(sys.modules[module]) == f"ppzoo-fakearch (entry point 'fakearch' = {module})"


def test_an_installed_plugins_rule_fires_with_its_code(install):
    install(
        "ppzoo-site-rules",
        "site-rules",
        """
        from ppzoo import hookimpl
        from ppzoo.validation import Problem

        @hookimpl
        def ppzoo_validate(config, settings):
            if settings.tp is not None and settings.tp > 1:
                return [Problem("site-no-tp", f"this cluster has no fast links for tp={settings.tp}; use tp=1")]
        """,
    )
    config = LlamaConfig(**TINY)
    assert ppzoo.plan(config, pp=2).num_stages == 2  # tp not known: the rule has nothing to say
    with pytest.raises(registry.ValidationError) as raised:
        ppzoo.plan(config, pp=2, tp=2)
    assert raised.value.codes == ["site-no-tp"]
    assert str(raised.value) == "this cluster has no fast links for tp=2; use tp=1"


def test_unknown_architecture_error_lists_plugin_adapters_too(install):
    install("ppzoo-fakearch", "fakearch", FAKEARCH)
    known = sorted({t for a in registry.adapters().values() for t in a.model_types})
    assert "fakearch" in known
    with pytest.raises(registry.UnknownArchitectureError) as raised:
        ppzoo.adapter_for(types.SimpleNamespace(model_type="nonesuch"))
    assert str(raised.value).startswith(f"no ppzoo adapter for model_type 'nonesuch'; registered: {', '.join(known)}. ")


BROKEN = {
    "import-error": (
        "import nonexistent_dependency_of_the_plugin\n",
        "ppzoo plugin ppzoo-broken (entry point 'broken' = {module}) failed to import: ModuleNotFoundError: "
        "No module named 'nonexistent_dependency_of_the_plugin'. Fix or uninstall ppzoo-broken, or skip it with "
        "PPZOO_BLOCK_PLUGINS=broken.",
    ),
    "misspelled-hook": (
        "from ppzoo import hookimpl\n\n@hookimpl\ndef ppzoo_register_adapter(register):\n    pass\n",
        "ppzoo plugin ppzoo-broken (entry point 'broken' = {module}) is invalid: unknown hook "
        "'ppzoo_register_adapter' in plugin <module '{module}' from '{path}'>",
    ),
    "raises-at-registration": (
        "from ppzoo import hookimpl\n\n@hookimpl\ndef ppzoo_register_adapters(register):\n"
        "    raise RuntimeError('needs a newer transformers')\n",
        "ppzoo plugin ppzoo-broken (entry point 'broken' = {module}) raised while registering adapters: "
        "RuntimeError: needs a newer transformers",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_plugin_fails_loudly_naming_its_distribution(install, monkeypatch, kind):
    source, message = BROKEN[kind]
    module = install("ppzoo-broken", "broken", source)
    path = Path(sys.path[0]) / f"{module}.py"
    for _ in range(2):  # the registry is not left half-loaded: every use reports it
        with pytest.raises(registry.PluginError) as raised:
            registry.adapters()
        assert str(raised.value) == message.format(module=module, path=path)
    monkeypatch.setenv("PPZOO_BLOCK_PLUGINS", "broken")  # what the import error suggests
    registry.reset()
    assert "llama" in registry.adapters()


# -- docs/adapters.md documents exactly the hooks hookspecs.py defines ------------------------
def _hookspecs() -> dict[str, str]:
    return {
        name: f"{name}({', '.join(inspect.signature(fn).parameters)})"
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("ppzoo_") and hasattr(fn, "ppzoo_spec")
    }


def test_every_hookspec_is_documented_and_every_documented_hook_exists():
    specs = _hookspecs()
    assert {"ppzoo_register_adapters", "ppzoo_adapter_for", "ppzoo_validate"} <= set(specs)
    documented = re.findall(r"^### `(ppzoo_\w+\([^)]*\))`", DOCS.read_text(), flags=re.M)
    assert sorted(documented) == sorted(specs.values())


def test_documented_firstresult_hooks_are_the_firstresult_specs():
    text = DOCS.read_text()
    sections = dict(re.findall(r"^### `(ppzoo_\w+)\(.*?\n(.*?)(?=^### |^## |\Z)", text, flags=re.M | re.S))
    for name in _hookspecs():
        firstresult = getattr(hookspecs, name).ppzoo_spec["firstresult"]
        assert ("Stops at the first non-None result." in sections[name]) == firstresult, name


def test_every_conformance_check_is_documented():
    from ppzoo.testing import CHECKS

    documented = re.findall(r"^\| `(\w+)` \|", DOCS.read_text().split("## 3.")[1].split("## 4.")[0], flags=re.M)
    assert documented == [check.name for check in CHECKS]


def test_every_problem_code_is_documented_with_its_meaning():
    from ppzoo.validation import CODES

    section = DOCS.read_text().split("## 6. Problem codes")[1]
    documented = dict(re.findall(r"^\| `([a-z0-9-]+)` \| (.+) \|$", section, flags=re.M))
    assert documented == CODES


def test_every_capability_is_documented_with_its_checks():
    from ppzoo.capabilities import Capability

    section = DOCS.read_text().split("### Capabilities")[1].split("### ")[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+) \| (.+) \|$", section, flags=re.M)
    assert [name for name, _, _ in rows] == [c.value for c in Capability]
    for (name, what, checks), capability in zip(rows, Capability, strict=True):
        assert what.replace("`", "") == capability.description, name
        assert re.findall(r"`(\w+)`", checks) == list(capability.checks), name


def test_the_pytest_plugin_is_opt_in():
    """Installing ppzoo must not load its pytest plugin into every project's test run."""
    auto = [ep.value for ep in importlib.metadata.entry_points(group="pytest11") if ep.value.startswith("ppzoo")]
    assert auto == []
    assert importlib.metadata.distribution("ppzoo").entry_points.select(group="pytest11") == ()
