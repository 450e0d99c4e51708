"""Ranks that fail, disagree or stop: every rank gets a clear error instead of a hang (docs/reliability.md).

One spawned 2-rank gloo group runs every case in order; each case returns what each rank saw
instead of raising, so one failure does not leave the peer rank blocked. The last two cases leave
the group unusable on purpose (a stage that fails inside the schedule, then a save that rank 1
never joins because it has finished), so every rank writes its results to a file after each case
and the fixture reads them from there.
"""

from __future__ import annotations

import pickle
import re
import time
import traceback
from pathlib import Path

import pytest
import torch.distributed as dist

import ppzoo
from ppzoo import registry
from ppzoo.agreement import RankError
from ppzoo.mesh import group_timeout, parse_timeout
from ppzoo.testing.distributed import DistributedFailure, run_distributed
from ppzoo.testing.reference import batch, save_tiny_model

VOCAB = 96
#: the process-group timeout of the cases that wait for a rank that never answers
SHORT = 4.0


def _pipeline(source, **kwargs):
    kwargs = {"pp": 2, "schedule": "1F1B", "microbatches": 2, "device": "cpu", **kwargs}
    return ppzoo.pipeline(source, **kwargs)


def _outcome(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - what each rank saw is the result
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _good_step(pipe) -> float:
    ids, mask, labels = batch(VOCAB, batch_size=2)
    return pipe.step(ids, labels=labels, attention_mask=mask).item()


def _rank_fails_case(source):
    """Rank 1's batch is refused by its own checks; rank 0's is fine: both fail, naming rank 1."""
    pipe = _pipeline(source)
    ids, mask, labels = batch(VOCAB, batch_size=2)
    bad = ids.clone()
    bad[1, 3] = VOCAB
    mine = bad if dist.get_rank() == 1 else ids
    step = _outcome(pipe.step, mine, labels=labels, attention_mask=mask)
    evaluated = _outcome(pipe.eval, mine, attention_mask=mask)
    return {"step": step, "eval": evaluated, "after": _good_step(pipe)}


def _build_fails_case(source):
    """Rank 1 cannot read its stage's weights: both ranks fail in ``pipeline()``, rank 0 naming rank 1."""
    import ppzoo.build

    build = ppzoo.build.build_stage

    def unreadable(*args, **kwargs):
        raise OSError("model.safetensors: unexpected end of file")

    if dist.get_rank() == 1:
        ppzoo.build.build_stage = unreadable
    try:
        built = _outcome(_pipeline, source)
    finally:
        ppzoo.build.build_stage = build
    return {"built": built, "after": _good_step(_pipeline(source))}


def _shapes_case(source):
    """Rank 0 passes 12 tokens a row, rank 1 passes 7: refused on both, naming both shapes."""
    pipe = _pipeline(source)
    ids, mask, labels = batch(VOCAB, batch_size=2, seq_len=12 if dist.get_rank() == 0 else 7)
    step = _outcome(pipe.step, ids, labels=labels, attention_mask=mask)
    no_mask = _outcome(pipe.eval, ids[:, :7], attention_mask=mask[:, :7] if dist.get_rank() == 0 else None)
    return {"step": step, "mask": no_mask, "after": _good_step(pipe)}


def _content_case(source):
    """Same shapes, different tokens: trained on silently by default, refused with check_batch=True."""
    pipe = _pipeline(source, check_batch=True)
    ids, mask, labels = batch(VOCAB, batch_size=2, seed=dist.get_rank())
    checked = _outcome(pipe.step, ids, labels=labels, attention_mask=mask)
    pipe.check_batch = False
    unchecked = _outcome(pipe.step, ids, labels=labels, attention_mask=mask)
    pipe.check_batch = True
    return {"checked": checked, "unchecked": unchecked, "after": _good_step(pipe)}


def _data_parallel_case(source):
    """pp=1 × dp_replicate=2: a bad batch on one data-parallel rank fails both; different shapes are fine."""
    pipe = _pipeline(source, pp=1, dp_replicate=2, schedule="GPipe", microbatches=1)
    ids, mask, labels = batch(VOCAB, batch_size=2, seq_len=12 if dist.get_rank() == 0 else 9)
    bad = labels.clone()
    bad[0, 1] = -7
    step = _outcome(pipe.step, ids, labels=bad if dist.get_rank() == 0 else labels, attention_mask=mask)
    uneven = _outcome(pipe.step, ids, labels=labels, attention_mask=mask)
    return {"step": step, "uneven": uneven}


def _different_calls_case(source, saved):
    """Rank 0 saves while rank 1 steps (a save on rank 0 only, then training on): both refuse."""
    pipe = _pipeline(source)
    if dist.get_rank() == 0:
        seen = _outcome(pipe.save_pretrained, saved)
    else:
        seen = _outcome(_good_step, pipe)
    return {"seen": seen, "after": _good_step(pipe), "saved": Path(saved).exists()}


def _config_case(source):
    """A config with fewer layers than the checkpoint is refused; a sequence past the positions warns once."""
    import warnings

    refused = _outcome(_pipeline, source, num_hidden_layers=3)
    pipe = _pipeline(source, max_position_embeddings=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _good_step(pipe)  # 12 tokens a row
        _good_step(pipe)
    return {"refused": refused, "warnings": [str(w.message) for w in caught if w.category is UserWarning]}


def _timeout_case(source):
    """pipeline(timeout=...) sets the timeout of the default group and of every group of the mesh."""
    pipe = _pipeline(source, timeout=SHORT)
    groups = {dim: group_timeout(pipe.mesh[dim].get_group()).total_seconds() for dim in pipe.mesh.mesh_dim_names}
    return {"default": group_timeout().total_seconds(), "mesh": groups}


def _inside_schedule_case(source):
    """Rank 1's stage raises in the middle of the schedule: rank 0 stops waiting at the timeout and names rank 1."""
    pipe = _pipeline(source, timeout=SHORT)
    _good_step(pipe)
    if dist.get_rank() == 1:
        stage = pipe.stages[0]

        def broken(*args, **kwargs):
            raise RuntimeError("the stage broke")

        stage.forward = broken
    started = time.monotonic()
    seen = _outcome(_good_step, pipe)
    _PIPES["inside-schedule"] = pipe
    return {"seen": seen, "seconds": time.monotonic() - started}


#: pipelines a later case goes on with, on this rank
_PIPES: dict[str, object] = {}


def _rank_main(rank, world_size, source, out):
    out = Path(out)
    results = {"source": source}
    cases = [
        ("rank-fails", _rank_fails_case, (source,)),
        ("build-fails", _build_fails_case, (source,)),
        ("shapes", _shapes_case, (source,)),
        ("content", _content_case, (source,)),
        ("data-parallel", _data_parallel_case, (source,)),
        ("different-calls", _different_calls_case, (source, str(out / "saved"))),
        ("config", _config_case, (source,)),
        ("timeout", _timeout_case, (source,)),
        ("inside-schedule", _inside_schedule_case, (source,)),
    ]
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = {"problems": traceback.format_exc()}
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    # NOTE: the group is unusable after a failure inside the schedule; rank 1 stays alive but never
    # saves (a program whose rank 0 alone saves at the end), and rank 0 must not wait forever.
    if rank == 1:
        time.sleep(SHORT)
    if rank == 0:
        started = time.monotonic()
        results["alone"] = {"seen": _outcome(_PIPES["inside-schedule"].save_pretrained, str(out / "alone"))}
        results["alone"]["seconds"] = time.monotonic() - started
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    _PIPES.clear()
    return None


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    source = save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("llama"))
    out = tmp_path_factory.mktemp("out")
    try:
        run_distributed(_rank_main, 2, str(source), str(out), timeout_s=400)
    except DistributedFailure as exc:
        failure = str(exc)
    else:
        failure = ""
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2) if (out / f"rank{r}.pkl").is_file()]
    assert len(results) == 2, f"the group ended before reporting:\n{failure}"
    return results, out, failure


