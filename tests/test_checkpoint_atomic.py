"""Atomic checkpoint writes: a save that fails or dies on one rank leaves the earlier checkpoint whole.

One spawned 2-rank gloo group runs every case; each case returns its problems instead of raising,
so one failure does not leave the peer rank blocked. The last case kills rank 1 in the middle of
writing on purpose, which ends the group: so every rank first writes its results to a file, and
the fixture reads them from there.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ppzoo
import ppzoo.checkpoint.export
from ppzoo import registry
from ppzoo.checkpoint import CheckpointError
from ppzoo.checkpoint.atomic import _check_target
from ppzoo.testing.distributed import DistributedFailure, run_distributed
from ppzoo.testing.reference import load_reference, save_tiny_model


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f"{directory.name}."))


def _pipeline(source):
    return ppzoo.pipeline(source, pp=2, schedule="1F1B", microbatches=4, device="cpu", attn_implementation="eager")


def _earlier_checkpoint_case(source, saved):
    """A checkpoint at ``saved`` whose weights differ from the source's, so a later save that
    succeeds visibly replaces it."""
    pipe = _pipeline(source)
    with torch.no_grad():
        for param in pipe.parameters():
            param.add_(1.0)
    pipe.save_pretrained(saved)
    return {"problems": []}


def _failed_save_case(source, saved):
    """Rank 1 fails in the middle of writing its shard: the earlier checkpoint at ``saved`` survives."""
    pipe = _pipeline(source)
    before = _digest(Path(saved))
    write = ppzoo.checkpoint.export._write_shard

    def failing(path, tensors):
        path.write_bytes(b"half a shard")
        raise OSError("No space left on device")

    if dist.get_rank() == 1:
        ppzoo.checkpoint.export._write_shard = failing
    try:
        pipe.save_pretrained(saved)
    except Exception as exc:  # noqa: BLE001 - the error each rank saw is the result
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    finally:
        ppzoo.checkpoint.export._write_shard = write
    dist.barrier()
    problems = []
    if _digest(Path(saved)) != before:
        problems.append("the failed save changed the earlier checkpoint")
    if _leftovers(Path(saved)):
        problems.append(f"the failed save left {_leftovers(Path(saved))}")
    dist.barrier()  # every rank has looked before the next save makes a new temporary directory
    # the group is still usable: the next save replaces the checkpoint
    pipe.save_pretrained(saved)
    reference = load_reference(saved)
    problems += [
        f"after the retry {n} differs"
        for n, p in pipe.named_parameters()
        if not torch.equal(p, reference.get_parameter(n))
    ]
    if _leftovers(Path(saved)):
        problems.append(f"replacing the checkpoint left {_leftovers(Path(saved))}")
    return {"problems": problems, "error": error}


def _refusal_case(source, scratch):
    pipe = _pipeline(source)
    scratch = Path(scratch)
    if dist.get_rank() == 0:
        scratch.mkdir()
        (scratch / "a-file").write_text("x")
        (scratch / "work").mkdir()
        (scratch / "work" / "thesis.tex").write_text("years of work")
    dist.barrier()
    errors = {}
    for name in ("a-file", "work"):
        try:
            pipe.save_pretrained(scratch / name)
        except CheckpointError as exc:
            errors[name] = str(exc)
    untouched = (scratch / "work" / "thesis.tex").read_text() == "years of work"
    return {"errors": errors, "untouched": untouched, "entries": sorted(p.name for p in scratch.iterdir())}


def _killed_save_case(source, saved, marker):
    """Rank 1 dies (``os._exit``) in the middle of writing; rank 0 must not rename anything."""
    pipe = _pipeline(source)
    dist.barrier()

    def dying(path, tensors):
        path.write_bytes(b"half a shard")
        Path(marker).write_text(str(path))
        os._exit(1)

    if dist.get_rank() == 1:
        ppzoo.checkpoint.export._write_shard = dying
    started = time.monotonic()
    try:
        pipe.save_pretrained(saved)
    except Exception as exc:  # noqa: BLE001 - rank 0 reports what it saw
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


def _rank_main(rank, world_size, source, out):
    out = Path(out)
    results = {}
    cases = [
        ("earlier", _earlier_checkpoint_case, (source, str(out / "llama"))),
        ("failed", _failed_save_case, (source, str(out / "llama"))),
        ("refusal", _refusal_case, (source, str(out / "scratch"))),
    ]
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = {"problems": [traceback.format_exc()]}
    dist.barrier()
    if rank == 0:
        results["before-kill"] = _digest(out / "llama")
    with open(out / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)
    killed = _killed_save_case(source, str(out / "llama"), str(out / "died-while-writing"))
    with open(out / f"rank{rank}.pkl", "wb") as f:
        pickle.dump({**results, "killed": killed}, f)
    return None


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    source = save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("llama"))
    out = tmp_path_factory.mktemp("saved")
    # NOTE: the last case kills rank 1 on purpose, so the group always ends in a failure.
    with pytest.raises(DistributedFailure) as failure:
        run_distributed(_rank_main, 2, str(source), str(out), timeout_s=300)
    if not all((out / f"rank{r}.pkl").is_file() for r in range(2)):
        raise AssertionError(f"the group ended before reporting:\n{failure.value}")
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    return results, out, str(failure.value)


@pytest.mark.distributed
def test_a_rank_failing_mid_write_leaves_the_earlier_checkpoint(group):
    results, _, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank["earlier"]["problems"] == [], f"rank {rank}"
        assert per_rank["failed"]["problems"] == [], f"rank {rank}"
    assert results[1]["failed"]["error"] == "OSError: No space left on device"
    assert results[0]["failed"]["error"] == (
        "CheckpointError: save_pretrained failed on rank 1: OSError: No space left on device"
    )


@pytest.mark.distributed
def test_a_rank_killed_mid_write_leaves_the_earlier_checkpoint(group):
    results, out, failure = group
    assert "rank 1 exited with code 1" in failure
    assert (out / "died-while-writing").is_file(), "rank 1 did not die while writing"
    killed = results[0]["killed"]
    assert killed["error"] is not None, "rank 0 finished a save that rank 1 never completed"
    assert killed["seconds"] < 60
    assert _digest(out / "llama") == results[0]["before-kill"]
    assert _leftovers(out / "llama") == []  # rank 0 removed the partial directory
    assert load_reference(out / "llama") is not None


@pytest.mark.distributed
def test_refuses_a_file_and_a_directory_that_is_no_checkpoint(group):
    results, out, _ = group
    for per_rank in results:
        got = per_rank["refusal"]
        assert got["untouched"]
        assert got["entries"] == ["a-file", "work"]
        assert got["errors"] == {
            "a-file": f"{str(out / 'scratch' / 'a-file')!r} is a file; pass a directory to save into",
            "work": f"{str(out / 'scratch' / 'work')!r} exists and does not look like a checkpoint (none of "
            "config.json, model.safetensors.index.json, model.safetensors, .metadata); a save replaces the "
            "whole directory, so pass a new or empty directory, or an earlier checkpoint",
        }


def test_check_target_accepts_new_empty_and_checkpoint_directories(tmp_path):
    _check_target(tmp_path / "new")
    _check_target(tmp_path)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="does not look like a checkpoint"):
        _check_target(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    _check_target(tmp_path)


# -- a save killed at any moment of the swap --------------------------------------------------------
#: the steps of a swap over an existing checkpoint, in order, for each way of swapping
SWAP_STEPS = {
    "exchange": ["ready", "swapped", "removing", "done"],
    "rename": ["ready", "moved-aside", "swapped", "removing", "done"],
}


def _checkpoint(directory: Path, weights: bytes) -> dict[str, str]:
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "tokenizer.json").write_text("{}")
    return _digest(directory)


def _killed_swap(tmp_path: Path, mode: str, step: str) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A save whose rank 0 is SIGKILLed at ``step`` of the swap (in a forked child)."""
    import signal

    import ppzoo.checkpoint.atomic as atomic

    target = tmp_path / "ckpt"
    old = _checkpoint(target, b"old weights")
    new = _checkpoint(tmp_path / "ckpt.tmp-0123456789ab", b"new weights")
    pid = os.fork()
    if pid == 0:  # the child: swap, and die at the step
        try:
            atomic._reached = lambda at: at == step and os.kill(os.getpid(), signal.SIGKILL)
            if mode == "rename":
                atomic._exchange = lambda a, b: False
            atomic._swap_into_place(tmp_path / "ckpt.tmp-0123456789ab", target, "0123456789ab")
        finally:
            os._exit(3)  # not killed: the step was never reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{mode}: never reached {step!r}"
    return target, old, new


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mode, step", [(mode, step) for mode, steps in SWAP_STEPS.items() for step in steps], ids=lambda v: v
)
def test_a_save_killed_at_any_step_of_the_swap_loses_nothing(tmp_path, mode, step):
    from ppzoo.checkpoint.atomic import recover

    target, old, new = _killed_swap(tmp_path, mode, step)
    swapped = SWAP_STEPS[mode].index(step) >= SWAP_STEPS[mode].index("swapped")
    if mode == "exchange" or step != "moved-aside":
        # the path holds a whole checkpoint, old or new, even before anything recovers it
        assert _digest(target) == (new if swapped else old)
    assert ppzoo.checkpoint.resolve(target) == target  # the next load recovers the swap first
    assert _digest(target) == (old if step == "ready" else new)
    recover(target, clean=True)  # what the next save does first
    assert _digest(target) == (old if step == "ready" else new)
    assert _leftovers(target) == []


