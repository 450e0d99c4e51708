"""Run a function on N CPU processes joined in one gloo process group.

Starting processes costs seconds (each imports torch and transformers), so tests start one group
and run many cases inside it. A rank that fails sends its traceback back; a group that does not
finish in time is killed rather than left hanging.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["DistributedFailure", "free_port", "run_distributed", "shrink_group"]


class DistributedFailure(RuntimeError):
    """A rank raised, died or timed out; the message holds each failing rank's traceback."""


def free_port() -> int:
    """A TCP port free on this machine now (for a group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shrink_group(rank: int, size: int, port: int, *, timeout_s: float = 300.0) -> bool:
    """Leave this process group; the first ``size`` ranks join a new gloo group of ``size`` on ``port``.

    Returns True on those ranks, False on the others (which then have no group). Cases that need
    fewer ranks run on in processes that already imported torch and transformers, instead of in a
    second spawned group. ``port`` must be the same on every rank: take it in the parent
    (:func:`free_port`) and pass it to every rank.
    """
    import torch.distributed as dist

    dist.barrier()
    gc.collect()  # NOTE: pipelines hold their process groups in reference cycles
    dist.destroy_process_group()
    if rank >= size:
        return False
    os.environ.update(MASTER_PORT=str(port), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size))
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        # NOTE: pipelines hold their process groups in reference cycles; a group collected only
        # while the interpreter shuts down can abort the process ("terminate called without an
        # active exception") after its work is done.
        gc.collect()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return results by rank.

    ``fn`` must be importable (a module-level function) and its arguments and result picklable.

    Raises:
        DistributedFailure: a rank raised (its traceback is in the message), died, or the group
            did not finish within ``timeout_s``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue, timeout_s), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    first_error = None
    while len(results) + len(errors) < world_size:
        if not queue.empty():
            rank, status, payload = queue.get()
            (results if status == "ok" else errors)[rank] = payload
            if errors and first_error is None:
                first_error = time.monotonic()
            continue
        dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in errors]
        if dead and queue.empty():
            time.sleep(0.5)
            if queue.empty():
                for r in dead:
                    errors[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
                first_error = first_error or time.monotonic()
        if first_error is not None and time.monotonic() - first_error > 20:
            break  # a failing rank usually leaves its peers blocked: do not wait for them
        if time.monotonic() > deadline:
            errors.update(
                {
                    r: f"rank {r} did not finish within {timeout_s:.0f}s"
                    for r in range(world_size)
                    if r not in results and r not in errors
                }
            )
            break
        time.sleep(0.05)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise DistributedFailure("\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
