"""The generic fallback: exact on standard-layout architectures without an adapter, refuses the rest."""

import pytest
import torch
from transformers import AutoConfig

import ppzoo
from ppzoo import registry
from ppzoo.architectures.llama import TINY
from ppzoo.checkpoint import Checkpoint
from ppzoo.config import load_config
from ppzoo.layout import SLIDING
from ppzoo.loss import causal_lm_loss
from ppzoo.registry import UnknownArchitectureError, ValidationError
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model
from ppzoo.validation import Problem

ADVICE = "write an Adapter subclass for it (see docs/adapters.md)"
#: architectures with no adapter of their own: plain Llama-like (helium), sliding windows from
#: layer_types (exaone4), tied embeddings by default and NoPE layers (smollm3)
EXACT = {
    "helium": {},
    "exaone4": {"sliding_window": 5},
    "smollm3": {},
}


def tiny_config(model_type, **overrides):
    """Llama's tiny shape; tie_word_embeddings is left at the architecture's default."""
    shape = {k: v for k, v in TINY.items() if k != "tie_word_embeddings"}
    return AutoConfig.for_model(model_type, **shape, head_dim=8, **overrides)


@pytest.fixture(scope="module", params=list(EXACT))
def case(request, tmp_path_factory):
    config = tiny_config(request.param, **EXACT[request.param])
    adapter = registry.adapter_for(config)
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp(request.param), config=config)
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return adapter, directory, reference, out, (ids, mask, labels)


