"""The runtime (``ppzoo.pipeline`` / ``Pipeline``): what the conformance kit's distributed step does not cover.

The kit (``tests/test_conformance.py``) already checks, for every adapter, that step and eval equal
the unsplit Hugging Face model under GPipe, 1F1B, Interleaved1F1B, ZBVZeroBubble and DualPipeV.
Here, on Llama: the other schedules (LoopedBFS, InterleavedZeroBubble, a CSV schedule), stages
without layers, a new sequence length, batch errors, V-placement warm-up and ``info``.

One spawned 2-rank gloo group runs every case; each case returns its problems instead of raising,
so one failure does not leave the peer rank blocked.
"""

from __future__ import annotations

import traceback

import pytest
import torch

import ppzoo
from ppzoo import registry
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model

#: the schedules the conformance kit's distributed step does not run (it runs the other five)
SCHEDULES = ["LoopedBFS", "InterleavedZeroBubble"]

# A compute-only CSV schedule for 2 ranks × 2 stages (loop placement), 4 microbatches:
# each row is one rank's actions ("2F1" = stage 2, forward, microbatch 1; "B" = full backward).
CSV_SCHEDULE = "\n".join(
    ",".join([f"{s}F{m}" for s in (r, r + 2) for m in range(4)] + [f"{s}B{m}" for s in (r + 2, r) for m in range(4)])
    for r in range(2)
)


def _reference_step(directory, ids, mask, labels):
    reference = load_reference(directory)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return reference, out


LAYERS = [f"model.layers.{i}" for i in range(8)]
#: splits whose first stage holds only the embedding or whose last holds only the norm and head
ENDS = {
    "1F1B": [["model.embed_tokens", *LAYERS], ["model.norm", "lm_head"]],
    "Interleaved1F1B": [["model.embed_tokens"], LAYERS[:4], LAYERS[4:], ["model.norm", "lm_head"]],
    "ZBVZeroBubble": [["model.embed_tokens"], LAYERS[:4], LAYERS[4:], ["model.norm", "lm_head"]],
}


def _schedule_case(directory, schedule, stage_modules=None):
    ids, mask, labels = batch(96, batch_size=4)
    reference, out = _reference_step(directory, ids, mask, labels)
    pipe = ppzoo.pipeline(
        directory,
        pp=2,
        schedule=schedule,
        microbatches=4,
        device="cpu",
        attn_implementation="eager",
        stage_modules=stage_modules,
    )
    loss = pipe.step(ids, labels=labels, attention_mask=mask)
    problems = []
    if not torch.allclose(loss, out.loss, rtol=1e-5, atol=0):
        problems.append(f"loss {loss.item()} != reference {out.loss.item()}")
    problems += grad_mismatches(list(pipe.named_parameters()), reference)
    logits = pipe.eval(ids, attention_mask=mask)
    if pipe.holds_last != (logits is not None):
        problems.append(f"eval returned {type(logits).__name__} on a rank with holds_last={pipe.holds_last}")
    if logits is not None and not torch.allclose(logits, out.logits, rtol=1e-5, atol=1e-6):
        problems.append(f"eval logits differ by {(logits - out.logits).abs().max().item():.3e}")
    return {"problems": problems, "params": sorted(n for n, _ in pipe.named_parameters()), "info": pipe.info}


