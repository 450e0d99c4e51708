"""Masks, RoPE tables and default positions kept from one microbatch to the next (``ppzoo.layer_inputs``)."""

import pytest
import torch

import ppzoo
from ppzoo import layer_inputs, registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.layout import FULL
from ppzoo.loss import causal_lm_loss
from ppzoo.stage import build_stage
from ppzoo.testing.reference import save_tiny_model

SEQ = 12
#: left padding of the microbatches: two alike (the second may reuse), none, more, then the first again
PADS = (2, 2, 0, 5, 2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    adapter = registry.adapters()["llama"]
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp("llama"))
    return adapter, directory


def _stages(adapter, directory, *, attn="sdpa"):
    config = ppzoo.config.load_config(directory)
    plan = ppzoo.plan(directory, pp=2)
    return [
        build_stage(config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation=attn)
        for i in range(2)
    ]


def _microbatches(vocab: int, pads=PADS):
    gen = torch.Generator().manual_seed(0)
    out = []
    for pad in pads:
        ids = torch.randint(3, vocab, (1, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        mask[:, :pad] = 0
        out.append((ids, mask))
    return out


def _inner(stage, adapter):
    return stage.get_submodule(adapter.inner_name)


def _fresh(fn, inner):
    """``fn()`` with reuse off: what the stage computes from scratch."""
    kept = layer_inputs.of(inner)
    kept.reuse = False
    try:
        return fn()
    finally:
        kept.reuse = True


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a is None and b is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["left-padded", "default"])
def test_kept_masks_and_tables_equal_recomputed_ones_across_left_padded_microbatches(llama, attn, positions):
    adapter, directory = llama
    stage = _stages(adapter, directory, attn=attn)[1]  # NOTE: the second stage's input is hidden states
    inner = _inner(stage, adapter)
    reused = []
    previous = None
    for _ids, mask in _microbatches(inner.config.vocab_size):
        hidden = torch.randn(1, SEQ, inner.config.hidden_size)
        if positions == "default":
            pos = layer_inputs.default_positions(inner, hidden)
        else:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # NOTE: a new tensor each microbatch
        got_masks = adapter.masks(inner, hidden, mask.clone(), pos, {FULL})
        got_ropes = adapter.position_embeddings(inner, hidden, pos, {FULL})
        want_masks = _fresh(lambda: adapter.masks(inner, hidden, mask, pos, {FULL}), inner)  # noqa: B023
        want_ropes = _fresh(lambda: adapter.position_embeddings(inner, hidden, pos, {FULL}), inner)  # noqa: B023
        assert _equal(got_masks, want_masks) and _equal(got_ropes, want_ropes)
        if previous is not None:
            reused.append(got_masks[FULL] is previous[FULL] and got_masks[FULL] is not None)
        previous = got_masks
    # the second microbatch's mask is the first's (same padding); none is kept across a change
    assert reused == [True, False, False, False]


def test_a_step_with_reuse_is_bit_for_bit_one_without(llama):
    adapter, directory = llama
    kept, fresh = _stages(adapter, directory), _stages(adapter, directory)
    for stage in fresh:
        layer_inputs.of(_inner(stage, adapter)).reuse = False
    for stages in (kept, fresh):
        for stage in stages:
            stage.train()
    vocab = _inner(kept[0], adapter).config.vocab_size
    batches = _microbatches(vocab) + [(ids, None) for ids, _ in _microbatches(vocab, pads=(0, 0))]
    results = []
    for stages in (kept, fresh):
        losses = []
        for ids, mask in batches:
            hidden = stages[0](ids, attention_mask=mask)
            boundary = hidden.detach().requires_grad_()
            loss = causal_lm_loss(stages[1](boundary, attention_mask=mask), ids)
            loss.backward()
            hidden.backward(boundary.grad)
            losses.append(loss.detach())
        grads = {k: p.grad.clone() for s in stages for k, p in s.named_parameters()}
        results.append((losses, grads))
    (losses, grads), (want_losses, want_grads) = results
    assert all(torch.equal(a, b) for a, b in zip(losses, want_losses, strict=True))
    assert grads.keys() == want_grads.keys() and all(torch.equal(grads[k], want_grads[k]) for k in grads)


def test_default_positions_and_tables_are_kept_without_a_mask(llama):
    adapter, directory = llama
    inner = _inner(_stages(adapter, directory)[1], adapter)
    hidden = torch.randn(1, SEQ, inner.config.hidden_size)
    first = layer_inputs.default_positions(inner, hidden)
    assert torch.equal(first, torch.arange(SEQ).unsqueeze(0))
    assert layer_inputs.default_positions(inner, torch.randn_like(hidden)) is first
    rope = adapter.position_embeddings(inner, hidden, first, {FULL})
    assert adapter.position_embeddings(inner, torch.randn_like(hidden), first, {FULL})[FULL] is rope[FULL]
    longer = layer_inputs.default_positions(inner, torch.randn(1, SEQ + 1, inner.config.hidden_size))
    assert torch.equal(longer, torch.arange(SEQ + 1).unsqueeze(0))


def test_a_changed_table_buffer_or_position_is_computed_again(llama):
    adapter, directory = llama
    inner = _inner(_stages(adapter, directory)[1], adapter)
    rotary = getattr(inner, adapter.rotary_name)
    hidden = torch.randn(1, SEQ, inner.config.hidden_size)
    pos = torch.arange(SEQ).unsqueeze(0)

    def rope():
        return adapter.position_embeddings(inner, hidden, pos, {FULL})[FULL]

    def fresh():
        return _fresh(rope, inner)

    kept = rope()
    kept[0].mul_(2)  # NOTE: a caller changing the kept table in place
    assert not _equal(kept, fresh()) and _equal(rope(), fresh())
    with torch.no_grad():
        rotary.inv_freq.mul_(0.5)  # the frequencies changed in place
    assert _equal(rope(), fresh())
    rotary.inv_freq = rotary.inv_freq * 2  # a new buffer
    assert _equal(rope(), fresh())
    before = rope()
    pos.add_(1)  # the positions changed in place
    after = rope()
    assert after is not before and _equal(after, fresh())


def test_a_hooked_rotary_runs_on_every_call(llama):
    adapter, directory = llama
    inner = _inner(_stages(adapter, directory)[1], adapter)
    calls = []
    getattr(inner, adapter.rotary_name).register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.randn(1, SEQ, inner.config.hidden_size)
    pos = torch.arange(SEQ).unsqueeze(0)
    for _ in range(3):
        adapter.position_embeddings(inner, hidden, pos, {FULL})
    assert len(calls) == 3
