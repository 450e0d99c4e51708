"""Atomic checkpoint directories: every rank writes into a sibling directory, swapped in at the end.

All ranks write into a sibling directory ``<dir>.tmp-<id>`` (so every rank must see the same
filesystem). Only when every rank reports success does rank 0 move an existing ``<dir>`` aside,
rename the new one into place and delete the old one. A write that fails or dies midway leaves
any earlier checkpoint at ``<dir>`` untouched; the collective that would have reported the dead
rank fails after the process group's timeout at the latest, so no rank waits forever.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ppzoo.checkpoint.errors import CheckpointError
from ppzoo.checkpoint.reading import INDEX_FILE, SINGLE_FILE

__all__ = ["agree", "write_atomically"]

#: what marks a directory as a checkpoint that a new write may replace (``.metadata``: a training state)
_CHECKPOINT_MARKERS = ("config.json", INDEX_FILE, SINGLE_FILE, ".metadata")


def _check_target(target: Path) -> None:
    if target.is_file():
        raise CheckpointError(f"{str(target)!r} is a file; pass a directory to save into")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).exists() for m in _CHECKPOINT_MARKERS):
        raise CheckpointError(
            f"{str(target)!r} exists and does not look like a checkpoint (none of {', '.join(_CHECKPOINT_MARKERS)}); "
            "a save replaces the whole directory, so pass a new or empty directory, or an earlier checkpoint"
        )


def _swap_into_place(new: Path, target: Path, tag: str) -> None:
    if target.exists():
        old = target.with_name(f"{target.name}.old-{tag}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def agree(error: BaseException | None, payload: Any = None, *, what: str) -> list[Any]:
    """Every rank's ``payload``, or an error on every rank when one rank failed.

    Collective over the default process group: every rank calls it, with the error it met (or
    None), so that no rank goes on to a collective step another rank will never reach.

    Args:
        error: what failed on this rank, or None.
        payload: this rank's picklable result.
        what: names the operation in errors.

    Returns:
        Every rank's payload, in rank order.

    Raises:
        BaseException: ``error`` itself, on the rank where it happened.
        CheckpointError: on the other ranks, naming the first rank that failed and its error.
    """
    outcomes: list[Any] = [None] * dist.get_world_size()
    message = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(outcomes, (message, payload))
    failed = [(rank, m) for rank, (m, _) in enumerate(outcomes) if m is not None]
    if failed:
        if error is not None:
            raise error
        rank, message = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {message}")
    return [p for _, p in outcomes]


def write_atomically(
    directory: str | os.PathLike,
    write: Callable[[Path], Any],
    *,
    finish: Callable[[Path, list[Any]], None] | None = None,
    what: str = "save",
) -> Path:
    """Run ``write(tmp)`` on every rank, ``finish(tmp, results)`` on rank 0, then rename into place.

    Collective over the default process group. ``tmp`` is a fresh sibling of ``directory``; it
    replaces ``directory`` only after every rank's ``write`` and rank 0's ``finish`` succeeded.

    Args:
        directory: where the result ends up.
        write: called on every rank with the temporary directory; returns a picklable result.
        finish: called on rank 0 with the temporary directory and every rank's result, in rank order.
        what: names the operation in errors.

    Returns:
        ``directory`` as an absolute path.

    Raises:
        CheckpointError: ``directory`` is a file or a non-empty directory that is no checkpoint,
            or a rank failed (the error names it); ``directory`` is then left as it was.
    """
    target = Path(directory).expanduser().absolute()
    setup: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            _check_target(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tag = uuid.uuid4().hex[:12]
            tmp = target.with_name(f"{target.name}.tmp-{tag}")
            tmp.mkdir()
            setup = [(None, str(tmp), tag)]
        except Exception as exc:  # noqa: BLE001 - sent to every rank, raised everywhere
            setup = [(exc, None, None)]
    dist.broadcast_object_list(setup, src=0)
    error, tmp_name, tag = setup[0]
    if error is not None:
        raise error
    tmp = Path(tmp_name)
    try:
        result, error = write(tmp), None
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it before anyone renames
        result, error = None, exc
    try:
        results = agree(error, result, what=what)
        done: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                if finish is not None:
                    finish(tmp, results)
                _swap_into_place(tmp, target, tag)
            except Exception as exc:  # noqa: BLE001 - sent to every rank
                done = [exc]
        dist.broadcast_object_list(done, src=0)
        if done[0] is not None:
            raise CheckpointError(f"{what} failed on rank 0 while finishing {str(target)!r}: {done[0]}")
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
