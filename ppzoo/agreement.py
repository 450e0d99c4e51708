"""What ranks tell each other before every collective call, so that none waits for another in vain.

Building a pipeline (``ppzoo.pipeline``) and every collective call of one (``step``, ``eval``,
``save_pretrained``, ``save_state``, ``load_state``) starts with one small exchange over the whole
world (:func:`exchange`): each rank says which call it is in, whether its own checks failed, and a
few facts (batch shape, a batch hash). So a rank that fails tells the others, ranks that call different things find out, and a
call made on some ranks only ends at the process-group timeout with an error saying it is
collective, instead of a hang or a crash in the middle of the schedule. A failure inside the
schedule itself leaves a note in the process group's store for its peers (:func:`schedule_failure`).
See docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ppzoo.mesh import group_timeout

__all__ = [
    "CALLS",
    "RankError",
    "batch_groups",
    "check_same",
    "exchange",
    "schedule_failure",
    "tensor_digest",
]

#: the collective calls of a pipeline, as :func:`exchange` tells them apart
CALLS = ("pipeline", "step", "eval", "save_pretrained", "save_state", "load_state", "generate")
#: facts a rank adds to the exchange (batch shape, hash, ...), padded with zeros
_FACTS = 8
#: exchanges so far on this rank: the same on every rank, since they happen in the same order
_exchanges = 0


class RankError(RuntimeError):
    """Raised on every rank when another rank failed, or the ranks did not make the same collective call.

    Attributes:
        ranks: the ranks that failed (or disagree), for programs that want to report them.
    """

    def __init__(self, message: str, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.ranks = list(ranks)


def batch_groups(mesh: DeviceMesh) -> list[list[int]]:
    """The global ranks that must pass the same batch: one list per data-parallel coordinate."""
    ranks = mesh.mesh
    return [ranks[:, r, s].flatten().tolist() for r in range(ranks.shape[1]) for s in range(ranks.shape[2])]


def exchange(what: str, error: BaseException | None, facts: Sequence[int] = ()) -> torch.Tensor:
    """Every rank's ``facts``, once every rank is known to make the same call ``what`` and none failed.

    Collective over the default group: one all-gather of a few integers a rank. A rank whose own
    checks failed passes its ``error`` instead of skipping the call, so its peers do not wait.

    Args:
        what: the call being made, one of :data:`CALLS`.
        error: what failed on this rank before the call's communication, or None.
        facts: up to eight integers each rank contributes (shape, hash, ...).

    Returns:
        A ``(world_size, 8)`` int64 CPU tensor: each rank's facts, zero-padded.

    Raises:
        BaseException: ``error`` itself, on the rank where it happened (after telling the others).
        RankError: on the other ranks, naming the rank that failed and its error; on every rank when
            ranks make different calls; and when the others do not answer within the
            process-group timeout (a collective called on some ranks only).
    """
    global _exchanges
    if len(facts) > _FACTS:
        raise ValueError(f"at most {_FACTS} facts, got {len(facts)}")
    if not dist.is_initialized():  # one process, no group: no one to tell or to agree with
        if error is not None:
            raise error
        return torch.tensor([list(facts) + [0] * (_FACTS - len(facts))], dtype=torch.int64)
    row = torch.zeros(2 + _FACTS, dtype=torch.int64)
    row[0], row[1] = CALLS.index(what), error is not None
    row[2 : 2 + len(facts)] = torch.tensor(list(facts), dtype=torch.int64)
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    table = [torch.zeros_like(row, device=device) for _ in range(world)]
    _exchanges += 1
    try:
        dist.all_gather(table, row.to(device))
    except Exception as exc:  # noqa: BLE001 - a timeout or a lost peer, reported as what it means here
        if error is not None:
            raise error from exc
        raise RankError(
            f"{what} is collective: every rank must call it, at the same point of the program; rank {rank} "
            f"{_waited(exc)}. Check that no rank skips it (e.g. a save on rank 0 only), stopped early, "
            "or took fewer steps"
        ) from exc
    rows = torch.stack([t.cpu() for t in table])
    calls = rows[:, 0].tolist()
    if len(set(calls)) > 1:
        raise RankError(
            "ranks make different collective calls: "
            + "; ".join(f"{CALLS[c]} on {_ranks(r for r, x in enumerate(calls) if x == c)}" for c in sorted(set(calls)))
            + f". Every rank must call {', '.join(CALLS[1:])} together and in the same order "
            "(the same number of steps, and saves on every rank)",
            ranks=range(world),
        )
    failed = [r for r in range(world) if rows[r, 1]]
    if failed:
        messages: list[str | None] = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        first = failed[0]
        more = f" (and on {_ranks(failed[1:])})" if len(failed) > 1 else ""
        raise RankError(
            f"{what} failed on rank {first}{more}: {messages[first]}. "
            + ("No rank has a pipeline" if what == "pipeline" else "No rank ran it; the pipeline can go on"),
            ranks=failed,
        )
    return rows[:, 2:]


def _waited(exc: BaseException) -> str:
    """How a wait for the other ranks ended, in words: the timeout, or a lost connection."""
    detail = _describe(exc)
    if "timed out" in detail.lower() or "timeout" in detail.lower():
        return f"waited {group_timeout()} (the process-group timeout) for the others ({detail})"
    return f"lost the connection to another rank ({detail})"


def _describe(error: BaseException) -> str:
    """``error`` in one line: its first line, and the error it was raised from (torch wraps a stage's error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # NOTE: gloo starts its messages with the C++ source position, of no use to a reader
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0]) if lines else ""
    text = f"{type(error).__name__}: {first}".rstrip(": ")
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    if root is not error:
        text += f" ({_describe(root)})"
    return text[:500]


