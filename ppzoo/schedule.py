"""Schedule construction (every torch schedule and CSV schedules), microbatch checks, the loss.

Schedules are ``torch.distributed.pipelining`` objects. ppzoo builds its ``PipelineStage`` objects
with static shapes (``input_args`` / ``output_args``), so no metadata round trip or dummy forward
runs at the first step; a batch of another shape gets stages and schedules of its own (see
:class:`ppzoo.pipeline.Pipeline`).
"""

from __future__ import annotations

import csv
from typing import Any, Callable, Sequence

from torch.distributed import pipelining

from ppzoo.plan import schedule_kind

__all__ = ["PipelineStage", "build_schedule", "check_batch", "check_microbatches", "csv_stage_count"]

_CLASSES = {
    "GPipe": "ScheduleGPipe",
    "1F1B": "Schedule1F1B",
    "Interleaved1F1B": "ScheduleInterleaved1F1B",
    "LoopedBFS": "ScheduleLoopedBFS",
    "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble",
    "ZBVZeroBubble": "ScheduleZBVZeroBubble",
    "DualPipeV": "ScheduleDualPipeV",
}


class PipelineStage(pipelining.PipelineStage):
    """torch's ``PipelineStage``, minus connection warm-up messages from a rank to itself.

    NOTE: some torch releases (2.11) warm up the point-to-point connections at the first step by
    exchanging a tensor with both neighbouring stages, even one on this very rank (V placement);
    gloo cannot send to its own rank, so those exchanges are left out. Stages on one rank pass
    their tensors directly, and torch releases that warm up otherwise never call this.
    """

    def _get_init_p2p_neighbors_ops(self) -> list:
        return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != self.group_rank]


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

    Raises:
        ValueError: naming the numbers and what to change.
    """
    name, _ = schedule_kind(schedule)
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be an integer >= 1, got {microbatches!r}")
    if name in ("1F1B", "DualPipeV") and microbatches < num_stages:
        raise ValueError(
            f"schedule {name} needs at least as many microbatches as stages: got {microbatches} microbatches "
            f"for {num_stages} stages; raise microbatches to {num_stages} or more"
        )
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and microbatches % pp:
        raise ValueError(
            f"schedule {name} runs microbatches in rounds of pp={pp}: {microbatches} microbatches is not a "
            f"multiple of {pp}"
        )


def check_batch(*, batch_size: int, microbatches: int) -> None:
    """Raise when a batch cannot be split into ``microbatches`` equal microbatches."""
    if batch_size % microbatches:
        raise ValueError(
            f"batch of {batch_size} rows cannot be split into {microbatches} equal microbatches; "
            f"use a batch size divisible by {microbatches}"
        )


def build_schedule(
    schedule: str,
    stages: Sequence[pipelining.PipelineStage],
    *,
    microbatches: int,
    loss_fn: Callable[..., Any] | None,
) -> Any:
    """The torch schedule object for ``schedule`` over this rank's ``stages``.

    ``loss_fn=None`` gives a forward-only schedule (for evaluation): GPipe's order, whatever the
    training schedule, since torch's zero-bubble and V schedules cannot run without a backward.
    """
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
    cls = getattr(pipelining, _CLASSES[name])
    if kind == "single":
        if len(stages) != 1:
            raise ValueError(f"schedule {name} runs one stage per rank, got {len(stages)}")
        return cls(stages[0], microbatches, **common)
    return cls(list(stages), microbatches, **common)


def _forward_only(stages: Sequence[pipelining.PipelineStage], *, microbatches: int, placement: str) -> Any:
    """A forward-only runtime for several stages per rank: every microbatch through stage 0, then 1, ...

    Each rank runs its stages' forwards in stage order, all microbatches of one stage before the
    next (GPipe's order), so every input is sent before it is awaited: no cycle, no deadlock.
    """
    from torch.distributed.pipelining.schedules import (
        FORWARD,
        RECV_F,
        SEND_F,
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
    for index in range(num_stages):
        rank = mapping[index]
        for mb in range(microbatches):
            if index > 0 and mapping[index - 1] != rank:
                order[rank].append(_Action(index, RECV_F, mb))
            order[rank].append(_Action(index, FORWARD, mb))
            if index < num_stages - 1 and mapping[index + 1] != rank:
                order[rank].append(_Action(index, SEND_F, mb))
    runtime.pipeline_order = order
    runtime.pipeline_order_with_comms = order
    return runtime
