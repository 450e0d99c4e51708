"""Parallelism inside stages (``ppzoo.parallelize``) on a 4-process gloo group: pp=2 × (dp_shard | tp | dp_replicate) = 2.

Activation checkpointing runs there too (with FSDP2 and with tensor parallel), and then, with ranks
0 and 1 in a fresh 2-process group, at pp=2 alone (full, selective, every third layer), with
compiled layers (``compile=True``).
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import ppzoo
import ppzoo.parallelize
from ppzoo import registry
from ppzoo.testing.distributed import free_port, run_distributed, shrink_group
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model
from ppzoo.training_loop import data_parallel_rows

GLOBAL_BATCH = 8
MICROBATCHES = 2
DEGREES = {"dp_shard": dict(dp_shard=2), "tp": dict(tp=2), "dp_replicate": dict(dp_replicate=2)}
SCHEDULES = ("1F1B", "Interleaved1F1B")


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
    part = [t[data_parallel_rows(pipe, GLOBAL_BATCH)] for t in (ids, mask, labels)]
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
    if count_reductions:
        # a new schedule (eval's, a new length's) must not drop the gradients accumulated so far,
        # although torch clears sharded stages' gradients when it sets one up
        pipe.eval(part[0], attention_mask=part[1])
        problems += [f"after eval: {p}" for p in grad_mismatches(named, reference)]
        short = [t[:, :-3] for t in (ids, mask, labels)]
        reference(input_ids=short[0], attention_mask=short[1], labels=short[2]).loss.backward()
        short = [t[data_parallel_rows(pipe, GLOBAL_BATCH)] for t in short]
        pipe.step(short[0], labels=short[2], attention_mask=short[1])
        problems += [f"after a step at a new length: {p}" for p in grad_mismatches(named, reference)]
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
    for label in ("dp_shard", "tp"):
        for what, case in (
            ("checkpointing", lambda degrees: _checkpointing_case(directory, degrees, ("full",))),
            ("compile", lambda degrees: _compile_case(directory, degrees)),
        ):
            try:
                results[(label, what)] = case(DEGREES[label])
            except Exception:
                results[(label, what)] = {"problems": [traceback.format_exc()]}
    results["errors"] = _errors(directory)
    return results


# -- activation checkpointing and compile: the same loss and gradients as the run without ----------
def _layer_calls(pipe):
    """Forward calls of each decoder layer's MLP: twice per microbatch where the layer is recomputed.

    NOTE: a pre-hook: the recomputation stops once it has every saved tensor, before the MLP returns.
    """
    calls = {}
    for module in pipe.stages:
        for key, layer in module.get_submodule("model.layers").items():
            calls[int(key)] = 0
            layer.mlp.register_forward_pre_hook(lambda *_, i=int(key): calls.__setitem__(i, calls[i] + 1))
    return calls


def _checkpointing_case(directory, degrees, modes, **settings):
    """Steps of a pipeline without activation checkpointing, then one per mode: all must agree.

    With dropout on (``attention_dropout``) and the same seed before each step: a recomputed layer
    must draw the same dropout mask as its first forward.
    """
    ids, mask, labels = batch(96, batch_size=GLOBAL_BATCH, seed=4)
    runs, problems = {}, []
    for mode in (None, *modes):
        pipe = ppzoo.pipeline(
            directory,
            pp=2,
            schedule="1F1B",
            microbatches=MICROBATCHES,
            device="cpu",
            attn_implementation="eager",
            activation_checkpointing=mode,
            attention_dropout=0.2,
            **degrees,
            **settings,
        )
        part = [t[data_parallel_rows(pipe, GLOBAL_BATCH)] for t in (ids, mask, labels)]
        calls = _layer_calls(pipe)
        torch.manual_seed(11)
        loss = pipe.step(part[0], labels=part[2], attention_mask=part[1])
        grads = {
            n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in pipe.named_parameters()
        }
        runs[mode] = loss, grads
        recomputed = sorted(i for i, n in calls.items() if n == 2 * MICROBATCHES)
        once = sorted(i for i, n in calls.items() if n == MICROBATCHES)
        every = ppzoo.parallelize.parse_activation_checkpointing(mode) if mode else None
        want = sorted(i for i in calls if every and (i + 1) % every == 0)
        if recomputed != want or len(recomputed) + len(once) != len(calls):
            problems.append(f"{mode}: layer forward calls {calls}, expected layers {want} recomputed")
        if mode is None:
            continue
        base_loss, base_grads = runs[None]
        if not torch.allclose(loss, base_loss, rtol=1e-6, atol=0):
            problems.append(f"{mode}: loss {loss.item()!r} != {base_loss.item()!r} without checkpointing")
        for name, grad in grads.items():
            if not torch.allclose(grad, base_grads[name], rtol=1e-6, atol=1e-7):
                problems.append(f"{mode}: {name} max |diff| {(grad - base_grads[name]).abs().max().item():.3e}")
    return {"problems": problems}


def _compile_case(directory, degrees):
    """compile=True with full checkpointing: loss and gradients of the eager run, within 1e-5."""
    from torch._dynamo.utils import counters

    counters.clear()
    ids, mask, labels = batch(96, batch_size=GLOBAL_BATCH, seed=4)
    runs, problems = {}, []
    for settings in ({}, dict(compile=True, activation_checkpointing="full")):
        pipe = ppzoo.pipeline(
            directory, pp=2, microbatches=MICROBATCHES, device="cpu", attn_implementation="eager", **degrees, **settings
        )
        part = [t[data_parallel_rows(pipe, GLOBAL_BATCH)] for t in (ids, mask, labels)]
        loss = pipe.step(part[0], labels=part[2], attention_mask=part[1])
        grads = {
            n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in pipe.named_parameters()
        }
        runs[bool(settings)] = loss, grads
        layers = [layer for m in pipe.stages for layer in m.get_submodule("model.layers").values()]
        compiled = [getattr(layer, "_compiled_call_impl", None) is not None for layer in layers]
        if compiled != [bool(settings)] * len(layers):
            problems.append(f"{settings}: layers compiled {compiled}")
    (eager_loss, eager), (loss, grads) = runs[False], runs[True]
    if counters["stats"]["unique_graphs"] == 0:
        problems.append("torch.compile captured no graph")
    if not torch.allclose(loss, eager_loss, rtol=1e-5, atol=0):
        problems.append(f"loss {loss.item()!r} != eager {eager_loss.item()!r}")
    for name, grad in grads.items():
        if not torch.allclose(grad, eager[name], rtol=1e-5, atol=1e-6):
            problems.append(f"{name}: max |diff| {(grad - eager[name]).abs().max().item():.3e}")
    return {"problems": problems}


def _pipeline_only_main(directory):
    results = {}
    for label, case in {
        "checkpointing": lambda: _checkpointing_case(directory, {}, ("full", "selective", 3)),
        "compile": lambda: _compile_case(directory, {}),
    }.items():
        try:
            results[label] = case()
        except Exception:
            results[label] = {"problems": [traceback.format_exc()]}
    return results


def _both_main(rank, world_size, directory, port):
    results = {"pp2-dp2": _rank_main(rank, world_size, directory)}
    if shrink_group(rank, 2, port):
        # NOTE: compiled as in a fresh process: the compile case counts the graphs it captures
        import torch._dynamo

        torch._dynamo.reset()
        results["pp2"] = _pipeline_only_main(directory)
    return results


@pytest.fixture(scope="module")
def both_groups(tmp_path_factory):
    directory = save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("llama"))
    return run_distributed(_both_main, 4, str(directory), free_port(), timeout_s=600)


@pytest.fixture(scope="module")
def group(both_groups):
    """Results of the 4-process group (pp=2 × 2), by rank."""
    return [per_rank["pp2-dp2"] for per_rank in both_groups]


@pytest.fixture(scope="module")
def pipeline_only_group(both_groups):
    """Results of the 2-process group (pp=2 alone), by rank."""
    return [per_rank["pp2"] for per_rank in both_groups[:2]]


@pytest.mark.distributed
def test_activation_checkpointing_keeps_loss_and_grads(pipeline_only_group):
    """pp=2: full, selective (every second layer) and every third layer, with dropout on."""
    for rank, per_rank in enumerate(pipeline_only_group):
        assert per_rank["checkpointing"]["problems"] == [], f"rank {rank}"


@pytest.mark.distributed
def test_compiled_layers_keep_loss_and_grads(pipeline_only_group):
    """pp=2, compile=True with full activation checkpointing (one compile per stage: one layer class)."""
    for rank, per_rank in enumerate(pipeline_only_group):
        assert per_rank["compile"]["problems"] == [], f"rank {rank}"


@pytest.mark.distributed
@pytest.mark.parametrize("what", ["checkpointing", "compile"])
@pytest.mark.parametrize("label", ["dp_shard", "tp"])
def test_checkpointing_and_compile_compose_with_fsdp_and_tp(group, label, what):
    """Full checkpointing, then compile=True with it, on FSDP2-sharded and tensor-parallel stages."""
    for rank, per_rank in enumerate(group):
        assert per_rank[(label, what)]["problems"] == [], f"rank {rank}"


def test_activation_checkpointing_values():
    from ppzoo.parallelize import parse_activation_checkpointing

    values = (None, "full", "Selective", 1, 4, "3")
    assert [parse_activation_checkpointing(v) for v in values] == [None, 1, 2, 1, 4, 3]
    for bad in ("some", 0, "0", -1, True, 2.0):
        with pytest.raises(ValueError, match=f"activation_checkpointing={bad!r} is not one of"):
            parse_activation_checkpointing(bad)


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
