"""Stages built and chained in one process (``ppzoo.stage``).

That the chain of 1-4 stages is the unsplit Hugging Face model for every adapter (a left-padded
batch: loss, logits and every gradient; a batch without attention mask: logits) is the conformance
kit's stage chain (``tests/test_conformance.py``); here, what it does not cover.
"""

import pytest
import torch

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.reference import batch, load_reference, save_tiny_model


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
def test_sliding_window_is_shorter_than_the_sequence(name, tmp_path):
    """The tiny configs exercise the window: the same weights without it give other logits.

    NOTE: the same check for the other sliding-window adapters is in ``tests/test_architectures.py``.
    """
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
    stages = [
        build_stage(reference.config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(2)
    ]
    with torch.no_grad():
        got = run_chain(stages, ids, position_ids=pos)
        want = reference(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