def _no_problems(results, case):
    for rank, per_rank in enumerate(results):
        assert "problems" not in per_rank[case], f"rank {rank}: {per_rank[case]['problems']}"


@pytest.mark.distributed
def test_a_rank_that_fails_its_checks_fails_every_rank(group):
    results, _, _ = group
    _no_problems(results, "rank-fails")
    own = (
        "ValueError: input_ids[1, 3] is 96, outside the vocabulary of 96 tokens; input_ids must hold ids 0..95: "
        "check that the tokenizer is the model's"
    )
    assert results[1]["rank-fails"]["step"] == own
    for what in ("step", "eval"):
        assert results[0]["rank-fails"][what] == (
            f"RankError: {what} failed on rank 1: {own}. No rank ran it; the pipeline can go on"
        )
    assert results[0]["rank-fails"]["after"] == results[1]["rank-fails"]["after"] > 0


@pytest.mark.distributed
def test_a_rank_that_cannot_build_its_stage_fails_every_rank(group):
    results, _, _ = group
    _no_problems(results, "build-fails")
    own = "OSError: model.safetensors: unexpected end of file"
    assert results[1]["build-fails"]["built"] == own
    assert results[0]["build-fails"]["built"] == f"RankError: pipeline failed on rank 1: {own}. No rank has a pipeline"
    assert results[0]["build-fails"]["after"] == results[1]["build-fails"]["after"] > 0


