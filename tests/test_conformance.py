"""The conformance matrix — every registered built-in adapter through every check of the kit — and
the kit's own tests: each check catches the breakage it claims to, records and pytest outcomes say
what happened, and ``ppzoo check`` prints the table.

``tests/conftest.py`` turns entry-point plugins off, so the registry holds the built-ins alone.
Select one cell with ``-k``, e.g. ``python -m pytest tests/test_conformance.py -k gemma2-stage_chain``.
"""

import pytest

from ppzoo import registry
from ppzoo.adapter import KeyMap
from ppzoo.architectures.llama import LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.cli import main
from ppzoo.layout import Layout
from ppzoo.testing import (
    CHECKS,
    CheckResult,
    check_adapter,
    check_buffers_after_meta_init,
    check_layout,
    check_stage_chain,
    check_stage_reads,
    check_tied_weights,
    check_tiny_config,
    check_validation,
)
from ppzoo.testing.exercised import RECOGNISERS
from ppzoo.testing.parametrize import parametrize_with_checks
from ppzoo.validation import Problem

pytest_plugins = ["ppzoo.testing.pytest_plugin", "pytester"]


def test_conformance(ppzoo_case):
    ppzoo_case.run()


# -- broken adapters: each check must catch its breakage ----------------------------------------
class DoubledLogits(LlamaAdapter):
    name = "doubled-logits"

    def logits(self, lm, hidden):
        return super().logits(lm, hidden) * 2


class NoHead(LlamaAdapter):
    name = "no-head"

    def fqn_layout(self, config):
        layout = super().fqn_layout(config)
        return Layout(layout.inputs, layout.layers, layout.num_layers, ("model.norm",), layout.shared)


class _GreedyKeys(KeyMap):
    def sources(self, fqn, available):
        return [fqn, "model.embed_tokens.weight"] if fqn == "model.norm.weight" else [fqn]

    def combine(self, fqn, tensors):
        return tensors[0]


class GreedyReads(LlamaAdapter):
    name = "greedy-reads"

    def key_map(self, config):
        return _GreedyKeys()


class DoubledRope(LlamaAdapter):
    name = "doubled-rope"

    def init_buffers(self, model, module):
        super().init_buffers(model, module)
        if hasattr(module, "inv_freq"):
            module.inv_freq.mul_(2)


class ClaimsTies(LlamaAdapter):
    name = "claims-ties"
    capabilities = frozenset({"tied_embeddings"})


class ClaimsARule(LlamaAdapter):
    name = "claims-a-rule"

    def validation_cases(self):
        return [(self.tiny_config(), "claims-hidden-size-prime")]


class RuleWithCode(LlamaAdapter):
    """Refuses configs marked ``odd``, with a code and words of its own choosing."""

    name = "rule-with-code"
    code = "rule-with-code-odd"

    def validate(self, config, plan=None):
        problems = super().validate(config, plan)
        if getattr(config, "odd", False):
            problems.append(Problem(self.code, f"config.odd={config.odd}: any wording at all; set odd=False"))
        return problems

    def validation_cases(self):
        odd = self.tiny_config()
        odd.odd = True
        return [(odd, "rule-with-code-odd")]


def test_stage_chain_catches_a_head_that_scales_logits():
    with pytest.raises(AssertionError) as raised:
        check_stage_chain(DoubledLogits())
    lines = str(raised.value).splitlines()
    assert lines[0] == "adapter 'doubled-logits': stage chain vs Hugging Face"
    assert lines[1].startswith("  - 1 stages: logits differ by ")


def test_layout_catches_a_parameter_left_out():
    with pytest.raises(AssertionError) as raised:
        check_layout(NoHead())
    assert str(raised.value) == (
        "adapter 'no-head': layout\n  - parameter 'lm_head.weight' is in 0 layout modules []; it must be in exactly one"
    )


def test_stage_reads_catches_a_stage_reading_another_stages_tensor():
    with pytest.raises(AssertionError) as raised:
        check_stage_reads(GreedyReads())
    problems = str(raised.value).splitlines()[1:]
    assert "  - pp=2 1F1B stage 1 read tensors of other stages: ['model.embed_tokens.weight']" in problems
    assert "  - pp=4 1F1B stage 3 read tensors of other stages: ['model.embed_tokens.weight']" in problems


