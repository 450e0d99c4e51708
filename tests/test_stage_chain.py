"""Chaining every stage in one process reproduces the unsplit Hugging Face model exactly."""

import pytest
import torch

import ppzoo
from ppzoo import registry
from ppzoo.loss import causal_lm_loss
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model
from ppzoo.weights import Checkpoint

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint_dir(request, tmp_path_factory):
    adapter = registry.adapters()[request.param]
    return request.param, save_tiny_model(adapter, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_stage_chain_equals_reference(checkpoint_dir, padded):
    name, directory = checkpoint_dir
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, left_pad=padded)
    mask = mask if padded else None
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    adapter = registry.adapter_for(reference.config)
    for n in (1, 2, 3, 4):
        plan = ppzoo.plan(directory, pp=n)
        stages = [build_stage(reference.config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager") for i in range(n)]
        logits = run_chain(stages, ids, attention_mask=mask)
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
        named = [(k, p) for s in stages for k, p in s.named_parameters()]
        assert sorted(k for k, _ in named) == sorted(k for k, _ in reference.named_parameters())
        assert grad_mismatches(named, reference) == [], f"{name} with {n} stages"


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
def test_sliding_window_is_shorter_than_the_sequence(name, tmp_path):
    """The tiny configs exercise the window: the same weights without it give other logits."""
    adapter = registry.adapters()[name]
    directory = save_tiny_model(adapter, tmp_path)
    reference = load_reference(directory)
    ids, mask, _ = batch(reference.config.vocab_size)
    assert reference.config.sliding_window < ids.shape[1]
    windowed = reference(input_ids=ids, attention_mask=mask).logits
    from transformers import AutoModelForCausalLM

    config = reference.config
    config.sliding_window = None
    config.use_sliding_window = False
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    unwindowed = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32)
    full = unwindowed(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(windowed, full, atol=1e-4)


def test_position_ids_are_honoured(tmp_path):
    adapter = registry.adapters()["llama"]
    directory = save_tiny_model(adapter, tmp_path)
    reference = load_reference(directory)
    ids, _, _ = batch(reference.config.vocab_size, left_pad=False)
    pos = torch.arange(5, 5 + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    plan = ppzoo.plan(directory, pp=2)
    stages = [build_stage(reference.config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager") for i in range(2)]
    with torch.no_grad():
        got = run_chain(stages, ids, position_ids=pos)
        want = reference(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