@pytest.mark.distributed
def test_ranks_passing_different_shapes_are_refused_on_every_rank(group):
    results, _, _ = group
    _no_problems(results, "shapes")
    for per_rank in results:
        got = per_rank["shapes"]
        assert got["step"] == (
            "ValueError: ranks disagree on the batch passed to step: input_ids (2, 12), labels, attention_mask "
            "on rank 0; input_ids (2, 7), labels, attention_mask on rank 1. Every rank of a pipeline (with data "
            "parallelism: every rank of one data-parallel group) must pass the same batch; give every rank the "
            "same data (seed, order, length)"
        )
        assert got["mask"].startswith(
            "ValueError: ranks disagree on the batch passed to eval: input_ids (2, 7), attention_mask on rank 0; "
            "input_ids (2, 7) on rank 1."
        )
        assert got["after"] > 0


@pytest.mark.distributed
def test_check_batch_refuses_ranks_passing_different_tokens(group):
    results, _, _ = group
    _no_problems(results, "content")
    assert results[0]["content"]["checked"] == results[1]["content"]["checked"]
    checked = results[0]["content"]["checked"]
    assert checked.startswith("ValueError: ranks disagree on the batch passed to step: input_ids (2, 12), labels, ")
    assert "content hash" in checked and "on rank 0;" in checked and checked.count("content hash") == 2
    # without the check, the step runs on a mix of both batches: what check_batch is for
    assert [r["content"]["unchecked"] for r in results] == ["ok", "ok"]


@pytest.mark.distributed
def test_a_bad_batch_on_one_data_parallel_rank_fails_both(group):
    results, _, _ = group
    _no_problems(results, "data-parallel")
    own = "ValueError: labels[0, 1] is -7, outside the vocabulary of 96 tokens"
    assert results[0]["data-parallel"]["step"].startswith(own)
    assert results[1]["data-parallel"]["step"].startswith(f"RankError: step failed on rank 0: {own}")
    # data-parallel ranks hold different batches: their shapes need not agree
    assert [r["data-parallel"]["uneven"] for r in results] == ["ok", "ok"]


@pytest.mark.distributed
def test_a_save_on_one_rank_while_the_other_steps_is_refused(group):
    results, _, _ = group
    _no_problems(results, "different-calls")
    message = (
        "RankError: ranks make different collective calls: step on rank 1; save_pretrained on rank 0. Every rank "
        "must call step, eval, save_pretrained, save_state, load_state, generate together and in the same order (the same "
        "number of steps, and saves on every rank)"
    )
    for per_rank in results:
        assert per_rank["different-calls"]["seen"] == message
        assert per_rank["different-calls"]["after"] > 0
        assert not per_rank["different-calls"]["saved"]


@pytest.mark.distributed
def test_a_config_with_fewer_layers_than_the_checkpoint_is_refused(group):
    results, _, _ = group
    _no_problems(results, "config")
    source = results[0]["source"]
    for per_rank in results:
        assert per_rank["config"]["refused"] == (
            f"CheckpointError: the checkpoint in {source!r} holds 8 layers (model.layers.0 to model.layers.7 in "
            "model.safetensors.index.json), but the config has 3 (num_hidden_layers): the other 5 would be left "
            "out; use the checkpoint's own config.json, or set num_hidden_layers=8"
        )


@pytest.mark.distributed
def test_a_sequence_longer_than_the_positions_warns_once(group):
    results, _, _ = group
    for per_rank in results:
        assert per_rank["config"]["warnings"] == [
            "sequences of 12 tokens are longer than the model's max_position_embeddings=10: the positions past it "
            "were never trained (and learned position embeddings have no entry for them); cut or split the "
            "sequences to 10 tokens at most. Warned once per pipeline"
        ]