def test_buffers_catch_a_wrong_rope_init():
    with pytest.raises(AssertionError) as raised:
        check_buffers_after_meta_init(DoubledRope())
    assert "  - float32 pp=1 stage 0: buffer 'model.rotary_emb.inv_freq' differs from the reference by 1.000e+00" in (
        str(raised.value).splitlines()
    )


def test_a_declared_capability_the_tiny_config_does_not_exercise_fails():
    with pytest.raises(AssertionError) as raised:
        check_tied_weights(ClaimsTies())
    assert (
        str(raised.value) == "adapter 'claims-ties' declares 'tied_embeddings' but tied_weights(tiny_config()) is empty"
    )
    with pytest.raises(AssertionError) as raised:
        check_tiny_config(ClaimsTies())
    assert str(raised.value) == (
        "adapter 'claims-ties': tiny config\n"
        "  - declares 'tied_embeddings' but tiny_config() does not exercise it, so no check would test it "
        "(it needs: lm_head is tied to the input embedding (tied_weights() is not empty))"
    )


@pytest.mark.parametrize("capability", list(Capability), ids=lambda c: c.value)
def test_the_kit_understands_every_capability(capability):
    """Each capability has a recogniser, names checks the kit has, and some built-in adapter (or
    the example package) exercises it, so the recogniser is known to fire."""
    assert capability in RECOGNISERS
    assert capability.description and set(capability.checks) <= {c.name for c in CHECKS}
    assert capability.checks and all(isinstance(name, str) for name in capability.checks)
    for check in CHECKS:
        assert check.requires <= set(Capability)


def test_every_capability_is_exercised_by_a_builtin_adapter():
    declared = {c for adapter in registry.adapters().values() for c in adapter.capabilities}
    # NOTE: the example package's logit scale is the one capability no built-in has
    assert set(Capability) - declared == {Capability.LOGIT_SCALE}


@pytest.mark.parametrize(
    "name, overrides, capability",
    [
        ("mixtral", {"output_router_logits": False}, "router_aux_loss"),
        ("mixtral", {"router_aux_loss_coef": 0.0}, "router_aux_loss"),
        ("granite", {"embedding_multiplier": 1.0}, "embedding_multiplier"),
        ("granite", {"logits_scaling": 1.0}, "logits_scaling"),
        ("gemma2", {"final_logit_softcapping": None, "attn_logit_softcapping": None}, "softcap"),
        ("phi3", {"sliding_window": 64}, "sliding_window"),
    ],
)
def test_a_tiny_config_that_stops_exercising_a_capability_fails(name, overrides, capability):
    adapter = registry.adapters()[name]

    class Switched(type(adapter)):
        def tiny_config(self):
            config = super().tiny_config()
            for key, value in overrides.items():
                setattr(config, key, value)
            return config

    with pytest.raises(AssertionError) as raised:
        check_tiny_config(Switched())
    assert f"  - declares {capability!r} but tiny_config() does not exercise it" in str(raised.value)


def test_an_exercised_capability_must_be_declared():
    gemma = registry.adapters()["gemma"]

    class Undeclared(type(gemma)):
        name = "undeclared-ties"
        capabilities = frozenset({Capability.EMBEDDING_SCALE})

    with pytest.raises(AssertionError) as raised:
        check_tiny_config(Undeclared())
    assert str(raised.value) == (
        "adapter 'undeclared-ties': tiny config\n"
        "  - tiny_config() exercises 'tied_embeddings'; add it to Undeclared.capabilities"
    )


def test_validation_catches_a_rule_that_does_not_fire():
    with pytest.raises(AssertionError) as raised:
        check_validation(ClaimsARule())
    assert str(raised.value).splitlines()[:2] == [
        "adapter 'claims-a-rule': validation",
        "  - rule 'claims-hidden-size-prime' did not fire; validation raised []",
    ]


def test_validation_compares_codes_not_words():
    check_validation(RuleWithCode())  # the message is the adapter's business
    wrong = RuleWithCode()
    wrong.code = "rule-with-code-other"
    with pytest.raises(AssertionError) as raised:
        check_validation(wrong)
    assert str(raised.value).splitlines()[1] == (
        "  - rule 'rule-with-code-odd' did not fire; validation raised ['rule-with-code-other']"
    )


