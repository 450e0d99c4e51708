"""The registry: which adapter a config gets, and registering plugins at run time."""

import types
import warnings

import pluggy
import pytest
from transformers import LlamaConfig, MistralConfig

import ppzoo
import ppzoo.rules
from ppzoo import registry
from ppzoo.architectures.llama import TINY, LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.validation import CODES, Problem, Settings, ValidationError

pytest_plugins = ["ppzoo.testing.pytest_plugin", "pytester"]


class ForkAdapter(LlamaAdapter):
    name = "llama-fork"
    model_types = ("llama-fork",)


class Claimer:
    """Claims configs that carry ``claim_me`` for ``adapter``; says nothing about the others."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.asked = 0

    @ppzoo.hookimpl
    def ppzoo_adapter_for(self, config):
        self.asked += 1
        return self.adapter if getattr(config, "claim_me", False) else None


def tiny_llama():
    return LlamaConfig(**TINY)


def registering(*adapters):
    module = types.ModuleType("registering")

    @ppzoo.hookimpl
    def ppzoo_register_adapters(register):
        for adapter in adapters:
            register(adapter)

    module.ppzoo_register_adapters = ppzoo_register_adapters
    return module


def test_builtins_register_in_order():
    names = list(registry.adapters())
    assert names[:4] == ["llama", "mistral", "qwen2", "qwen3"]
    assert registry.adapter_source(registry.adapters()["llama"]) == "ppzoo (built-in ppzoo.architectures.llama)"


def test_ppzoo_adapters_is_the_function_after_the_builtins_load():
    loaded = registry.adapters()
    assert ppzoo.adapters() == loaded


def test_adapter_for_matches_model_type():
    assert ppzoo.adapter_for(LlamaConfig()) is registry.adapters()["llama"]
    assert ppzoo.adapter_for(MistralConfig()) is registry.adapters()["mistral"]


def test_adapter_for_matches_architectures_when_model_type_is_unknown():
    config = types.SimpleNamespace(model_type="my-mistral-finetune", architectures=["MistralForCausalLM"])
    assert ppzoo.adapter_for(config) is registry.adapters()["mistral"]


def test_model_type_wins_over_architectures():
    config = types.SimpleNamespace(model_type="llama", architectures=["MistralForCausalLM"])
    assert ppzoo.adapter_for(config) is registry.adapters()["llama"]


def test_unknown_architecture_lists_registered_model_types():
    config = types.SimpleNamespace(model_type="nonesuch", architectures=["NonesuchForCausalLM"])
    known = sorted({t for a in registry.adapters().values() for t in a.model_types})
    with pytest.raises(registry.UnknownArchitectureError) as raised:
        ppzoo.adapter_for(config)
    assert str(raised.value) == (
        f"no ppzoo adapter for model_type 'nonesuch'; registered: {', '.join(known)}. "
        "Write an Adapter subclass and register it from a plugin (entry point group 'ppzoo') — see docs/adapters.md."
    )
    assert "llama" in known and "qwen3" in known


def test_a_claim_hook_decides_before_model_type(ppzoo_plugin):
    fork = ForkAdapter()
    claimer = ppzoo_plugin(Claimer(fork))
    claimed = LlamaConfig()
    claimed.claim_me = True
    assert ppzoo.adapter_for(claimed) is fork
    assert ppzoo.adapter_for(LlamaConfig()) is registry.adapters()["llama"]  # None: matching decides
    assert claimer.asked == 2


def test_the_last_registered_claim_is_asked_first_and_stops_the_others(ppzoo_plugin):
    first, second = ForkAdapter(), ForkAdapter()
    early = ppzoo_plugin(Claimer(first), "early")
    late = ppzoo_plugin(Claimer(second), "late")
    config = types.SimpleNamespace(model_type="anything", claim_me=True)
    assert ppzoo.adapter_for(config) is second
    assert (late.asked, early.asked) == (1, 0)


def test_a_fallback_adapter_is_tried_last_and_only_when_it_matches(ppzoo_plugin):
    class Fallback(LlamaAdapter):
        name = "fallback-for-tests"
        model_types = ()
        fallback = True

        def matches(self, config):
            return getattr(config, "llama_like", False)

    fallback = Fallback()
    ppzoo_plugin(registering(fallback))
    assert ppzoo.adapter_for(types.SimpleNamespace(model_type="odd", llama_like=True)) is fallback
    assert ppzoo.adapter_for(LlamaConfig(llama_like=True)) is registry.adapters()["llama"]
    with pytest.raises(registry.UnknownArchitectureError):
        ppzoo.adapter_for(types.SimpleNamespace(model_type="odd", llama_like=False))


def test_overriding_a_builtin_warns_naming_both_and_unregistering_restores_it():
    builtin = registry.adapters()["llama"]
    override = ForkAdapter()
    override.model_types = ("llama",)
    module = registering(override)
    with pytest.warns(UserWarning) as warned:
        with registry.plugin(module, "my-override"):
            assert ppzoo.adapter_for(LlamaConfig()) is override
    assert [str(w.message) for w in warned] == [
        "ppzoo: adapter 'llama-fork' from my-override (registered at run time) overrides adapter 'llama' "
        "from ppzoo (built-in ppzoo.architectures.llama) for model_type 'llama'"
    ]
    assert ppzoo.adapter_for(LlamaConfig()) is builtin  # the very same object as before


def test_plugin_context_unregisters_when_the_body_raises():
    fork = ForkAdapter()
    with pytest.raises(KeyError):
        with registry.plugin(registering(fork), "temporary"):
            assert registry.adapters()["llama-fork"] is fork
            raise KeyError("the test body failed")
    assert "llama-fork" not in registry.adapters()


@pytest.mark.parametrize(
    "register_body, message",
    [
        (lambda register: register(object()), "registered <object object at"),
        (lambda register: 1 / 0, "raised while registering adapters: ZeroDivisionError: division by zero"),
    ],
    ids=["not-an-adapter", "raises"],
)
def test_a_plugin_that_fails_to_register_leaves_nothing_behind(register_body, message):
    fork = ForkAdapter()
    module = types.ModuleType("half")

    @ppzoo.hookimpl
    def ppzoo_register_adapters(register):
        register(fork)
        register_body(register)

    module.ppzoo_register_adapters = ppzoo_register_adapters
    before = registry.adapters()
    with pytest.raises(registry.PluginError) as raised:
        with registry.plugin(module, "half"):
            pass
    assert str(raised.value).startswith("ppzoo plugin half (registered at run time) ")
    assert message in str(raised.value)
    assert registry.adapters() == before
    # Registering and unregistering another plugin must not call the broken one again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with registry.plugin(registering(ForkAdapter()), "fine"):
            pass
    assert registry.adapters() == before


def test_a_misspelled_hook_is_refused():
    module = types.ModuleType("typo")

    @ppzoo.hookimpl
    def ppzoo_register_adapter(register):  # missing "s"
        pass

    module.ppzoo_register_adapter = ppzoo_register_adapter
    with pytest.raises(registry.PluginError) as raised:
        with registry.plugin(module, "typo"):
            pass
    assert str(raised.value) == (
        f"ppzoo plugin typo (registered at run time) is invalid: unknown hook 'ppzoo_register_adapter' in plugin {module!r}"
    )


def test_validation_reports_the_adapters_and_every_plugins_problems_at_once(ppzoo_plugin):
    class Rule:
        @ppzoo.hookimpl
        def ppzoo_validate(self, config, plan):  # a subset of the hook's arguments is enough
            return [Problem("site-needs-plan", f"site rule: {config.model_type} needs a plan")] if plan is None else []

    ppzoo_plugin(Rule())
    config = LlamaConfig()
    config.is_encoder_decoder = True
    with pytest.raises(ValidationError) as raised:
        registry.validate(config)
    assert raised.value.problems == [
        Problem("encoder-decoder", "llama is an encoder-decoder model; ppzoo pipelines decoder-only causal LMs"),
        Problem("site-needs-plan", "site rule: llama needs a plan"),
    ]
    assert raised.value.codes == ["encoder-decoder", "site-needs-plan"]
    assert str(raised.value) == (
        "ppzoo cannot run this llama as configured:\n"
        "  - llama is an encoder-decoder model; ppzoo pipelines decoder-only causal LMs\n"
        "  - site rule: llama needs a plan"
    )
    assert registry.ValidationError is ValidationError and issubclass(ValidationError, ValueError)


def test_one_problem_is_the_whole_message():
    config = LlamaConfig()
    config.is_encoder_decoder = True
    with pytest.raises(ValueError) as raised:
        registry.validate(config)
    assert str(raised.value) == "llama is an encoder-decoder model; ppzoo pipelines decoder-only causal LMs"


class Recorder:
    """Records what ``ppzoo_validate`` receives; refuses pp above ``limit`` with its own code."""

    def __init__(self, limit):
        self.limit = limit
        self.calls = []

    @ppzoo.hookimpl
    def ppzoo_validate(self, config, adapter, plan, settings):
        self.calls.append((adapter.name, plan, settings))
        if settings.pp is not None and settings.pp > self.limit:
            return [Problem("site-pp-limit", f"this site runs pp <= {self.limit}, got pp={settings.pp}")]
        return None


def test_the_hook_receives_the_adapter_the_plan_and_the_settings(ppzoo_plugin):
    rule = ppzoo_plugin(Recorder(limit=8))
    result = ppzoo.plan(tiny_llama(), pp=2, schedule="interleaved1f1b", microbatches=4, tp=2, dp_shard=1)
    (adapter, before, settings), (_, after, settings_after) = rule.calls
    assert adapter == "llama" and before is None and after is result
    assert settings == Settings(
        pp=2,
        schedule="Interleaved1F1B",
        num_stages=4,
        microbatches=4,
        dp_shard=1,
        tp=2,
    )
    assert settings_after == settings and settings.dp is None  # dp_replicate not given: not known
    rule.calls.clear()
    ppzoo.plan(tiny_llama(), pp=2)
    assert [s for _, _, s in rule.calls][0] == Settings(pp=2, schedule="1F1B", num_stages=2)


def test_a_plugin_rule_fires_through_the_hook_with_its_code_before_anything_is_built(ppzoo_plugin, monkeypatch):
    ppzoo_plugin(Recorder(limit=2))
    built = []
    monkeypatch.setattr("ppzoo.planner.meta_model", lambda *a, **k: built.append(1))
    with pytest.raises(ValidationError) as raised:
        ppzoo.plan(tiny_llama(), pp=4, microbatches=1)
    assert raised.value.codes == ["microbatches-too-few", "site-pp-limit"]  # ppzoo's own rules first
    assert raised.value.problems[1].message == "this site runs pp <= 2, got pp=4"
    assert built == []


def test_a_rule_returning_strings_is_refused_naming_its_plugin(ppzoo_plugin):
    class OldRule:
        @ppzoo.hookimpl
        def ppzoo_validate(self, config, plan):
            return ["a bare string"]

    ppzoo_plugin(OldRule(), "old-rule")
    with pytest.raises(registry.PluginError) as raised:
        registry.validate(LlamaConfig())
    assert str(raised.value) == (
        "ppzoo plugin old-rule (registered at run time) returned 'a bare string' from ppzoo_validate; "
        "return ppzoo.validation.Problem(code, message) objects — see docs/adapters.md"
    )


def test_problem_codes_are_kebab_case_and_every_builtin_code_is_in_the_table():
    with pytest.raises(ValueError, match="problem code 'Bad_Code' is not kebab-case"):
        Problem("Bad_Code", "message")
    # NOTE: a code outside the table belongs to one adapter and starts with its name
    for adapter in registry.adapters().values():
        codes = {code for _, code in adapter.validation_cases()}
        assert all(code in CODES or code.startswith(f"{adapter.name}-") for code in codes), (adapter.name, codes)


def test_the_registry_is_a_pluggy_plugin_manager_with_the_rules_first():
    pm = registry._get()
    assert isinstance(pm, registry.PluginManager) and isinstance(pm, pluggy.PluginManager)
    assert registry.BUILTIN_PLUGINS[0] == "ppzoo.rules" and pm.get_plugin("ppzoo.rules") is ppzoo.rules
    # the core's rules are one more implementation of the hook, called first
    impls = pm.hook.ppzoo_validate.get_hookimpls()
    assert [i.plugin_name for i in impls] == ["ppzoo.rules"] and impls[0].tryfirst


def test_an_unknown_capability_is_refused_when_the_class_is_defined():
    with pytest.raises(ValueError) as raised:

        class Typo(LlamaAdapter):
            capabilities = frozenset({Capability.SLIDING_WINDOW, "tied_embedding"})

    assert str(raised.value).startswith(
        "Typo.capabilities names unknown capability 'tied_embedding'; the known capabilities are tied_embeddings, "
    )
    assert str(raised.value).endswith("(ppzoo.capabilities.Capability) — see docs/adapters.md")

    class Spelled(LlamaAdapter):
        capabilities = frozenset({"tied_embeddings"})  # a member's value is the member

    assert Spelled.capabilities == {Capability.TIED_EMBEDDINGS}


def test_an_unknown_capability_is_refused_when_the_adapter_is_registered():
    fork = ForkAdapter()
    fork.capabilities = frozenset({"moe", "teleportation"})
    with pytest.raises(registry.PluginError) as raised:
        with registry.plugin(registering(fork), "typo"):
            pass
    assert str(raised.value).startswith(
        "ppzoo plugin typo (registered at run time): adapter 'llama-fork' names unknown capability 'teleportation'; "
    )
    assert "llama-fork" not in registry.adapters()


def test_ppzoo_plugin_fixture_unregisters_after_a_failing_test(pytester):
    pytester.makepyfile(
        """
        import ppzoo
        import ppzoo.registry
        from ppzoo.architectures.llama import LlamaAdapter

        class Leftover(LlamaAdapter):
            name = "leftover"
            model_types = ("leftover",)

        @ppzoo.hookimpl
        def ppzoo_register_adapters(register):
            register(Leftover())

        def test_registers_then_fails(ppzoo_plugin):
            import sys
            ppzoo_plugin(sys.modules[__name__], "leftover-plugin")
            assert "leftover" in ppzoo.registry.adapters()
            assert False, "the test fails after registering"
        """
    )
    result = pytester.runpytest_inprocess("-p", "ppzoo.testing.pytest_plugin")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the test fails after registering*"])
    assert "leftover" not in registry.adapters()
