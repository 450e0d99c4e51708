"""The MoE router aux loss (ppzoo/aux_loss.py) at another microbatch count than the kit's.

The conformance kit's tiny MoE configs turn the aux loss on, so its stage chain (all stages' aux
loss plus the LM loss is Hugging Face's loss) and its distributed step (four microbatches) test it
for every MoE adapter. This file checks the averaging over microbatches at two, for a dedicated
adapter (Mixtral) and for the native adapter on a zoo type (GraniteMoE).
``ppzoo/architectures/moe.py`` states the semantics: each stage adds ``coef × load_balancing(its
own layers' router logits, this microbatch) × its share of the model's routers``, averaged over
the microbatches. The reference below computes exactly that from the unsplit Hugging Face model,
with the family's own ``load_balancing_loss_func`` and coefficient.
"""

from __future__ import annotations

import traceback

import pytest
import torch

import ppzoo
from ppzoo import registry
from ppzoo.loss import causal_lm_loss
from ppzoo.testing import census
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model

MICROBATCHES = 2
AUX = {"output_router_logits": True, "router_aux_loss_coef": 0.5}
SEQ_LEN = 12


# -- the distributed step: per stage, per microbatch -----------------------------------------------


def _reference_loss(reference, plan, ids, mask, labels):
    import inspect

    balancing = inspect.getmodule(type(reference)).load_balancing_loss_func
    logits = reference(input_ids=ids, attention_mask=mask).logits
    loss = causal_lm_loss(logits, labels)
    rows = ids.shape[0] // MICROBATCHES
    layers = reference.config.num_hidden_layers  # every layer of both tiny configs routes
    for mb in range(MICROBATCHES):
        part = slice(mb * rows, (mb + 1) * rows)
        router = reference(input_ids=ids[part], attention_mask=mask[part], output_router_logits=True).router_logits
        assert len(router) == layers
        for stage in plan.stages:
            own = tuple(router[i] for i in stage.layers)
            term = balancing(own, reference.num_experts, reference.num_experts_per_tok, mask[part])
            loss = loss + reference.router_aux_loss_coef * term * (len(own) / layers) / MICROBATCHES
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


@pytest.fixture(scope="module", params=["mixtral", "granitemoe"])
def group(request, tmp_path_factory):
    if request.param == "mixtral":
        adapter = registry.adapters()["mixtral"]
        config = adapter.tiny_config()
        config.output_router_logits = True
        config.router_aux_loss_coef = 0.5
    else:  # the native adapter, on the zoo's tiny config (router aux loss on)
        adapter = census.zoo_adapter(request.param)
        config = adapter.tiny_config()
        assert config.output_router_logits and config.router_aux_loss_coef == 0.5
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp(request.param), config=config)
    return run_distributed(_rank_main, 2, str(directory), timeout_s=600)


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_router_aux_loss_per_stage_and_microbatch(group, schedule):
    for rank, per_rank in enumerate(group):
        assert per_rank[schedule]["problems"] == [], f"rank {rank}"
    assert group[0][schedule]["aux"] > 0.01  # the term is really there, and large enough to matter