def _sequence_length_case(directory):
    """Two steps of different lengths without zeroing: grads are the sum of both reference steps."""
    first = batch(96, batch_size=4, seq_len=12, seed=1)
    second = batch(96, batch_size=4, seq_len=7, seed=2)
    reference = load_reference(directory)
    ref_losses = []
    for ids, mask, labels in (first, second, first):
        out = reference(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        ref_losses.append(out.loss)
    pipe = ppzoo.pipeline(directory, pp=2, schedule="1F1B", microbatches=4, device="cpu", attn_implementation="eager")
    problems = []
    for (ids, mask, labels), want in zip((first, second, first), ref_losses):
        loss = pipe.step(ids, labels=labels, attention_mask=mask)
        if not torch.allclose(loss, want, rtol=1e-5, atol=0):
            problems.append(f"seq {ids.shape[1]}: loss {loss.item()} != {want.item()}")
    problems += grad_mismatches(list(pipe.named_parameters()), reference)
    ids, mask, _ = second
    logits = pipe.eval(ids, attention_mask=mask)
    if logits is not None:
        want = reference(input_ids=ids, attention_mask=mask).logits
        if not torch.allclose(logits, want, rtol=1e-5, atol=1e-6):
            problems.append("eval logits at the second length differ")
    return {"problems": problems}


def _batch_error_case(directory):
    pipe = ppzoo.pipeline(directory, pp=2, schedule="1F1B", microbatches=4, device="cpu")
    ids, mask, labels = batch(96, batch_size=6)
    try:
        pipe.step(ids, labels=labels, attention_mask=mask)
    except ValueError as exc:
        message = str(exc)
    else:
        message = None
    # the group is still usable after the refusal: nothing was sent
    ids, mask, labels = batch(96, batch_size=4)
    loss = pipe.step(ids, labels=labels, attention_mask=mask)
    return {"message": message, "loss": loss.item()}


def _token_error_case(directory):
    """Out-of-vocabulary ids and labels are refused on every rank alike; the group stays usable."""
    pipe = ppzoo.pipeline(directory, pp=2, schedule="1F1B", microbatches=2, device="cpu")
    ids, mask, labels = batch(96, batch_size=2)
    bad_ids, bad_labels = ids.clone(), labels.clone()
    bad_ids[1, 3] = 96
    bad_labels[0, 2] = -5
    messages = {}
    for name, kwargs in {
        "ids": dict(input_ids=bad_ids, labels=labels),
        "labels": dict(input_ids=ids, labels=bad_labels),
        "float": dict(input_ids=ids.float(), labels=labels),
    }.items():
        try:
            pipe.step(kwargs.pop("input_ids"), attention_mask=mask, **kwargs)
        except ValueError as exc:
            messages[name] = str(exc)
    loss = pipe.step(ids, labels=labels, attention_mask=mask)
    return {"messages": messages, "loss": loss.item()}


def _warm_up_case(directory):
    """Under V placement no connection warm-up message goes from a rank to itself (gloo cannot);
    the same pipeline's ``info``."""
    import torch.distributed as dist

    pipe = ppzoo.pipeline(directory, pp=2, schedule="ZBVZeroBubble", microbatches=4, device="cpu")
    runtime = pipe._runtime(1, 8, train=True)
    rank = dist.get_rank(pipe._pp_group)
    return {
        "peers": {
            stage.stage_index: [op.group_peer for op in stage._get_init_p2p_neighbors_ops()]
            for stage in runtime._stages
        },
        "rank": rank,
        "info": pipe.info,
    }


def _collectives_case(directory):
    """One step's collective calls (besides the schedule's point-to-point traffic) and its loss."""
    import torch.distributed as dist

    pipe = ppzoo.pipeline(directory, pp=2, schedule="1F1B", microbatches=2, device="cpu")
    ids, mask, labels = batch(96, batch_size=2)
    pipe.step(ids, labels=labels, attention_mask=mask)
    counts = {}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast", "barrier")}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return call

    try:
        for name in originals:
            setattr(dist, name, counted(name))
        loss = pipe.step(ids, labels=labels, attention_mask=mask)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"collectives": counts, "loss": loss.item(), "pending": type(loss).__name__}


def _rank_main(rank, world_size, directory, csv_path):
    results = {}
    cases = [(s, _schedule_case, (directory, s)) for s in SCHEDULES + [csv_path]]
    cases += [(f"{s}-ends", _schedule_case, (directory, s, split)) for s, split in ENDS.items()]
    cases += [("seq-len", _sequence_length_case, (directory,)), ("batch-error", _batch_error_case, (directory,))]
    cases += [("warm-up", _warm_up_case, (directory,)), ("token-error", _token_error_case, (directory,))]
    cases += [("collectives", _collectives_case, (directory,))]
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = {"problems": [traceback.format_exc()]}
    return results


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    directory = save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("llama"))
    csv_path = tmp_path_factory.mktemp("csv") / "looped.csv"
    csv_path.write_text(CSV_SCHEDULE + "\n")
    results = run_distributed(_rank_main, 2, str(directory), str(csv_path), timeout_s=600)
    return results, str(csv_path), str(directory)


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", SCHEDULES + ["csv"])
def test_step_and_eval_equal_reference(group_results, schedule):
    results, csv_path, directory = group_results
    key = csv_path if schedule == "csv" else schedule
    for rank, per_rank in enumerate(results):
        assert per_rank[key]["problems"] == [], f"rank {rank}"
    # every parameter lives on exactly one rank (a V-tied head is the embedding itself)
    names = [n for per_rank in results for n in per_rank[key]["params"]]
    assert len(names) == len(set(names))
    reference_names = {n for n, _ in load_reference(directory).named_parameters()}
    assert set(names) == reference_names


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", list(ENDS))
def test_stages_without_layers_equal_reference(group_results, schedule):
    """An embedding-only first stage and a head-only last stage, as the planner makes for heavy heads."""
    results, _, directory = group_results
    for rank, per_rank in enumerate(results):
        assert per_rank[f"{schedule}-ends"]["problems"] == [], f"rank {rank}"
    names = [n for per_rank in results for n in per_rank[f"{schedule}-ends"]["params"]]
    assert sorted(names) == sorted(n for n, _ in load_reference(directory).named_parameters())
    stages = [s for per_rank in results for s in per_rank[f"{schedule}-ends"]["info"]["stages"]]
    assert ["model.norm", "lm_head"] in [s["modules"] for s in stages]


@pytest.mark.distributed
def test_info_describes_this_ranks_stages(group_results):
    results = group_results[0]
    infos = [per_rank["warm-up"]["info"] for per_rank in results]
    assert [i["pp_rank"] for i in infos] == [0, 1]
    assert [[s["index"] for s in i["stages"]] for i in infos] == [[0, 3], [1, 2]]
    assert infos[0]["stages"][0]["modules"][0] == "model.embed_tokens"
    assert infos[0]["stages"][1]["modules"][-1] == "lm_head"


