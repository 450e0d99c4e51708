"""The MoE router aux loss added to the LM loss, in a stage chain and in the distributed step.

The conformance kit's tiny MoE configs leave ``output_router_logits`` off (as Hugging Face does), so
its stage chain and distributed step check the loss without the aux term; these tests turn it on.

In one process, the adapter's ``aux_loss`` over all stages plus the LM loss is Hugging Face's loss.
In the distributed step ``ppzoo/architectures/moe.py`` states the semantics: each stage adds
``coef × load_balancing(its own layers' router logits, this microbatch) × its share of the MoE
layers``, averaged over the microbatches. The reference below computes exactly that from the
unsplit Hugging Face model.
"""

from __future__ import annotations

import traceback

import pytest
import torch

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.loss import causal_lm_loss
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model, tiny

MICROBATCHES = 2
AUX = {"output_router_logits": True, "router_aux_loss_coef": 0.5}
SEQ_LEN = 12


# -- one process: the stage chain ----------------------------------------------------------------
@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def case(request, tmp_path_factory):
    """A saved tiny MoE model with the aux loss on, and the reference's loss, logits and gradients."""
    adapter, config = tiny(request.param, **AUX)
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp(request.param), config=config)
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, seq_len=SEQ_LEN)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return request.param, adapter, directory, reference, out, (ids, mask, labels)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_stage_chain_with_the_aux_loss_equals_reference(case, n):
    name, adapter, directory, reference, out, (ids, mask, labels) = case
    config = reference.config
    the_plan = ppzoo.plan(directory, pp=n)
    stages = [
        build_stage(config, adapter, the_plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(n)
    ]
    logits = run_chain(stages, ids, attention_mask=mask)
    aux = adapter.aux_loss(config, stages, mask)
    # NOTE: the aux loss is large enough here that leaving it out fails the loss check.
    assert aux is not None and config.router_aux_loss_coef * out.aux_loss.item() > 0.1
    loss = causal_lm_loss(logits, labels) + aux
    loss.backward()

    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
    named = [(k, p) for s in stages for k, p in s.named_parameters()]
    assert sorted(k for k, _ in named) == sorted(k for k, _ in reference.named_parameters())
    assert grad_mismatches(named, reference) == [], f"{name} with {n} stages"


# -- the distributed step: per stage, per microbatch -----------------------------------------------


def _reference_loss(reference, plan, ids, mask, labels):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = reference.config
    logits = reference(input_ids=ids, attention_mask=mask).logits
    loss = causal_lm_loss(logits, labels)
    rows = ids.shape[0] // MICROBATCHES
    layers = cfg.num_hidden_layers
    for mb in range(MICROBATCHES):
        part = slice(mb * rows, (mb + 1) * rows)
        router = reference(input_ids=ids[part], attention_mask=mask[part], output_router_logits=True).router_logits
        for stage in plan.stages:
            own = tuple(router[i] for i in stage.layers)
            term = load_balancing_loss_func(own, cfg.num_local_experts, cfg.num_experts_per_tok, mask[part])
            loss = loss + cfg.router_aux_loss_coef * term * (len(own) / layers) / MICROBATCHES
    return loss


def _case(directory, schedule):
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, batch_size=4, seed=5)
    pipe = ppzoo.pipeline(
        directory, pp=2, schedule=schedule, microbatches=MICROBATCHES, device="cpu", attn_implementation="eager"
    )
    want = _reference_loss(reference, pipe.plan, ids, mask, labels)
    want.backward()
    loss = pipe.step(ids, labels=labels, attention_mask=mask)
    problems = []
    if not torch.allclose(loss, want, rtol=1e-5, atol=0):
        problems.append(f"loss {loss.item()} != documented reference {want.item()}")
    problems += grad_mismatches(list(pipe.named_parameters()), reference)
    ce_only = causal_lm_loss(reference(input_ids=ids, attention_mask=mask).logits, labels)
    return {"problems": problems, "aux": (want - ce_only).item()}


def _rank_main(rank, world_size, directory):
    out = {}
    for schedule in ("1F1B", "ZBVZeroBubble"):
        try:
            out[schedule] = _case(directory, schedule)
        except Exception:
            out[schedule] = {"problems": [traceback.format_exc()], "aux": 0.0}
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    adapter = registry.adapters()["mixtral"]
    config = adapter.tiny_config()
    config.output_router_logits = True
    config.router_aux_loss_coef = 0.5
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp("mixtral"), config=config)
    return run_distributed(_rank_main, 2, str(directory), timeout_s=600)


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_router_aux_loss_per_stage_and_microbatch(group, schedule):
    for rank, per_rank in enumerate(group):
        assert per_rank[schedule]["problems"] == [], f"rank {rank}"
    assert group[0][schedule]["aux"] > 0.01  # the term is really there, and large enough to matter