def test_recover_restores_the_old_checkpoint_when_the_new_one_is_gone(tmp_path):
    from ppzoo.checkpoint.atomic import recover

    old = _checkpoint(tmp_path / "ckpt.old-0123456789ab", b"old weights")
    recover(tmp_path / "ckpt")
    assert _digest(tmp_path / "ckpt") == old
    assert _leftovers(tmp_path / "ckpt") == []


def test_the_next_save_deletes_what_killed_saves_left(tmp_path):
    from ppzoo.checkpoint.atomic import recover

    current = _checkpoint(tmp_path / "ckpt", b"weights")
    _checkpoint(tmp_path / "ckpt.tmp-aaaaaaaaaaaa", b"half a save")
    _checkpoint(tmp_path / "ckpt.old-bbbbbbbbbbbb", b"a swap that had yet to delete this")
    _checkpoint(tmp_path / "ckpt-other.tmp-cccccccccccc", b"another checkpoint's save")
    recover(tmp_path / "ckpt")  # a load deletes nothing: a save may be under way
    assert len(_leftovers(tmp_path / "ckpt")) == 2
    recover(tmp_path / "ckpt", clean=True)
    assert _leftovers(tmp_path / "ckpt") == []
    assert _digest(tmp_path / "ckpt") == current
    assert (tmp_path / "ckpt-other.tmp-cccccccccccc").is_dir()