@pytest.mark.distributed
def test_new_sequence_length_keeps_gradients(group_results):
    results = group_results[0]
    for per_rank in results:
        assert per_rank["seq-len"]["problems"] == []


@pytest.mark.distributed
def test_indivisible_batch_is_refused_before_communication(group_results):
    results = group_results[0]
    for per_rank in results:
        got = per_rank["batch-error"]
        assert got["message"] == (
            "batch of 6 rows cannot be split into 4 equal microbatches; use a batch size divisible by 4"
        )
        assert got["loss"] > 0


@pytest.mark.distributed
def test_tokens_out_of_the_vocabulary_are_refused_on_every_rank(group_results):
    results = group_results[0]
    for per_rank in results:
        got = per_rank["token-error"]
        assert got["messages"] == {
            "ids": "input_ids[1, 3] is 96, outside the vocabulary of 96 tokens; input_ids must hold ids 0..95: "
            "check that the tokenizer is the model's",
            "labels": "labels[0, 2] is -5, outside the vocabulary of 96 tokens; labels must hold ids 0..95 or -100 "
            "(ignored): check that the tokenizer is the model's",
            "float": "input_ids must be an integer tensor of token ids, got dtype torch.float32; tokenize to ids "
            "(torch.long) in [0, 96)",
        }, got
        assert got["loss"] > 0


@pytest.mark.distributed
def test_a_step_makes_two_collective_calls(group_results):
    """The agreement exchange (which also sums the token count) and one all-reduce for the loss and
    the auxiliary terms, left in flight when step returns; the loss is the same on both ranks."""
    results = group_results[0]
    for per_rank in results:
        got = per_rank["collectives"]
        assert "problems" not in got, got
        assert got["collectives"] == {"all_gather": 1, "all_reduce": 1}
        assert got["pending"] == "PendingLoss"
    assert results[0]["collectives"]["loss"] == results[1]["collectives"]["loss"] > 0


class _Work:
    """A stand-in for a collective's handle: counts the waits."""

    def __init__(self):
        self.waits = 0

    def wait(self):
        self.waits += 1


def test_pending_loss_waits_once_at_first_use():
    import copy
    import pickle

    from ppzoo.loss import PendingLoss

    work = _Work()
    loss = PendingLoss(torch.tensor([2.5, 1.0]), work, dp_size=2)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and work.waits == 0
    assert loss.item() == 3.0 and work.waits == 1
    assert float(loss) == 3.0 and f"{loss:.2f}" == "3.00" and repr(loss) == "tensor(3.)" and work.waits == 1
    assert type(loss + 1) is torch.Tensor and torch.equal(loss + 1, torch.tensor(4.0))
    assert type(copy.deepcopy(loss)) is torch.Tensor and torch.equal(pickle.loads(pickle.dumps(loss)), loss)
    # whatever reads it first: an operation taking it as an argument waits too
    work = _Work()
    other = PendingLoss(torch.tensor([1.0, 0.0]), work)
    assert torch.allclose(torch.tensor(1.0), other) and work.waits == 1


@pytest.mark.distributed
def test_warm_up_sends_nothing_to_the_same_rank(group_results):
    results = group_results[0]
    for per_rank in results:
        got = per_rank["warm-up"]
        assert "problems" not in got, got
        # V placement on 2 ranks: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2
        assert sorted(got["peers"]) == ([0, 3] if got["rank"] == 0 else [1, 2])
        for stage, peers in got["peers"].items():
            assert peers and got["rank"] not in peers, (stage, peers)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(pp=2, schedule="1F1B", microbatches=1),
            "schedule 1F1B needs at least as many microbatches as stages: got 1 microbatches for 2 stages; "
            "raise microbatches to 2 or more",
        ),
        (
            dict(pp=2, schedule="Interleaved1F1B", microbatches=3),
            "schedule Interleaved1F1B runs microbatches in rounds of pp=2: 3 microbatches is not a multiple of 2",
        ),
        (
            dict(pp=2, schedule="ZBVZeroBubble", stages_per_rank=1),
            "schedule ZBVZeroBubble needs V placement with exactly two stages per rank, got 1",
        ),
        (
            dict(pp=2, schedule="gpipe", stages_per_rank=2),
            "schedule GPipe runs one stage per rank, but the plan puts 2 on each",
        ),
        (dict(pp=2, schedule="ZeroBubble"), "unknown schedule 'ZeroBubble'"),
        (dict(pp=2, cp=2), "cp=2: ppzoo does not implement context parallelism"),
    ],
)
def test_bad_settings_fail_before_any_process_group(tmp_path, kwargs, message):
    """These are refused from the config alone: no process group is needed to see the error."""
    import torch.distributed as dist

    directory = save_tiny_model(registry.adapters()["llama"], tmp_path)
    with pytest.raises(ValueError) as info:
        ppzoo.pipeline(str(directory), device="cpu", **kwargs)
    assert str(info.value).startswith(message)
    assert not dist.is_initialized()
