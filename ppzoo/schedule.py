"""Pipeline schedules: the table of torch schedules, CSV schedules, and building a schedule object.

Schedules are ``torch.distributed.pipelining`` objects. ppzoo builds its ``PipelineStage`` objects
with static shapes (``input_args`` / ``output_args``), so no metadata round trip or dummy forward
runs at the first step; a batch of another shape gets stages and schedules of its own (see
:class:`ppzoo.runtime.Pipeline`).

NOTE: importing ``torch.distributed.pipelining`` costs seconds (it loads ``torch._dynamo``); this
module imports it only inside the functions that build schedules, so planning stays fast.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SCHEDULES",
    "SPLIT_BACKWARD",
    "ScheduleSpec",
    "build_schedule",
    "check_batch",
    "check_microbatches",
    "csv_stage_count",
    "schedule_kind",
]


@dataclass(frozen=True)
class ScheduleSpec:
    """One torch schedule.

    Attributes:
        name: the canonical name users write (any case is accepted).
        torch_class: the class in ``torch.distributed.pipelining``.
        placement: ``"single"`` (one stage a rank), ``"loop"`` (stage ``s`` on rank ``s % pp``) or
            ``"v"`` (rank ``r`` holds stages ``r`` and ``2·pp − 1 − r``).
    """

    name: str
    torch_class: str
    placement: str


#: every torch schedule ppzoo runs, by canonical name; the one list of schedule names
SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        ScheduleSpec("GPipe", "ScheduleGPipe", "single"),
        ScheduleSpec("1F1B", "Schedule1F1B", "single"),
        ScheduleSpec("Interleaved1F1B", "ScheduleInterleaved1F1B", "loop"),
        ScheduleSpec("LoopedBFS", "ScheduleLoopedBFS", "loop"),
        ScheduleSpec("InterleavedZeroBubble", "ScheduleInterleavedZeroBubble", "loop"),
        ScheduleSpec("ZBVZeroBubble", "ScheduleZBVZeroBubble", "v"),
        ScheduleSpec("DualPipeV", "ScheduleDualPipeV", "v"),
    )
}
_BY_LOWER = {name.lower(): spec for name, spec in SCHEDULES.items()}
#: schedules that split a stage's backward into an input pass and a later weight pass
SPLIT_BACKWARD = frozenset({"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"})


def schedule_kind(schedule: str) -> tuple[str, str]:
    """``(canonical name, kind)`` for a schedule name or CSV file; kind is single, loop, v or csv.

    Raises:
        ValueError: the name is neither a known schedule nor a ``.csv`` file.
    """
    if str(schedule).lower().endswith(".csv"):
        return str(schedule), "csv"
    try:
        spec = _BY_LOWER[str(schedule).lower()]
    except KeyError:
        raise ValueError(
            f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}, or a path to a .csv schedule"
        ) from None
    return spec.name, spec.placement


def csv_stage_count(path: str) -> int:
    """Number of stages a CSV schedule addresses (its largest stage index + 1).

    Each row is one rank's actions, written as torch's ``_Action`` strings (``"0F1"`` is stage 0,
    forward, microbatch 1); empty cells are idle slots.
    """
    from torch.distributed.pipelining.schedules import _Action

    top = -1
    with open(path, newline="") as f:
        for row in csv.reader(f):
            for cell in row:
                cell = cell.strip()
                if cell:
                    top = max(top, _Action.from_str(cell).stage_index)
    if top < 0:
        raise ValueError(f"CSV schedule {path!r} holds no actions")
    return top + 1


def check_microbatches(*, schedule: str, microbatches: int, num_stages: int, pp: int) -> None:
    """Raise before any communication when ``microbatches`` does not suit the schedule.

    The rules are ppzoo's own validation rules (:func:`ppzoo.rules.microbatch_problems`), which
    :func:`ppzoo.plan` and :func:`ppzoo.pipeline` run too; this is for callers that pick the count
    after planning.

    Raises:
        ValueError: ``microbatches`` is not an integer >= 1.
        ppzoo.validation.ValidationError: the count does not suit the schedule; the message names
            the numbers and what to change.
    """
    from ppzoo.rules import microbatch_problems
    from ppzoo.validation import ValidationError

    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be an integer >= 1, got {microbatches!r}")
    problems = microbatch_problems(schedule=schedule, microbatches=microbatches, num_stages=num_stages, pp=pp)
    if problems:
        raise ValidationError(problems)


def check_batch(*, batch_size: int, microbatches: int) -> None:
    """Raise when a batch cannot be split into ``microbatches`` equal microbatches."""
    if batch_size % microbatches:
        raise ValueError(
            f"batch of {batch_size} rows cannot be split into {microbatches} equal microbatches; "
            f"use a batch size divisible by {microbatches}"
        )


def build_schedule(
    schedule: str,
    stages: Sequence[Any],
    *,
    microbatches: int,
    loss_fn: Callable[..., Any] | None,
) -> Any:
    """The torch schedule object for ``schedule`` over this rank's ``stages``.

    ``loss_fn=None`` gives a forward-only schedule (for evaluation): GPipe's order, whatever the
    training schedule, since torch's zero-bubble and V schedules cannot run without a backward.
    """
    from torch.distributed import pipelining

    name, kind = schedule_kind(schedule)
    if loss_fn is None and len(stages) > 1:
        return _forward_only(stages, microbatches=microbatches, placement="v" if kind == "v" else "loop")
    # NOTE: ppzoo's loss_fn divides by the whole batch's token count, so microbatch losses add up
    # to the batch loss and torch must not rescale gradients by the microbatch count.
    common = dict(loss_fn=loss_fn, scale_grads=False)
    if kind == "csv":
        from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

        runtime = _PipelineScheduleRuntime(list(stages), microbatches, **common)
        runtime._load_csv(name)
        return runtime
    cls = getattr(pipelining, SCHEDULES[name].torch_class)
    if kind == "single":
        if len(stages) != 1:
            raise ValueError(f"schedule {name} runs one stage per rank, got {len(stages)}")
        return cls(stages[0], microbatches, **common)
    return cls(list(stages), microbatches, **common)


def _forward_only(stages: Sequence[Any], *, microbatches: int, placement: str) -> Any:
    """A forward-only runtime for several stages per rank: every microbatch through stage 0, then 1, ...

    Each rank runs its stages' forwards in stage order, all microbatches of one stage before the
    next (GPipe's order), so every input is sent before it is awaited: no cycle, no deadlock.
    """
    from torch.distributed.pipelining.schedules import (
        FORWARD,
        RECV_F,
        RESHARD,
        SEND_F,
        UNSHARD,
        _Action,
        _PipelineScheduleRuntime,
        generate_stage_to_rank_mapping,
    )

    runtime = _PipelineScheduleRuntime(list(stages), microbatches, loss_fn=None, scale_grads=False)
    num_stages = stages[0].num_stages
    mapping = generate_stage_to_rank_mapping(stages[0].group_size, num_stages, style=placement)
    runtime.stage_index_to_group_rank = mapping
    for stage in stages:
        stage.stage_index_to_group_rank = mapping
    # NOTE: torch validates compute-only orders as training orders (it demands backwards), so the
    # order is written with its communication directly.
    order: dict[int, list] = {rank: [] for rank in range(stages[0].group_size)}
    # NOTE: an FSDP-sharded stage is gathered for its forwards and freed after them, as torch's
    # lowering of training orders does; for an unsharded stage UNSHARD and RESHARD do nothing.
    for index in range(num_stages):
        rank = mapping[index]
        order[rank].append(_Action(index, UNSHARD, None))
        for mb in range(microbatches):
            if index > 0 and mapping[index - 1] != rank:
                order[rank].append(_Action(index, RECV_F, mb))
            order[rank].append(_Action(index, FORWARD, mb))
            if index < num_stages - 1 and mapping[index + 1] != rank:
                order[rank].append(_Action(index, SEND_F, mb))
        order[rank].append(_Action(index, RESHARD, None))
    runtime.pipeline_order = order
    runtime.pipeline_order_with_comms = order
    return runtime