@pytest.mark.distributed
def test_pipeline_timeout_sets_every_group(group):
    results, _, _ = group
    _no_problems(results, "timeout")
    for per_rank in results:
        assert per_rank["timeout"]["default"] == SHORT
        assert set(per_rank["timeout"]["mesh"].values()) == {SHORT}


@pytest.mark.distributed
def test_a_stage_failing_inside_the_schedule_is_named_on_its_peers(group):
    results, _, _ = group
    _no_problems(results, "inside-schedule")
    assert "[Stage 1] failed to run forward" in results[1]["inside-schedule"]["seen"]
    seen = results[0]["inside-schedule"]["seen"]
    assert seen.startswith(
        "RankError: step failed on rank 1 inside the schedule: RuntimeError: [Stage 1] failed to run forward "
        "(RuntimeError: the stage broke). Rank 0 "
    ), seen
    # NOTE: gloo drops the connection when the failed rank's pending receives are freed, which ends
    # the wait early; otherwise it ends at the timeout
    assert "Rank 0 waited 0:00:04 (the process-group timeout)" in seen or "Rank 0 lost the connection" in seen
    assert "end the run (and resume from a saved state)" in seen
    assert results[0]["inside-schedule"]["seconds"] < SHORT + 20


@pytest.mark.parametrize("value", [0, -1, "10", True, float("nan")])
def test_timeout_must_be_positive(value):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds or a datetime.timedelta"):
        parse_timeout(value)


def test_rank_error_carries_the_ranks():
    assert RankError("x", ranks=(1, 2)).ranks == [1, 2]
    assert ppzoo.RankError is RankError  # what a training script catches
    assert parse_timeout(3).total_seconds() == 3
    assert parse_timeout(None) is None


def _save_alone_main(rank, world_size, source, out):
    """Rank 0 alone saves; rank 1, alive and well, never joins: rank 0 fails at the timeout."""
    pipe = _pipeline(source, timeout=SHORT)
    if rank == 1:
        time.sleep(3 * SHORT)
        return None
    started = time.monotonic()
    seen = _outcome(pipe.save_pretrained, str(Path(out) / "alone"))
    return {"seen": seen, "seconds": time.monotonic() - started, "saved": (Path(out) / "alone").exists()}


@pytest.mark.distributed
def test_a_save_on_rank_0_only_fails_at_the_timeout(tmp_path):
    """The one case in a group of its own: a collective that times out leaves the group unusable."""
    source = save_tiny_model(registry.adapters()["llama"], tmp_path / "llama")
    got = run_distributed(_save_alone_main, 2, str(source), str(tmp_path), timeout_s=300)[0]
    assert got["seen"].startswith(
        "RankError: save_pretrained is collective: every rank must call it, at the same point of the program; "
        "rank 0 waited 0:00:04 (the process-group timeout) for the others"
    ), got
    assert got["seen"].endswith(
        "Check that no rank skips it (e.g. a save on rank 0 only), stopped early, or took fewer steps"
    )
    assert SHORT - 1 < got["seconds"] < SHORT + 20
    assert not got["saved"]


@pytest.mark.distributed
def test_a_save_that_the_other_ranks_never_join_says_it_is_collective(group):
    results, out, _ = group
    alone = results[0]["alone"]
    assert alone["seen"].startswith(
        "RankError: save_pretrained is collective: every rank must call it, at the same point of the program; "
        "rank 0 lost the connection to another rank (RuntimeError: Connection closed by peer"
    ), alone
    assert alone["seconds"] < SHORT + 20
    assert not (out / "alone").exists()


# -- the hub, offline or unreachable ---------------------------------------------------------------
def test_a_hub_id_while_offline_names_the_repo_and_says_offline(tmp_path, monkeypatch):
    from ppzoo.checkpoint import CheckpointError, resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = (
        "'ppzoo-tests/no-such-model' is not in the local Hugging Face cache, and the hub is offline "
        "(HF_HUB_OFFLINE=1); pass a local checkpoint directory, or download it while online "
        "(`hf download ppzoo-tests/no-such-model`) and run again"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        resolve("ppzoo-tests/no-such-model", cache_dir=str(tmp_path))


def test_a_shard_while_offline_names_the_file_and_the_repo(tmp_path, monkeypatch):
    from ppzoo.checkpoint import INDEX_FILE, Checkpoint, CheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / INDEX_FILE).write_text('{"weight_map": {"w": "model-00001-of-00002.safetensors"}}')
    checkpoint = Checkpoint(tmp_path, repo_id="ppzoo-tests/model", hub_kwargs={"cache_dir": str(tmp_path / "cache")})
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "'model-00001-of-00002.safetensors' of 'ppzoo-tests/model' is not in the local Hugging Face cache, "
            "and the hub is offline (HF_HUB_OFFLINE=1)"
        ),
    ):
        checkpoint.file_of("w")


