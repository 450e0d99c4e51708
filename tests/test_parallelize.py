"""Parallelism inside stages (``ppzoo.parallelize``) on a 4-process gloo group: pp=2 × (dp_shard | tp | dp_replicate) = 2."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import ppzoo
from ppzoo import registry
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model

GLOBAL_BATCH = 8
MICROBATCHES = 2
DEGREES = {"dp_shard": dict(dp_shard=2), "tp": dict(tp=2), "dp_replicate": dict(dp_replicate=2)}
SCHEDULES = ("1F1B", "Interleaved1F1B")


def _dp_part(pipe, tensors):
    """This rank's part of the global batch: data-parallel ranks split it, tp ranks share it."""
    mesh = pipe.mesh
    dp = mesh["dp_replicate"].size() * mesh["dp_shard"].size()
    index = mesh["dp_replicate"].get_local_rank() * mesh["dp_shard"].size() + mesh["dp_shard"].get_local_rank()
    rows = GLOBAL_BATCH // dp
    return [t[index * rows : (index + 1) * rows] for t in tensors]


LAYERS = [f"model.layers.{i}" for i in range(8)]
#: an embedding-only first stage and a head-only last stage, as the planner makes for heavy heads
ENDS = [["model.embed_tokens"], LAYERS[:4], LAYERS[4:], ["model.norm", "lm_head"]]


def _case(directory, degrees, schedule, count_reductions, stage_modules=None):
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, batch_size=GLOBAL_BATCH, seed=3)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    read = _count_reads()
    try:
        pipe = ppzoo.pipeline(
            directory,
            pp=2,
            schedule=schedule,
            microbatches=MICROBATCHES,
            device="cpu",
            attn_implementation="eager",
            stage_modules=stage_modules,
            **degrees,
        )
    finally:
        read.restore()
    part = _dp_part(pipe, (ids, mask, labels))
    calls = []
    # NOTE: FSDP2 reduce-scatters with reduce_scatter_single where torch has it (older: _tensor)
    collective = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    original = getattr(dist, collective)
    if count_reductions:
        setattr(dist, collective, lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    try:
        loss = pipe.step(part[0], labels=part[2], attention_mask=part[1])
    finally:
        setattr(dist, collective, original)
    problems = []
    if not torch.allclose(loss, out.loss, rtol=1e-5, atol=0):
        problems.append(f"loss {loss.item()} != reference {out.loss.item()}")
    named = list(pipe.named_parameters())
    problems += grad_mismatches(named, reference)
    kinds = sorted({type(p).__name__ for _, p in named})
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for _, p in named)
    if read.elements != held:
        problems.append(f"read {read.elements} checkpoint elements but holds {held}: not only its own shards")
    # NOTE: on CPU every read lands in place: the bytes fetched are the held elements, in the
    # checkpoint's float32 (save_tiny_model), whether a shard is rows or columns of its tensor
    if read.file_bytes != held * torch.float32.itemsize:
        problems.append(f"fetched {read.file_bytes} bytes from the checkpoint but holds {held} float32 elements")
    # one FSDP group per decoder layer, plus the stage root when it holds parameters of its own
    fsdp_groups = sum(
        len(m.get_submodule("model.layers")) + any(not n.startswith("model.layers.") for n, _ in m.named_parameters())
        for m in pipe.stages
    )
    return {"problems": problems, "kinds": kinds, "reductions": len(calls), "fsdp_groups": fsdp_groups}


class _count_reads:
    """Count the checkpoint elements this rank reads (whole tensors and slices), and the bytes that
    reads straight into the parameters' storage fetch from the files."""

    def __init__(self):
        import ppzoo.checkpoint.reading
        from ppzoo.checkpoint import Checkpoint

        self.elements = self.file_bytes = 0
        self._originals = (Checkpoint._get_tensor, Checkpoint._get_slice, ppzoo.checkpoint.reading._pread_into)
        get_tensor, get_slice, pread_into = self._originals

        def counting_tensor(checkpoint, handle, key):
            tensor = get_tensor(checkpoint, handle, key)
            self.elements += tensor.numel()
            return tensor

        def counting_slice(checkpoint, handle, key, part):
            tensor = get_slice(checkpoint, handle, key, part)
            self.elements += tensor.numel()
            return tensor

        def counting_pread(fd, buffer, offset):
            self.file_bytes += len(buffer)
            return pread_into(fd, buffer, offset)

        Checkpoint._get_tensor, Checkpoint._get_slice = counting_tensor, counting_slice
        ppzoo.checkpoint.reading._pread_into = counting_pread

    def restore(self):
        import ppzoo.checkpoint.reading
        from ppzoo.checkpoint import Checkpoint

        Checkpoint._get_tensor, Checkpoint._get_slice, ppzoo.checkpoint.reading._pread_into = self._originals


