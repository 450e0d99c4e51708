"""Global gradient-norm clipping (``Pipeline.clip_grad_norm_``, ``ppzoo.grad_norm``) against the unsplit model.

One spawned 4-process gloo group runs every case: first pp=2 × dp_shard=2 (FSDP2 shards), pp=2 ×
tp=2 (tensor-parallel slices beside replicated norms) and pp=2 × dp_replicate=2 (replicated,
HSDP-style DTensors) on all four ranks; then ranks 0 and 1 join a fresh 2-process group for pp=2
(one stage a rank, loop and V placement). Each runs with an untied and a tied head. Each case
returns its problems instead of raising, so one failure does not leave a peer rank blocked.
"""

from __future__ import annotations

import math
import traceback

import pytest
import torch

import ppzoo
from ppzoo.testing.distributed import free_port, run_distributed, shrink_group
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model, tiny
from ppzoo.training_loop import data_parallel_rows

GLOBAL_BATCH = 8
NORM_TYPES = (2.0, math.inf)
CASES = {
    2: {
        "pp2-1F1B": dict(schedule="1F1B", microbatches=4),
        "pp2-Interleaved1F1B": dict(schedule="Interleaved1F1B", microbatches=4),  # loop: the ends on two ranks
        "pp2-ZBVZeroBubble": dict(schedule="ZBVZeroBubble", microbatches=4),  # V: both ends on rank 0, one parameter
    },
    4: {
        "pp2-dp_shard2": dict(schedule="1F1B", microbatches=2, dp_shard=2),
        "pp2-tp2": dict(schedule="1F1B", microbatches=2, tp=2),
        "pp2-dp_replicate2": dict(schedule="1F1B", microbatches=2, dp_replicate=2),  # (Replicate, Shard) DTensors
    },
}


def _local(grad):
    return grad.to_local() if hasattr(grad, "to_local") else grad


def _case(directory, settings):
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, batch_size=GLOBAL_BATCH, seed=5)
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref_grads = [p.grad.clone() for p in reference.parameters()]
    pipe = ppzoo.pipeline(directory, pp=2, device="cpu", attn_implementation="eager", **settings)
    part = [t[data_parallel_rows(pipe, GLOBAL_BATCH)] for t in (ids, mask, labels)]
    pipe.step(part[0], labels=part[2], attention_mask=part[1])
    named = list(pipe.named_parameters())
    grads = [_local(p.grad).clone() for _, p in named]
    problems, norms = [], {}
    for norm_type in NORM_TYPES:
        for p, g in zip(reference.parameters(), ref_grads):
            p.grad = g.clone()
        unclipped = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()], norm_type)
        max_norm = unclipped.item() / 3  # so that clipping really scales
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
        for (_, p), g in zip(named, grads):
            _local(p.grad).copy_(g)
        got = pipe.clip_grad_norm_(max_norm, norm_type)
        norms[norm_type] = got.item()
        if got.dtype != torch.float32 or got.dim() != 0:
            problems.append(f"norm {norm_type}: {got.dtype} of shape {tuple(got.shape)}, not a float32 scalar")
        if not torch.allclose(got, want, rtol=1e-6, atol=0):
            problems.append(f"norm {norm_type}: {got.item()!r} != unsplit model's {want.item()!r}")
        problems += [f"norm {norm_type}: clipped {m}" for m in grad_mismatches(named, reference)]
    for bad in (dict(max_norm=1.0, norm_type=0), dict(max_norm=-1.0), dict(max_norm=1.0, norm_type="two")):
        try:
            pipe.clip_grad_norm_(**bad)
            problems.append(f"{bad} was accepted")
        except ValueError:
            pass
    return {"problems": problems, "norms": norms}


def _cases_of(world_size, directories):
    results = {}
    for label, settings in CASES[world_size].items():
        for tie, directory in directories.items():
            try:
                results[(label, tie)] = _case(directory, settings)
            except Exception:
                results[(label, tie)] = {"problems": [traceback.format_exc()], "norms": {}}
    return results


def _rank_main(rank, world_size, directories, port):
    results = {4: _cases_of(4, directories)}
    if shrink_group(rank, 2, port):
        results[2] = _cases_of(2, directories)
    return results


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    out = {}
    for tie in ("untied", "tied"):
        adapter, config = tiny("llama", tie_word_embeddings=tie == "tied")
        out[tie] = str(save_tiny_model(adapter, tmp_path_factory.mktemp(tie), config=config))
    return out


@pytest.fixture(scope="module")
def group(directories):
    return run_distributed(_rank_main, 4, directories, free_port(), timeout_s=600)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", sorted(CASES))
def test_clip_grad_norm_equals_unsplit_model(group, world_size):
    """Norm (2 and inf) and clipped gradients equal torch's clip_grad_norm_ on the unsplit model."""
    results = [per_rank[world_size] for per_rank in group[:world_size]]
    for label in CASES[world_size]:
        for tie in ("untied", "tied"):
            for rank, per_rank in enumerate(results):
                assert per_rank[(label, tie)]["problems"] == [], f"{label} {tie}, rank {rank}"
            # one all-reduce gives every rank the very same norm
            assert len({str(r[(label, tie)]["norms"]) for r in results}) == 1, (label, tie)
