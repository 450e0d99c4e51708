"""Training state: a run resumed from save_state, with the same or another split, continues exactly.

One spawned 2-rank gloo group runs every case; each case returns its problems instead of raising,
so one failure does not leave the peer rank blocked.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import re
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import CheckpointError, load_state, rank_module, save_state, saved_step
from ppzoo.checkpoint.state import STATE_FILE, _MetadataReader
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, save_tiny_model

STEPS, SAVED_AT = 4, 2
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
#: splits a run saved from pp=2 1F1B resumes under: another schedule, four stages, V placement
RESUMES = {
    "1F1B": dict(schedule="1F1B"),
    "Interleaved1F1B": dict(schedule="Interleaved1F1B", stages_per_rank=2),
    "ZBVZeroBubble": dict(schedule="ZBVZeroBubble"),
}


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _snapshot(pipe, optimizer):
    """Every rank's parameters and optimizer state by FQN, gathered to every rank."""
    mine = {
        name: (_full(p), {k: _full(v) for k, v in optimizer.state[p].items()}) for name, p in pipe.named_parameters()
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def _differences(pipe, optimizer, snapshot):
    problems = []
    for name, p in pipe.named_parameters():
        param, state = snapshot[name]
        if not torch.equal(_full(p), param):
            problems.append(f"{name} differs from the saved run's")
        got = optimizer.state[p]
        if set(got) != set(state):
            problems.append(f"{name}: optimizer state has {sorted(got)}, the saved run had {sorted(state)}")
        problems += [
            f"{name}: optimizer {k} differs" for k in state if k in got and not torch.equal(_full(got[k]), state[k])
        ]
    return problems


def _pipeline(directory, **split):
    return ppzoo.pipeline(
        directory,
        pp=split.pop("pp", 2),
        microbatches=split.pop("microbatches", 4),
        device="cpu",
        attn_implementation="eager",
        **split,
    )


def _adamw(pipe, lr=1e-2):
    return torch.optim.AdamW(pipe.parameters(), lr=lr, weight_decay=0.1)


def _train(pipe, optimizer, steps):
    losses = []
    for step in steps:
        ids, mask, labels = batch(pipe.config.vocab_size, batch_size=4, seed=step)
        losses.append(pipe.step(ids, labels=labels, attention_mask=mask).item())
        optimizer.step()
        optimizer.zero_grad()
    return losses


def _uninterrupted_case(directory, work):
    """pp=2 1F1B for STEPS steps, saving at step 0 and at SAVED_AT without stopping."""
    pipe = _pipeline(directory, schedule="1F1B")
    optimizer = _adamw(pipe)
    pipe.save_state(work / "step0", optimizer, step=0)
    problems = [] if not optimizer.state else ["save_state gave the optimizer a state before its first step"]
    losses = _train(pipe, optimizer, range(SAVED_AT))
    pipe.save_state(work / "saved", optimizer, step=SAVED_AT)
    snapshot = _snapshot(pipe, optimizer)
    losses += _train(pipe, optimizer, range(SAVED_AT, STEPS))
    return {"problems": problems, "losses": losses, "snapshot": snapshot}


def _resume_case(directory, work, split, snapshot, losses):
    pipe = _pipeline(directory, **split)
    optimizer = _adamw(pipe, lr=0.5)  # the checkpoint's lr must win
    step = pipe.load_state(work / "saved", optimizer)
    problems = [] if step == SAVED_AT else [f"load_state returned step {step}, expected {SAVED_AT}"]
    problems += _differences(pipe, optimizer, snapshot)
    if optimizer.param_groups[0]["lr"] != 1e-2:
        problems.append(f"lr is {optimizer.param_groups[0]['lr']} after loading, the saved run's was 1e-2")
    resumed = _train(pipe, optimizer, range(step, STEPS))
    if resumed != losses[step:]:
        problems.append(f"resumed losses {resumed} != uninterrupted {losses[step:]}")
    return {"problems": problems}


def _resume_before_first_step_case(directory, work, losses):
    pipe = _pipeline(directory, schedule="1F1B")
    optimizer = _adamw(pipe)
    step = pipe.load_state(work / "step0", optimizer)
    problems = [] if step == 0 else [f"load_state returned step {step}, expected 0"]
    if optimizer.state:
        problems.append("loading a state saved before the first step gave the optimizer a state")
    resumed = _train(pipe, optimizer, range(SAVED_AT))
    if resumed != losses[:SAVED_AT]:
        problems.append(f"losses {resumed} != uninterrupted {losses[:SAVED_AT]}")
    return {"problems": problems}


def _sharded_case(directory, work, degrees):
    """State saved from DTensor stages (pp=1 × FSDP or TP) loads into plain pp=2 V-placed stages."""
    pipe = _pipeline(directory, pp=1, schedule="1F1B", microbatches=2, **degrees)
    optimizer = _adamw(pipe)
    ids, mask, labels = batch(pipe.config.vocab_size, batch_size=4, seed=9)
    if "dp_shard" in degrees:  # each data-parallel rank passes its half of the batch
        ids, mask, labels = (t.chunk(2)[dist.get_rank()] for t in (ids, mask, labels))
    pipe.step(ids, labels=labels, attention_mask=mask)
    optimizer.step()
    saved = work / f"sharded-{'-'.join(degrees)}"
    pipe.save_state(saved, optimizer, step=1)
    snapshot = _snapshot(pipe, optimizer)
    kinds = sorted({type(p).__name__ for p in pipe.parameters()})
    plain = _pipeline(directory, schedule="ZBVZeroBubble")
    plain_optimizer = _adamw(plain)
    step = plain.load_state(saved, plain_optimizer)
    problems = [] if step == 1 else [f"step {step}"]
    return {"problems": problems + _differences(plain, plain_optimizer, snapshot), "kinds": kinds}


def _errors_case(directory, untied, work):
    errors = {}
    pipe = _pipeline(directory, schedule="1F1B")
    try:
        pipe.load_state(work / "saved", torch.optim.SGD(pipe.parameters(), lr=0.1, momentum=0.9))
    except CheckpointError as exc:
        errors["optimizer"] = str(exc)
    other = _pipeline(untied, schedule="1F1B")
    try:
        other.load_state(work / "saved", _adamw(other))
    except CheckpointError as exc:
        errors["model"] = str(exc)
    return {"errors": errors}


def _rank_main(rank, world_size, directory, untied, work):
    work = Path(work)
    results = {}

    def run(name, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = {"problems": [traceback.format_exc()]}
        return results[name]

    base = run("uninterrupted", _uninterrupted_case, directory, work)
    if "snapshot" in base:
        for name, split in RESUMES.items():
            run(name, _resume_case, directory, work, split, base["snapshot"], base["losses"])
        run("step0", _resume_before_first_step_case, directory, work, base["losses"])
        run("errors", _errors_case, directory, untied, work)
        base.pop("snapshot")
    run("fsdp", _sharded_case, directory, work, dict(dp_shard=2))
    run("tp", _sharded_case, directory, work, dict(tp=2))
    return results


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    adapter = registry.adapters()["llama"]
    config = adapter.tiny_config()
    config.tie_word_embeddings = True
    tied = save_tiny_model(adapter, tmp_path_factory.mktemp("tied"), config=config)
    untied = save_tiny_model(adapter, tmp_path_factory.mktemp("untied"))
    work = tmp_path_factory.mktemp("state")
    return run_distributed(_rank_main, 2, str(tied), str(untied), str(work), timeout_s=300), work


@pytest.mark.distributed
def test_uninterrupted_run_saves_without_changing_its_course(group):
    results, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank["uninterrupted"]["problems"] == [], f"rank {rank}"
    losses = results[0]["uninterrupted"]["losses"]
    assert len(set(losses)) == STEPS  # the run moves: equal losses would prove nothing


@pytest.mark.distributed
@pytest.mark.parametrize("split", list(RESUMES))
def test_resumed_run_continues_exactly(group, split):
    results, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank[split]["problems"] == [], f"rank {rank}"


@pytest.mark.distributed
def test_resume_from_before_the_first_step(group):
    results, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank["step0"]["problems"] == [], f"rank {rank}"


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_sharded_stages_resume_unsharded(group, kind):
    results, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank[kind]["problems"] == [], f"rank {rank}"
        assert "DTensor" in per_rank[kind]["kinds"]


@pytest.mark.distributed
def test_state_is_keyed_by_fqn_with_a_tied_head_once(group):
    _, work = group
    keys = set(dcp.FileSystemReader(work / "saved").read_metadata().state_dict_metadata)
    assert f"model.{EMBED}" in keys and f"optimizer.state.{EMBED}.exp_avg" in keys
    assert not [k for k in keys if HEAD in k]
    record = json.loads((work / "saved" / STATE_FILE).read_text())
    assert record == {"format": 1, "step": SAVED_AT, "optimizer_stepped": True}
    assert saved_step(work / "saved") == SAVED_AT  # read without a process group
    layer_keys = {k for k in keys if k.startswith("model.model.layers.")}
    assert len({k.split(".")[3] for k in layer_keys}) == 8  # every layer, from both ranks


@pytest.mark.distributed
def test_load_refuses_another_optimizer_or_model(group):
    results, work = group
    saved = str(work / "saved")
    errors = []
    for per_rank in results:
        assert "errors" in per_rank["errors"], per_rank["errors"]
        errors.append(per_rank["errors"]["errors"])
    for got in errors:
        assert set(got) == {"optimizer", "model"}, got
        assert got["optimizer"].startswith(f"the training state in {saved!r} has no 'optimizer.")
        assert got["optimizer"].endswith("more); it was saved from another model or with another kind of optimizer")
    # lm_head lives on the last rank only: the untied model asks there for a head the state lacks,
    # and the other rank hears of it before the collective load
    missing = f"the training state in {saved!r} has no 'model.lm_head.weight'"
    assert errors[1]["model"].startswith(missing)
    assert errors[0]["model"].startswith(f"load_state failed on rank 1: CheckpointError: {missing}")


def test_load_refuses_a_directory_without_state(tmp_path):
    message = r"holds no training state \(no .metadata\); pass a directory written by save_state"
    with pytest.raises(CheckpointError, match=message):
        load_state([], tmp_path, None, adapter=None, config=None)


def _record(directory, **record):
    (directory / STATE_FILE).write_text(json.dumps({"format": 1, "step": 7, "optimizer_stepped": True, **record}))


class _Payload:
    """Unpickled, it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_load_refuses_a_directory_that_ppzoo_did_not_write(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"")
    message = f"{str(tmp_path)!r} has no {STATE_FILE}, so it was not written by ppzoo's save_state"
    for call in (lambda: load_state([], tmp_path, None, adapter=None, config=None), lambda: saved_step(tmp_path)):
        with pytest.raises(CheckpointError, match="^" + re.escape(message)):
            call()


@pytest.mark.parametrize("record", [{"step": -1}, {"step": "7"}, {"format": 2}, {"optimizer_stepped": 1}], ids=str)
def test_a_damaged_state_record_is_refused(tmp_path, record):
    (tmp_path / ".metadata").write_bytes(b"")
    _record(tmp_path, **record)
    with pytest.raises(CheckpointError, match=re.escape(f"{str(tmp_path / STATE_FILE)!r} holds ")):
        saved_step(tmp_path)


def test_no_code_runs_from_a_crafted_metadata_file(tmp_path):
    marker = tmp_path / "marker"
    state = tmp_path / "state"
    state.mkdir()
    (state / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _record(state)
    assert saved_step(state) == 7  # the step comes from the JSON record, never from the pickle
    message = (
        f"{str(state / '.metadata')!r} names pathlib.Path.touch, which is not part of torch's checkpoint metadata; "
        "refused, since unpickling it could run code: load only training states written by save_state"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        _MetadataReader(state).read_metadata()
    # NOTE: torch's loader wraps the reader's error in its own CheckpointException
    with pytest.raises(torch.distributed.checkpoint.api.CheckpointException):
        dcp.load({"model": {"w": torch.zeros(2)}}, storage_reader=_MetadataReader(state), no_dist=True)
    assert not marker.exists()


def test_metadata_torch_writes_passes_the_allow_list(tmp_path):
    state = {
        "model": {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)},
        "optimizer": {"lr": 0.1, "betas": (0.9, 0.99), "amsgrad": False, "name": "adamw", "none": None},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
        assert _MetadataReader(tmp_path).read_metadata().state_dict_metadata == (
            dcp.FileSystemReader(tmp_path).read_metadata().state_dict_metadata
        )
        loaded = {"model": {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, "optimizer": {}}
        loaded["optimizer"] = dict.fromkeys(state["optimizer"])
        dcp.load(loaded, storage_reader=_MetadataReader(tmp_path), no_dist=True)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["optimizer"] == state["optimizer"]


@pytest.mark.parametrize("step", [-1, 1.0, True, None])
def test_save_refuses_a_step_that_is_no_count(tmp_path, step):
    with pytest.raises(ValueError, match=f"step must be a non-negative int .*, got {step!r}"):
        save_state([], tmp_path, None, step=step, adapter=None, config=None)


def test_rank_module_joins_stages_under_original_fqns():
    def stage(layers, head):
        root = nn.Module()
        root.model = nn.Module()
        root.model.layers = nn.ModuleDict({str(i): nn.Linear(2, 2) for i in layers})
        root.model.embed_tokens = nn.Embedding(4, 2) if 0 in layers else None
        root.lm_head = nn.Linear(2, 4) if head else None
        return root

    first, last = stage([0, 1], head=False), stage([6, 7], head=True)
    before = [sorted(n for n, _ in s.named_parameters()) for s in (first, last)]
    joined = rank_module([first, last])
    names = dict(joined.named_parameters())
    assert sorted(names) == sorted(
        ["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"]
        + [f"model.layers.{i}.{p}" for i in (0, 1, 6, 7) for p in ("weight", "bias")]
    )
    assert names["model.layers.6.weight"] is last.model.layers["6"].weight
    assert [sorted(n for n, _ in s.named_parameters()) for s in (first, last)] == before


# -- a damaged or incomplete state: one CheckpointError line each ------------------------------------
class _NoTies:
    def tied_weights(self, config):
        return {}


def _one_process_state(tmp_path, monkeypatch, width=4):
    """A training state of a tiny module saved in this process (no process group), and its loader."""
    import ppzoo.checkpoint.state as state_module

    def write_here(directory, write, *, finish, what):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        finish(directory, [write(directory)])
        return directory

    monkeypatch.setattr(state_module, "write_atomically", write_here)
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(width, width))
    optimizer = torch.optim.AdamW(stage.parameters())
    stage(torch.ones(1, width)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        save_state([stage], tmp_path / "state", optimizer, step=3, adapter=_NoTies(), config=None)

    def load(width=width):
        other = nn.Sequential(nn.Linear(width, width))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return load_state(
                [other], tmp_path / "state", torch.optim.AdamW(other.parameters()), adapter=_NoTies(), config=None
            )

    return tmp_path / "state", load


def test_a_whole_state_loads_in_one_process(tmp_path, monkeypatch):
    _, load = _one_process_state(tmp_path, monkeypatch)
    assert load() == 3


def test_a_missing_data_file_is_one_line(tmp_path, monkeypatch):
    directory, load = _one_process_state(tmp_path, monkeypatch)
    (data,) = directory.glob("*.distcp")
    data.unlink()
    message = (
        f"the training state in {str(directory)!r} is incomplete: {data.name!r} is missing; copy the whole "
        "directory, or save the state again"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        load()


def test_a_truncated_data_file_is_one_line(tmp_path, monkeypatch):
    directory, load = _one_process_state(tmp_path, monkeypatch)
    (data,) = directory.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(f"is damaged: {data.name!r} has 100 bytes, but its .metadata")):
        load()


def test_a_damaged_data_file_of_the_right_size_is_one_line(tmp_path, monkeypatch):
    directory, load = _one_process_state(tmp_path, monkeypatch)
    (data,) = directory.glob("*.distcp")
    data.write_bytes(bytes(data.stat().st_size))
    with pytest.raises(CheckpointError) as info:
        load()
    message = str(info.value)
    assert message.startswith(f"cannot load the training state in {str(directory)!r} (rank 0: ")
    assert message.endswith("the state is damaged or incomplete: save it again, or resume from another")
    assert "\n" not in message and "Traceback" not in message


def test_a_truncated_metadata_file_is_one_line(tmp_path, monkeypatch):
    directory, load = _one_process_state(tmp_path, monkeypatch)
    metadata = directory / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=re.escape(f"{str(metadata)!r} is not readable checkpoint metadata (")):
        load()


def test_another_models_state_is_one_line(tmp_path, monkeypatch):
    directory, load = _one_process_state(tmp_path, monkeypatch)
    message = (
        f"the training state in {str(directory)!r} holds model.0.weight of shape (4, 4), but this model's is (6, 6); "
        "it was saved from another model (or another config)"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        load(width=6)  # the same names, other shapes
    # NOTE: other names are refused by the key check (test_load_refuses_another_optimizer_or_model)


def test_metadata_placing_data_outside_the_directory_is_refused(tmp_path, monkeypatch):
    import dataclasses

    directory, load = _one_process_state(tmp_path, monkeypatch)
    metadata = dcp.FileSystemReader(directory).read_metadata()
    metadata.storage_data = {
        key: dataclasses.replace(info, relative_path="../outside.distcp") for key, info in metadata.storage_data.items()
    }
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    message = f"{str(directory / '.metadata')!r} places data in '../outside.distcp', not a file of {str(directory)!r}"
    with pytest.raises(CheckpointError, match="^" + re.escape(message)):
        load()