def _errors(directory):
    messages = {}
    for label, kwargs in {
        "product": dict(pp=2, dp_shard=3),
        "tp-heads": dict(pp=2, tp=3),
        "cp": dict(pp=2, cp=2),
    }.items():
        try:
            ppzoo.pipeline(directory, device="cpu", **kwargs)
        except ValueError as exc:
            messages[label] = str(exc)
    return messages


def _rank_main(rank, world_size, directory):
    results = {}
    for label, degrees in DEGREES.items():
        for schedule in SCHEDULES:
            try:
                results[(label, schedule)] = _case(directory, degrees, schedule, label == "dp_shard")
            except Exception:
                results[(label, schedule)] = {"problems": [traceback.format_exc()]}
    for label in ("dp_shard", "tp"):
        try:
            results[(label, "ends")] = _case(directory, DEGREES[label], "Interleaved1F1B", False, ENDS)
        except Exception:
            results[(label, "ends")] = {"problems": [traceback.format_exc()]}
    results["errors"] = _errors(directory)
    return results


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    directory = save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("llama"))
    return run_distributed(_rank_main, 4, str(directory), timeout_s=600)


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("label", list(DEGREES))
def test_loss_and_grads_equal_unsplit_model(group, label, schedule):
    for rank, per_rank in enumerate(group):
        assert per_rank[(label, schedule)]["problems"] == [], f"rank {rank}"
    kinds = group[0][(label, schedule)]["kinds"]
    # the parameters really are distributed (DTensors) for sharded and tensor-parallel stages
    assert ("DTensor" in str(kinds)) == (label in ("dp_shard", "tp", "dp_replicate")), kinds


@pytest.mark.distributed
@pytest.mark.parametrize("label", ["dp_shard", "tp"])
def test_stages_without_layers_shard_and_equal_unsplit_model(group, label):
    """Interleaved1F1B over [embedding], 4 layers, 4 layers, [norm, head]: sharded or split by tp."""
    for rank, per_rank in enumerate(group):
        assert per_rank[(label, "ends")]["problems"] == [], f"rank {rank}"
    assert "DTensor" in str(group[0][(label, "ends")]["kinds"])


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fsdp_reduces_gradients_once_per_step(group, schedule):
    """Deferred reduction: one reduce-scatter per FSDP group per step, not one per microbatch."""
    for per_rank in group:
        got = per_rank[("dp_shard", schedule)]
        assert got["reductions"] == got["fsdp_groups"], got


@pytest.mark.distributed
def test_bad_degrees_are_refused_before_communication(group):
    for per_rank in group:
        errors = per_rank["errors"]
        assert errors["product"] == (
            "pp=2 × dp_replicate=1 × dp_shard=3 × cp=1 × tp=1 = 6 processes, but the world size is 4; "
            "launch that many processes or change the degrees"
        )
        assert errors["tp-heads"] == (
            "tp=3 must divide num_attention_heads=4, num_key_value_heads=2, intermediate_size=64; "
            "choose a tp that divides them"
        )
        assert errors["cp"].startswith("cp=2: ppzoo does not implement context parallelism")


def test_default_parallelize_keeps_a_vocab_sharded_embedding_replicated():
    """transformers plans name ``embedding_rowwise`` for some models (in 5.17, for every tied one)."""
    from ppzoo.parallelize import tensor_parallel_styles

    plan = {"model.embed_tokens": "embedding_rowwise", "model.layers.*.mlp.up_proj": "colwise"}
    styles = tensor_parallel_styles(plan)
    assert list(styles) == ["model.layers.*.mlp.up_proj"]
    with pytest.raises(ValueError, match="'sequence_parallel' for 'model.norm' is not supported"):
        tensor_parallel_styles({"model.norm": "sequence_parallel"})