@parametrize_with_checks(DoubledLogits(), select=["distributed_step"])
def test_distributed_step_catches_a_head_that_scales_logits(ppzoo_case):
    """Runs in the same process group as the matrix's distributed checks."""
    with pytest.raises(AssertionError) as raised:
        ppzoo_case.run()
    problems = str(raised.value).splitlines()
    assert problems[0] == "adapter 'doubled-logits': distributed step vs Hugging Face"
    for schedule in ("GPipe", "1F1B", "Interleaved1F1B"):
        assert any(p.startswith(f"  - {schedule} rank 1: loss ") for p in problems), schedule
        assert any(
            p.startswith(f"  - {schedule} rank 1: eval logits on the last-stage rank are off by") for p in problems
        )
    assert any(p.startswith("  - ZBVZeroBubble rank 0: loss ") for p in problems)


# -- records, pytest outcomes and the command line ------------------------------------------------
def test_check_adapter_records_pass_skip_xfail_and_strict_xpass():
    llama = registry.adapters()["llama"]
    assert check_adapter(llama, select=["layout", "tied_weights"]) == [
        CheckResult("llama", "layout", "passed"),
        CheckResult(
            "llama",
            "tied_weights",
            "skipped",
            reason="adapter 'llama' does not declare 'tied_embeddings' in its capabilities",
        ),
    ]
    (xfailed,) = check_adapter(NoHead(), select=["layout"], expected_failures={"layout": "the head is left out"})
    assert (xfailed.status, xfailed.reason) == ("xfailed", "the head is left out")
    assert "parameter 'lm_head.weight' is in 0 layout modules" in xfailed.error
    (xpassed,) = check_adapter(llama, select=["layout"], expected_failures={"layout": "thought broken"})
    assert xpassed == CheckResult(
        "llama",
        "layout",
        "failed",
        reason="thought broken",
        error="passed, but was expected to fail (thought broken); remove it from expected_failures",
    )


def test_check_adapter_refuses_expected_failures_it_cannot_honour():
    llama = registry.adapters()["llama"]
    with pytest.raises(ValueError) as raised:
        check_adapter(llama, expected_failures={"stage-chain": "typo"})
    assert str(raised.value) == (
        "expected_failures names unknown checks ['stage-chain']; the checks are tiny_config, layout, plan, "
        "validation, stage_reads, buffers, stage_chain, dropout, tied_weights, distributed_step, generate"
    )
    with pytest.raises(ValueError) as raised:
        check_adapter(llama, expected_failures={"tied_weights": "n/a"})
    assert str(raised.value) == (
        "expected_failures names 'tied_weights', which does not apply: "
        "adapter 'llama' does not declare 'tied_embeddings' in its capabilities"
    )


def test_pytest_plugin_ids_skips_and_strict_xfails(pytester):
    pytester.makepyfile(
        """
        import pytest
        from ppzoo.layout import Layout
        from ppzoo.architectures.llama import LlamaAdapter

        class NoHead(LlamaAdapter):
            name = "no-head"

            def fqn_layout(self, config):
                layout = super().fqn_layout(config)
                return Layout(layout.inputs, layout.layers, layout.num_layers, ("model.norm",), layout.shared)

        pytestmark = pytest.mark.ppzoo_adapters(
            "llama", NoHead(), select=["layout", "validation", "tied_weights"],
            expected_failures={"no-head-layout": "the head is left out", "llama-validation": "thought broken"},
        )

        def test_kit(ppzoo_case):
            ppzoo_case.run()
        """
    )
    collected = pytester.runpytest_inprocess("-p", "ppzoo.testing.pytest_plugin", "--collect-only", "-q")
    assert [line for line in collected.outlines if "::" in line] == [
        f"test_pytest_plugin_ids_skips_and_strict_xfails.py::test_kit[{adapter}-{check}]"
        for adapter in ("llama", "no-head")
        for check in ("layout", "validation", "tied_weights")
    ]
    result = pytester.runpytest_inprocess("-p", "ppzoo.testing.pytest_plugin", "-rfsx", "-k", "not no-head-validation")
    result.assert_outcomes(passed=1, skipped=2, xfailed=1, failed=1, deselected=1)
    result.stdout.fnmatch_lines_random(
        [
            "SKIPPED * adapter 'llama' does not declare 'tied_embeddings' in its capabilities",
            "XFAIL *test_kit[[]no-head-layout[]] - the head is left out",
            "FAILED *test_kit[[]llama-validation[]]*",
            "[[]XPASS(strict)[]] thought broken",
        ]
    )