def test_the_generic_adapter_takes_them(case):
    adapter, _, reference, _, _ = case
    assert adapter.name == "generic" and adapter.fallback
    assert adapter.validate(reference.config) == []
    if reference.config.model_type == "exaone4":
        assert SLIDING in adapter.layer_types(reference.config) and reference.config.sliding_window < 12
    if reference.config.model_type == "smollm3":
        assert adapter.tied_weights(reference.config) == {"lm_head.weight": "model.embed_tokens.weight"}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_generic_stage_chain_equals_reference(case, n):
    adapter, directory, reference, out, (ids, mask, labels) = case
    config = load_config(directory)
    plan = ppzoo.plan(directory, pp=n)
    assert plan.adapter == "generic"
    stages = [
        build_stage(config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(n)
    ]
    logits = run_chain(stages, ids, attention_mask=mask)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
    named = [(k, p) for s in stages for k, p in s.named_parameters()]
    assert grad_mismatches(named, reference, tied=adapter.tied_weights(config)) == []


# -- refusals ----------------------------------------------------------------------------------


def extra(model_type, attr, value, step):
    return Problem(
        "generic-forward-step",
        f"model_type {model_type!r} has {attr}={value!r} ({step}), which the generic adapter does not apply; {ADVICE}",
    )


REFUSED = {
    "vaultgemma-final_logit_softcapping": (
        "vaultgemma",
        {},
        [extra("vaultgemma", "final_logit_softcapping", 30.0, "final-logit soft-capping in the CausalLM head")],
    ),
    "hyperclovax-multipliers": (
        "hyperclovax",
        {},
        [
            extra("hyperclovax", "logits_scaling", 1.0, "logit scaling in the CausalLM head"),
            extra("hyperclovax", "embedding_multiplier", 1.0, "an embedding multiplier in the base model's forward"),
        ],
    ),
    "minicpm3-scales": (
        "minicpm3",
        {},
        [
            extra("minicpm3", "logits_scaling", 10.0, "logit scaling in the CausalLM head"),
            extra("minicpm3", "scale_emb", 12, "an embedding scale in the base model's forward"),
            extra("minicpm3", "dim_model_base", 256, "a hidden-state rescale before the CausalLM head"),
        ],
    ),
    "helium-logit_scale": (
        "helium",
        {"logit_scale": 0.25},
        [extra("helium", "logit_scale", 0.25, "a logit scale in the CausalLM head")],
    ),
    "flex_olmo-moe": (
        "flex_olmo",
        {"output_router_logits": True},
        [
            extra("flex_olmo", "output_router_logits", True, "a router aux loss added in the CausalLM forward"),
            Problem(
                "generic-moe",
                "model_type 'flex_olmo' is a mixture of experts (num_experts=7, num_local_experts=7): expert checkpoint "
                f"keys and the router aux loss need a dedicated adapter; {ADVICE}",
            ),
        ],
    ),
    "olmo3-per-layer-type-rope": (
        "olmo3",
        {},
        [
            Problem(
                "generic-per-layer-type-rope",
                f"model_type 'olmo3' has per-layer-type RoPE (rope_parameters keyed by ['full_attention', 'sliding_attention']); {ADVICE}",
            )
        ],
    ),
    "starcoder2-window-without-layer-types": (
        "starcoder2",
        {"sliding_window": 4096},
        [
            Problem(
                "generic-sliding-window",
                f"model_type 'starcoder2' sets sliding_window=4096 without layer_types, so which layers slide is decided in its forward; {ADVICE}",
            )
        ],
    ),
    "phi4_multimodal-extra-modules": (
        "phi4_multimodal",
        {"num_hidden_layers": 2},
        [
            Problem(
                "generic-layout",
                f"model_type 'phi4_multimodal' has parameters outside embed_tokens/layers/norm/lm_head ('model.embed_tokens_extend'); {ADVICE}",
            )
        ],
    ),
}


@pytest.fixture
def without_native(monkeypatch):
    """The registry without the native fallback, which takes (and runs exactly) what generic refuses."""
    monkeypatch.setenv("PPZOO_BLOCK_PLUGINS", "native")
    registry.reset()


@pytest.mark.parametrize("case_id", list(REFUSED))
def test_forward_extras_are_refused_by_name(case_id, without_native):
    model_type, overrides, problems = REFUSED[case_id]
    config = AutoConfig.for_model(model_type, **overrides)
    assert registry.adapter_for(config).name == "generic"
    with pytest.raises(ValidationError) as exc:
        registry.validate(config)
    assert exc.value.problems == problems


def test_plan_refuses_before_building(without_native):
    config = AutoConfig.for_model("vaultgemma", num_hidden_layers=4)
    with pytest.raises(ValidationError, match=r"final_logit_softcapping=30\.0 \(final-logit soft-capping"):
        ppzoo.plan(config, pp=2)


def test_non_standard_layouts_are_not_matched(monkeypatch):
    config = AutoConfig.for_model("codegen")  # base_model_pp_plan over wte / h / ln_f
    assert not registry.adapters()["generic"].matches(config)
    # NOTE: without the native fallback (which runs the model's own forward) nothing takes it
    monkeypatch.setenv("PPZOO_BLOCK_PLUGINS", "native")
    registry.reset()
    with pytest.raises(UnknownArchitectureError, match=r"no ppzoo adapter for model_type 'codegen'"):
        registry.adapter_for(config)


@pytest.mark.parametrize("model_type", ["llama", "gemma", "phi3", "mixtral", "qwen2_moe"])
def test_dedicated_adapters_win_over_the_fallback(model_type):
    assert registry.adapter_for(AutoConfig.for_model(model_type)).name == model_type


def test_starcoder2_embedding_dropout_is_applied_not_refused(without_native):
    """StarCoder2 as released (embedding and residual dropout 0.1): the generic adapter takes it and
    drops out the embeddings as its base forward does, in train mode with the reference's masks."""
    from ppzoo.testing.census import zoo_adapter
    from ppzoo.testing.chain_checks import check_stage_chain

    released = AutoConfig.for_model("starcoder2", embedding_dropout=0.1, residual_dropout=0.1)
    assert registry.problems(released) == [] and registry.adapter_for(released).name == "generic"

    class Released(type(zoo_adapter("starcoder2"))):
        name = "generic[starcoder2, released dropout]"

        def tiny_config(self):
            from ppzoo.testing.tiny_configs import tiny_config as zoo_tiny

            config = zoo_tiny("starcoder2")
            config.embedding_dropout = config.residual_dropout = 0.1
            return config

    check_stage_chain(Released())
