"""Atomic checkpoint directories: every rank writes into a sibling directory, swapped in at the end.

All ranks write into a sibling directory ``<dir>.tmp-<id>`` (so every rank must see the same
filesystem). Only when every rank reports success does rank 0 put the new directory in place of
an existing ``<dir>``, then delete the old one. A write that fails or dies midway leaves any
earlier checkpoint at ``<dir>`` untouched; the collective that would have reported the dead rank
fails after the process group's timeout at the latest, so no rank waits forever.

**The swap survives a kill at any moment.** On Linux the two directories trade places in one
``renameat2(RENAME_EXCHANGE)``, so ``<dir>`` always holds the old or the new checkpoint, whole.
Where the filesystem cannot exchange, the old one is renamed to ``<dir>.old-<id>`` and the new one
into place; a kill between the two renames leaves no ``<dir>`` for a moment, and the next load
(:func:`recover`, called by ``resolve`` and ``load_state``) or save completes the swap (the new
directory was whole before the first rename) or restores the old one. Each save first deletes
``<dir>.tmp-*`` left by a save that was killed, and any ``<dir>.old-*`` whose swap had completed.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ppzoo.agreement import exchange
from ppzoo.checkpoint.errors import CheckpointError
from ppzoo.checkpoint.reading import INDEX_FILE, SINGLE_FILE

__all__ = ["agree", "recover", "write_atomically"]

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


def _reached(step: str) -> None:
    """Called at each step of a swap and of a recovery; tests replace it to kill the process there."""


#: ``renameat2`` flag: swap the two paths atomically
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` atomically; False where the platform or filesystem cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange here; rename instead
        return False
    raise OSError(errno, f"cannot exchange {str(a)!r} and {str(b)!r}: {os.strerror(errno)}")


def _remove(path: Path) -> None:
    """Delete a directory tree, entry by entry (a kill midway leaves part of it, deleted later)."""
    if not path.exists():
        return
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        _reached("removing")
    shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(new: Path, target: Path, tag: str) -> None:
    """Put ``new`` (whole) at ``target``, then delete what was there; see the module's docstring."""
    _reached("ready")
    if not target.exists():
        os.replace(new, target)
        _reached("swapped")
        return
    if _exchange(new, target):  # target now holds the new checkpoint, ``new`` the old one
        _reached("swapped")
        _remove(new)
        _reached("done")
        return
    old = target.with_name(f"{target.name}.old-{tag}")
    os.replace(target, old)
    _reached("moved-aside")
    os.replace(new, target)
    _reached("swapped")
    _remove(old)
    _reached("done")


def recover(directory: str | os.PathLike, *, clean: bool = False) -> None:
    """Finish or undo a swap that a killed save left behind at ``directory``.

    Where ``directory`` is missing but ``<directory>.old-<id>`` exists, the save was killed between
    its two renames: its new directory ``<directory>.tmp-<id>`` was whole, so it is renamed into
    place (or, when gone, the old one is restored). An ``.old-<id>`` beside a present directory is
    what a completed swap had yet to delete. Safe to run on several ranks at once.

    Args:
        directory: a checkpoint directory.
        clean: also delete ``<directory>.tmp-*`` (what a killed save left half written) and
            completed ``.old-*``; only a save does this, since a load may run beside a save.
    """
    target = Path(directory).expanduser().absolute()
    parent = target.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f"{glob.escape(target.name)}.old-*"))
    for old in olds:
        if not target.exists():
            tmp = target.with_name(f"{target.name}.tmp-{old.name.rsplit('.old-', 1)[1]}")
            source = tmp if tmp.is_dir() else old
            try:
                os.replace(source, target)
            except OSError:  # another rank recovered it first
                pass
            _reached("recovered")
        if clean and target.exists():
            _remove(old)
    if clean:
        for tmp in parent.glob(f"{glob.escape(target.name)}.tmp-*"):
            _remove(tmp)


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
    if not dist.is_initialized():  # one process, no group: no one to tell
        if error is not None:
            raise error
        return [payload]
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
    what: str = "save_pretrained",
) -> Path:
    """Run ``write(tmp)`` on every rank, ``finish(tmp, results)`` on rank 0, then rename into place.

    Collective over the default process group. ``tmp`` is a fresh sibling of ``directory``; it
    replaces ``directory`` only after every rank's ``write`` and rank 0's ``finish`` succeeded.

    Args:
        directory: where the result ends up.
        write: called on every rank with the temporary directory; returns a picklable result.
        finish: called on rank 0 with the temporary directory and every rank's result, in rank order.
        what: names the operation in errors: one of :data:`ppzoo.agreement.CALLS`.

    Returns:
        ``directory`` as an absolute path.

    Raises:
        CheckpointError: ``directory`` is a file or a non-empty directory that is no checkpoint,
            or a rank failed (the error names it); ``directory`` is then left as it was.
    """
    target = Path(directory).expanduser().absolute()
    # NOTE: first make sure every rank is here: a save called on some ranks only (rank 0) fails
    # with an error that says the save is collective, instead of deadlocking in the broadcast.
    exchange(what, None)
    setup: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            recover(target, clean=True)
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