def test_ppzoo_check_prints_the_table(capsys):
    assert (
        main(["check", "--adapter", "llama", "--adapter", "gemma", "--check", "layout", "--check", "tied_weights"]) == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        "architecture  provided by  layout  tied_weights",
        "llama         ppzoo        pass    skip (1)",
        "gemma         ppzoo        pass    pass",
        "",
        "(1) does not declare 'tied_embeddings' in its capabilities",
        "",
        "3 pass, 1 skip",
    ]


def test_ppzoo_check_fails_naming_the_problem(ppzoo_plugin, capsys):
    class Plugin:
        @staticmethod
        @__import__("ppzoo").hookimpl
        def ppzoo_register_adapters(register):
            no_head = NoHead()
            no_head.model_types = ("no-head",)
            register(no_head)

    ppzoo_plugin(Plugin, "no-head-plugin")
    assert main(["check", "--adapter", "no-head", "--check", "layout", "--markdown"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "| architecture | provided by | layout |",
        "| --- | --- | --- |",
        "| no-head | no-head-plugin | FAIL (1) |",
        "",
        "(1) parameter 'lm_head.weight' is in 0 layout modules []; it must be in exactly one",
        "",
        "1 FAIL",
    ]


class DeclaredNoHead(NoHead):
    name = "declared-no-head"
    model_types = ("declared-no-head",)
    expected_failures = {"layout": "the head is left out on purpose"}


class DeclaredLlama(LlamaAdapter):
    name = "declared-llama"
    model_types = ("declared-llama",)
    expected_failures = {"layout": "thought broken"}


def _register(ppzoo_plugin, *adapters):
    class Plugin:
        @staticmethod
        @__import__("ppzoo").hookimpl
        def ppzoo_register_adapters(register):
            for adapter in adapters:
                register(adapter)

    ppzoo_plugin(Plugin, "declaring-plugin")


def test_ppzoo_check_honours_an_adapters_expected_failures(ppzoo_plugin, capsys):
    _register(ppzoo_plugin, DeclaredNoHead(), DeclaredLlama())
    assert main(["check", "--adapter", "declared-no-head", "--check", "layout"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "architecture      provided by       layout",
        "declared-no-head  declaring-plugin  xfail (1)",
        "",
        "(1) the head is left out on purpose",
        "",
        "1 xfail",
    ]
    # strict: an expected failure that passes fails the run
    assert main(["check", "--adapter", "declared-llama", "--check", "layout"]) == 1
    out = capsys.readouterr().out
    assert "passed, but was expected to fail (thought broken); remove it from expected_failures" in out


def test_an_adapters_expected_failures_reach_records_and_pytest_items():
    from ppzoo.testing.parametrize import case_params

    (record,) = check_adapter(DeclaredNoHead(), select=["layout"])
    assert (record.status, record.reason) == ("xfailed", "the head is left out on purpose")
    # the caller's reason overrides the adapter's for the same check
    (record,) = check_adapter(DeclaredNoHead(), select=["layout"], expected_failures={"layout": "mine"})
    assert (record.status, record.reason) == ("xfailed", "mine")
    (param,) = case_params([DeclaredNoHead()], select=["layout"])
    (mark,) = [m for m in param.marks if m.name == "xfail"]
    assert mark.kwargs == {"strict": True, "reason": "the head is left out on purpose"}


def test_an_adapter_cannot_expect_a_check_it_does_not_apply():
    class Confused(LlamaAdapter):
        name = "confused"
        expected_failures = {"tied_weights": "n/a"}

    with pytest.raises(ValueError, match="expected_failures names 'tied_weights', which does not apply"):
        check_adapter(Confused(), select=["tied_weights"])

    class Misspelled(LlamaAdapter):
        name = "misspelled"
        expected_failures = {"stage-chain": "typo"}

    with pytest.raises(ValueError, match=r"Misspelled.expected_failures names unknown checks \['stage-chain'\]"):
        check_adapter(Misspelled(), select=["layout"])


# -- the adapter API a third party writes against ---------------------------------------------------
class GPT2FromTheDocs(__import__("ppzoo").Adapter):
    """GPT-2 through the Llama-style stage forward: learned absolute positions added in ``embed``
    (which receives ``position_ids``), no rotary embedding, fused QKV inside the blocks."""

    name = "gpt2-from-the-docs"
    model_types = ("gpt2",)
    capabilities = frozenset({"tied_embeddings"})
    inner_name, embed_name, layers_name, norm_name, rotary_name = "transformer", "wte", "h", "ln_f", None

    def fqn_layout(self, config):
        layout = super().fqn_layout(config)
        return Layout(("transformer.wte", "transformer.wpe"), layout.layers, layout.num_layers, layout.outputs)

    def embed(self, inner, input_ids, *, position_ids=None, attention_mask=None):
        import torch

        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return inner.drop(inner.wte(input_ids) + inner.wpe(position_ids))

    def call_layer(self, layer, hidden, *, mask, position_embeddings, position_ids):
        assert position_embeddings is None  # rotary_name = None
        return layer(hidden, attention_mask=mask, position_ids=position_ids)

    def tiny_config(self):
        return registry.adapters()["native"].tiny_config()


class BloomFromTheDocs(__import__("ppzoo").Adapter):
    """BLOOM through the Llama-style stage forward: an embedding layer norm, ALiBi instead of
    rotary positions. The per-layer-type mask object carries the ALiBi bias with the mask."""

    name = "bloom-from-the-docs"
    model_types = ("bloom",)
    capabilities = frozenset({"tied_embeddings"})
    inner_name, embed_name, layers_name, norm_name, rotary_name = "transformer", "word_embeddings", "h", "ln_f", None

    def fqn_layout(self, config):
        layout = super().fqn_layout(config)
        inputs = ("transformer.word_embeddings", "transformer.word_embeddings_layernorm")
        return Layout(inputs, layout.layers, layout.num_layers, layout.outputs)

    def embed(self, inner, input_ids, *, position_ids=None, attention_mask=None):
        return inner.word_embeddings_layernorm(inner.word_embeddings(input_ids))

    def masks(self, inner, hidden, attention_mask, position_ids, needed):
        import torch
        from transformers.masking_utils import create_causal_mask

        from ppzoo.stage import build_mask

        # NOTE: BLOOM's positions are ALiBi's alone: transformers builds its mask without position_ids
        mask = build_mask(create_causal_mask, inner.config, hidden, attention_mask, None)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        alibi = inner.build_alibi_tensor(attention_mask, inner.num_heads, dtype=hidden.dtype)
        return dict.fromkeys(needed, (mask, alibi))

    def call_layer(self, layer, hidden, *, mask, position_embeddings, position_ids):
        causal, alibi = mask
        return layer(hidden, alibi=alibi, attention_mask=causal)[0]

    def tiny_config(self):
        from ppzoo.testing.tiny_configs import tiny_config

        return tiny_config("bloom")


class OldSignatureEmbed(LlamaAdapter):
    """An adapter written before ``embed`` took ``position_ids`` and ``attention_mask``."""

    name = "old-signature-embed"

    def embed(self, inner, input_ids):
        return getattr(inner, self.embed_name)(input_ids)


@pytest.mark.parametrize("adapter", [GPT2FromTheDocs(), BloomFromTheDocs(), OldSignatureEmbed()], ids=lambda a: a.name)
def test_adapter_api_for_learned_positions_and_old_embed_signatures(adapter):
    """Both run the stage chain exactly, the packed position_ids case included."""
    check_layout(adapter)
    check_stage_chain(adapter)


def test_build_mask_passes_extra_arguments_to_transformers():
    import torch
    from transformers.masking_utils import create_causal_mask

    from ppzoo.stage import build_mask

    config = registry.adapters()["llama"].tiny_config()
    config._attn_implementation = "sdpa"
    hidden = torch.zeros(2, 6, config.hidden_size)
    # NOTE: sdpa without padding needs no mask tensor; ALiBi models must have one
    assert build_mask(create_causal_mask, config, hidden, None, None) is None
    mask = build_mask(create_causal_mask, config, hidden, None, None, allow_is_causal_skip=False)
    assert mask is not None and mask.shape[-2:] == (6, 6)
    with pytest.raises(TypeError, match="create_causal_mask takes no argument 'alibi'"):
        build_mask(create_causal_mask, config, hidden, None, None, alibi=True)
