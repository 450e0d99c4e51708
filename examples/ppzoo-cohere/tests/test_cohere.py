"""What is particular to Cohere: discovery, the logit scale, and its validation rule."""

import importlib.metadata

import pytest
import torch
from ppzoo_cohere import CohereAdapter
from transformers import AutoModelForCausalLM, CohereConfig

import ppzoo
from ppzoo import registry
from ppzoo.capabilities import Capability
from ppzoo.checkpoint import Checkpoint
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.reference import batch, save_tiny_model


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.delenv("PPZOO_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry.reset()
    yield
    registry.reset()


def test_discovered_through_the_entry_point():
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="ppzoo") if ep.value == "ppzoo_cohere"]
    assert entry_point.dist.name == "ppzoo-cohere"
    adapter = ppzoo.adapter_for(CohereConfig())
    assert type(adapter) is CohereAdapter
    assert registry.adapter_source(adapter) == "ppzoo-cohere (entry point 'cohere' = ppzoo_cohere)"


def test_the_last_stage_applies_the_logit_scale_once(tmp_path):
    adapter = ppzoo.adapter_for(CohereConfig())
    directory = save_tiny_model(adapter, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    assert reference.config.logit_scale == 0.25
    ids, mask, _ = batch(reference.config.vocab_size)
    plan = ppzoo.plan(directory, pp=2)
    stages = [
        build_stage(reference.config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(2)
    ]
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
        got = run_chain(stages, ids, attention_mask=mask)
        unscaled = reference.lm_head(reference.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unscaled * 0.25, want, rtol=1e-5, atol=1e-6)


def test_a_config_without_logit_scale_is_refused_before_anything_is_built():
    config = CohereAdapter().tiny_config()
    config.logit_scale = None
    with pytest.raises(registry.ValidationError) as raised:
        ppzoo.plan(config, pp=2)
    assert raised.value.codes == ["cohere-logit-scale"]
    assert str(raised.value) == (
        "logit_scale must be a number, got None; Cohere multiplies the logits by it "
        "(released checkpoints use 0.0625 or 0.125)"
    )


def test_the_capabilities_are_members_of_the_closed_list():
    assert CohereAdapter.capabilities == {Capability.TIED_EMBEDDINGS, Capability.LOGIT_SCALE}