def test_an_unreachable_hub_names_the_repo(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from ppzoo.checkpoint import CheckpointError, resolve

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub.\nConnection refused"
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    message = (
        "cannot reach the Hugging Face hub to download 'ppzoo-tests/model', and it is not in the local cache "
        "(Connection refused); check the network (or HF_ENDPOINT), pass a local checkpoint directory, or "
        "download it first"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        resolve("ppzoo-tests/model")


def test_layer_count_is_read_from_the_tensor_names(tmp_path):
    import json

    from ppzoo.checkpoint import INDEX_FILE, Checkpoint, CheckpointError

    def checkpoint(keys):
        (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": dict.fromkeys(keys, "model.safetensors")}))
        return Checkpoint(tmp_path)

    llama = checkpoint([f"model.layers.{i}.mlp.experts.{e}.w1" for i in range(4) for e in range(9)])
    llama.check_layer_count("model.layers", 4)
    with pytest.raises(CheckpointError, match=re.escape("holds 4 layers (model.layers.0 to model.layers.3 in")):
        llama.check_layer_count("model.layers", 2)
    gpt2 = checkpoint([f"h.{i}.attn.c_attn.weight" for i in range(6)] + ["wte.weight"])
    with pytest.raises(CheckpointError, match=re.escape("holds 6 layers (h.0 to h.5 in")):
        gpt2.check_layer_count("transformer.h", 3)
    # a vision tower's layers are another container: not counted against the text layers
    vlm = checkpoint(
        [f"model.vision_tower.encoder.layers.{i}.w" for i in range(30)]
        + [f"model.language_model.layers.{i}.w" for i in range(2)]
    )
    vlm.check_layer_count("model.language_model.layers", 2)


# -- clean exit --------------------------------------------------------------------------------------
#: a program as users write it: ppzoo makes the process group, and nothing ends it explicitly
_PROGRAM = """
import sys

import torch

import ppzoo
from ppzoo.testing.reference import batch

torch.set_num_threads(1)
pipe = ppzoo.pipeline(sys.argv[1], pp=2, microbatches=2, device="cpu", timeout=120)
ids, mask, labels = batch(96, batch_size=2)
pipe.step(ids, labels=labels, attention_mask=mask)
pipe.eval(ids, attention_mask=mask)
pipe.save_pretrained(sys.argv[2])
"""


@pytest.mark.distributed
def test_runs_under_torchrun_exit_zero_every_time(tmp_path):
    import os
    import subprocess
    import sys

    source = save_tiny_model(registry.adapters()["llama"], tmp_path / "llama")
    program = tmp_path / "program.py"
    program.write_text(_PROGRAM)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PPZOO_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for run in range(2):
        done = subprocess.run(
            [*command, str(program), str(source), str(tmp_path / "saved")],
            capture_output=True,
            text=True,
            env=env,
            timeout=400,
            check=False,
        )
        assert done.returncode == 0, f"run {run}: exit {done.returncode}\n{done.stderr[-3000:]}"
        assert "terminate called" not in done.stderr, f"run {run}:\n{done.stderr[-3000:]}"


def _threads_at_exit_main(rank, world_size):
    """A group held in a reference cycle (as stages hold theirs) keeps its threads after destroy, until collected."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    import ppzoo.mesh

    class Holder:
        pass

    holder = Holder()
    holder.cycle, holder.mesh = holder, init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b"))
    holder.group = holder.mesh["a"].get_group()
    del holder
    before = len(os.listdir("/proc/self/task"))
    ppzoo.mesh._destroy_at_exit()
    return {"before": before, "after": len(os.listdir("/proc/self/task"))}


@pytest.mark.distributed
def test_the_exit_handler_joins_the_groups_threads():
    (got,) = run_distributed(_threads_at_exit_main, 1, timeout_s=120)
    assert got["after"] < got["before"], got
