"""Tied embeddings across stages: grads summed between first and last stage, copies stay identical.

The conformance kit checks tied weights for the adapters that tie by default (Gemma family, one
step). Here: any model with ``tie_word_embeddings=True`` (Llama, Qwen2) split into 1-4 stages in
one process, and several optimizer steps of the distributed pipeline, at pp=2 and pp=4.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.loss import causal_lm_loss
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model, tiny

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
STEPS = 3


# -- one process: the stage chain ----------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def chain_case(request, tmp_path_factory):
    """A saved tiny model with ``tie_word_embeddings=True`` and the reference's loss, logits and gradients."""
    adapter, config = tiny(request.param, tie_word_embeddings=True)
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp(request.param), config=config)
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, seq_len=12)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return request.param, adapter, directory, reference, out, (ids, mask, labels)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_tied_stage_chain_equals_reference(chain_case, n):
    name, adapter, directory, reference, out, (ids, mask, labels) = chain_case
    config = reference.config
    the_plan = ppzoo.plan(directory, pp=n)
    stages = [
        build_stage(config, adapter, the_plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(n)
    ]
    logits = run_chain(stages, ids, attention_mask=mask)
    assert adapter.aux_loss(config, stages, mask) is None
    loss = causal_lm_loss(logits, labels)
    loss.backward()

    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
    named = [(k, p) for s in stages for k, p in s.named_parameters()]
    tied = adapter.tied_weights(config)
    assert tied == {HEAD: EMBED}
    expected = {k for k, _ in reference.named_parameters()} | (set(tied) if n > 1 else set())
    assert sorted(k for k, _ in named) == sorted(expected)
    assert grad_mismatches(named, reference, tied=tied) == [], f"{name} with {n} stages"
    _assert_tied_gradient(stages, reference)


def _assert_tied_gradient(stages, reference):
    """The reference's one tied gradient is the first stage's embedding grad + the last stage's head grad."""
    first, last = stages[0], stages[-1]
    want = reference.model.embed_tokens.weight.grad
    if len(stages) == 1:
        assert first.lm_head.weight is first.model.embed_tokens.weight
        torch.testing.assert_close(first.model.embed_tokens.weight.grad, want, rtol=1e-5, atol=1e-6)
        return
    assert first.lm_head is None and last.model.embed_tokens is None
    torch.testing.assert_close(last.lm_head.weight, first.model.embed_tokens.weight, rtol=0, atol=0)
    got = first.model.embed_tokens.weight.grad + last.lm_head.weight.grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first.model.embed_tokens.weight.grad, want, atol=1e-4)  # one part alone is not it


# -- the distributed pipeline: optimizer steps keep the copies identical -----------------------------


def _train_case(directory, pp, schedule):
    reference = load_reference(directory)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    pipe = ppzoo.pipeline(
        directory, pp=pp, schedule=schedule, microbatches=4, device="cpu", attn_implementation="eager"
    )
    opt = torch.optim.SGD(pipe.parameters(), lr=0.5, momentum=0.9)
    params = dict(pipe.named_parameters())
    problems = []
    for step in range(STEPS):
        ref_opt.zero_grad()
        opt.zero_grad()
        for part in range(2):  # two steps accumulate into each update: earlier gradients are not summed again
            ids, mask, labels = batch(reference.config.vocab_size, batch_size=4, seed=2 * step + part)
            reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            pipe.step(ids, labels=labels, attention_mask=mask)
        want = reference.get_parameter(EMBED).grad
        for name in (EMBED, HEAD):
            if name in params and not torch.allclose(params[name].grad, want, rtol=1e-5, atol=1e-6):
                problems.append(
                    f"step {step}: {name}.grad differs from the tied reference grad by "
                    f"{(params[name].grad - want).abs().max().item():.3e}"
                )
        ref_opt.step()
        opt.step()
    # After the optimizer steps both copies are bitwise identical (or one parameter).
    last_rank = pipe.plan.stages[-1].rank
    head = params[HEAD].detach().clone() if HEAD in params else torch.zeros_like(reference.get_parameter(EMBED))
    if pipe.holds_last and HEAD not in params:
        head = params[EMBED].detach().clone()  # V placement: the head is the embedding itself
    dist.broadcast(head, src=last_rank)
    if pipe.holds_first and not torch.equal(head, params[EMBED].detach()):
        problems.append("after the optimizer steps the head copy differs from the embedding")
    if pipe.holds_first and not torch.allclose(params[EMBED], reference.get_parameter(EMBED), rtol=1e-5, atol=1e-6):
        problems.append("the trained embedding differs from the unsplit model's")
    names = [n for n, _ in pipe.named_parameters()]
    return {"problems": problems, "names": names, "v_tied": pipe.holds_first and pipe.holds_last and HEAD not in params}


def _rank_main(rank, world_size, directories, schedules):
    out = {}
    for arch, directory in directories.items():
        for schedule in schedules:
            try:
                out[(arch, schedule)] = _train_case(directory, world_size, schedule)
            except Exception:
                out[(arch, schedule)] = {"problems": [traceback.format_exc()], "names": [], "v_tied": False}
    return out


def _tied_dirs(tmp_path_factory, archs):
    dirs = {}
    for arch in archs:
        adapter = registry.adapters()[arch]
        config = adapter.tiny_config()
        config.tie_word_embeddings = True
        dirs[arch] = str(save_tiny_model(adapter, tmp_path_factory.mktemp(arch), config=config))
    return dirs


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    dirs = _tied_dirs(tmp_path_factory, ["llama", "gemma"])
    return run_distributed(_rank_main, 2, dirs, ("1F1B", "ZBVZeroBubble"), timeout_s=600)


@pytest.fixture(scope="module")
def pp4(tmp_path_factory):
    dirs = _tied_dirs(tmp_path_factory, ["llama"])
    return run_distributed(_rank_main, 4, dirs, ("1F1B", "ZBVZeroBubble"), timeout_s=600)


@pytest.mark.distributed
@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_tied_pp2(pp2, arch, schedule):
    for rank, per_rank in enumerate(pp2):
        assert per_rank[(arch, schedule)]["problems"] == [], f"rank {rank}"
    if schedule == "ZBVZeroBubble":
        # V placement: rank 0 holds the first and last stage, and the head is the embedding itself
        assert pp2[0][(arch, schedule)]["v_tied"]
        assert HEAD not in pp2[0][(arch, schedule)]["names"]


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_tied_pp4(pp4, schedule):
    for rank, per_rank in enumerate(pp4):
        assert per_rank[("llama", schedule)]["problems"] == [], f"rank {rank}"
    holders = [r for r, per_rank in enumerate(pp4) if HEAD in per_rank[("llama", schedule)]["names"]]
    assert holders == ([3] if schedule == "1F1B" else [])