def _ranks(ranks) -> str:
    ranks = list(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: notes are a help, not a need
        return None


def schedule_failure(error: BaseException, what: str) -> BaseException:
    """What to raise when ``what`` failed inside the schedule on this rank with ``error``.

    A rank whose stage raised writes a note to the process group's store; a rank that then fails
    waiting for it (at the process-group timeout, or when the connection drops) finds the note
    and raises a :class:`RankError` naming that rank and its error rather than a bare timeout.
    """
    store, rank = _store(), dist.get_rank()
    if store is None:
        return error
    prefix = f"ppzoo/failed/{_exchanges}"
    try:
        for other in range(dist.get_world_size()):
            key = f"{prefix}/{other}"
            if other != rank and store.check([key]):
                message = store.get(key).decode("utf-8", "replace")
                return RankError(
                    f"{what} failed on rank {other} inside the schedule: {message}. Rank {rank} {_waited(error)}. "
                    "A schedule that failed midway leaves messages in flight: end the run (and resume from a "
                    "saved state)",
                    ranks=[other],
                )
        store.set(f"{prefix}/{rank}", _describe(error))
    except Exception:  # noqa: BLE001 - the store itself failed: the error is still the right one
        pass
    return error


def tensor_digest(*tensors: torch.Tensor | None) -> int:
    """A 63-bit hash of ``tensors`` (dtype, shape and bytes; None counts as absent), equal on every rank."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        if tensor is None:
            digest.update(b"-")
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def check_same(
    facts: torch.Tensor, groups: Sequence[Sequence[int]], *, what: str, describe: Callable[[list[int]], str]
) -> None:
    """Refuse, on every rank alike, facts that differ between the ranks of one group.

    Args:
        facts: every rank's facts, as :func:`exchange` returns them.
        groups: ranks that must agree (e.g. :func:`batch_groups`).
        what: the call, for the message.
        describe: one rank's facts in words.

    Raises:
        ValueError: two ranks of a group passed different facts; the message names the ranks and both values.
    """
    for group in groups:
        seen: dict[tuple[int, ...], list[int]] = {}
        for rank in group:
            seen.setdefault(tuple(facts[rank].tolist()), []).append(rank)
        if len(seen) > 1:
            parts = "; ".join(f"{describe(list(value))} on {_ranks(ranks)}" for value, ranks in seen.items())
            raise ValueError(
                f"ranks disagree on the batch passed to {what}: {parts}. Every rank of a pipeline (with data "
                "parallelism: every rank of one data-parallel group) must pass the same batch; give every rank "
                "the same data (seed, order, length)"
            )
