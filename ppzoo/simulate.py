"""Schedule simulation: how long a step takes for given per-stage costs.

A schedule is, per rank, an ordered list of compute actions ``(stage, kind, microbatch)`` with
``kind`` one of ``F`` (forward), ``B`` (full backward), ``I`` (input gradient) and ``W`` (weight
gradient). :func:`schedule_order` returns the order that actually runs: torch's own generators
for the multi-stage schedules, the textbook orders for GPipe, 1F1B and LoopedBFS (which torch
computes the same way from its stage objects). :func:`makespan` runs an order the way the
runtime does: each rank executes its actions in order, each as soon as its inputs exist;
communication is free.

The planner uses it to choose the split whose *step* is shortest, not merely the split whose most
expensive stage is cheapest: with two stages a rank, a rank's work is the sum of two stages and
interleaved orders stall on an uneven pair. The benchmarks use it for each schedule's ideal.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence

import numpy as np

from ppzoo.schedule import SCHEDULES

__all__ = [
    "Action",
    "COSTS",
    "SIMULATED",
    "compile_order",
    "schedule_order",
    "makespan",
    "rank_finish",
    "ideal_efficiency",
]

#: ``(stage index, kind, microbatch index)``
Action = tuple[int, str, int]

#: cost of each kind of action relative to the stage's forward: a backward is two forwards, split
#: evenly between input and weight gradients where the schedule splits it (the zero-bubble papers'
#: assumption)
COSTS: dict[str, float] = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}

#: schedules :func:`schedule_order` knows: every torch schedule (CSV schedules are not simulated)
SIMULATED = tuple(SCHEDULES)


def _single_stage_order(schedule: str, pp: int, microbatches: int) -> dict[int, list[Action]]:
    order = {}
    for rank in range(pp):
        if schedule == "GPipe":
            ops = [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]
        else:  # 1F1B: warm-up forwards, then one forward one backward, then drain
            warmup = min(pp - 1 - rank, microbatches)
            ops = [("F", i) for i in range(warmup)]
            for i in range(microbatches - warmup):
                ops += [("F", warmup + i), ("B", i)]
            ops += [("B", i) for i in range(microbatches - warmup, microbatches)]
        order[rank] = [(rank, kind, i) for kind, i in ops]
    return order


def _looped_bfs_order(pp: int, microbatches: int, stages_per_rank: int) -> dict[int, list[Action]]:
    order = {}
    for rank in range(pp):
        stages = range(rank, pp * stages_per_rank, pp)
        ops = [(s, "F", i) for s in stages for i in range(microbatches)]
        ops += [(s, "B", i) for s in reversed(stages) for i in reversed(range(microbatches))]
        order[rank] = ops
    return order


@functools.lru_cache(maxsize=64)
def _torch_order(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> tuple[tuple[Action, ...], ...]:
    from torch.distributed import pipelining
    from torch.distributed.pipelining.schedules import _ComputationType, generate_stage_to_rank_mapping

    cls = getattr(pipelining, SCHEDULES[schedule].torch_class)
    num_stages = stages_per_rank * pp
    rounds = max(1, microbatches // pp)
    # NOTE: the generators read only these attributes of the schedule; building a real schedule
    # needs stages and a process group, which a plan has not got.
    state = types.SimpleNamespace(
        pp_group_size=pp,
        _n_microbatches=microbatches,
        n_local_stages=stages_per_rank,
        num_stages=num_stages,
        _num_stages=num_stages,
        number_of_rounds=rounds,
        microbatches_per_round=microbatches // rounds,
        stage_index_to_group_rank=generate_stage_to_rank_mapping(pp, num_stages, style=SCHEDULES[schedule].placement),
    )
    compute = {"F", "B", "I", "W"}
    result = []
    for rank in range(pp):
        ops: list[Action] = []
        for action in cls._calculate_single_rank_operations(state, rank):
            if action is None:
                continue
            # NOTE: DualPipeV overlaps a forward and a backward in one action; one core runs them
            # one after the other.
            parts = action.sub_actions if action.computation_type == _ComputationType.OVERLAP_F_B else (action,)
            for part in parts:
                kind = part.computation_type.value
                if kind in compute:
                    ops.append((part.stage_index, kind, part.microbatch_index))
        result.append(tuple(ops))
    return tuple(result)


def schedule_order(schedule: str, *, pp: int, microbatches: int, stages_per_rank: int = 1) -> dict[int, list[Action]]:
    """Rank → its compute actions in the order the schedule runs them.

    Args:
        schedule: a canonical schedule name (see :data:`SIMULATED`).
        pp: pipeline ranks.
        microbatches: microbatches per step.
        stages_per_rank: stages each rank holds (1 for GPipe and 1F1B, 2 for the V schedules).

    Raises:
        ValueError: a schedule not in :data:`SIMULATED` (a CSV schedule, say).
    """
    if schedule in ("GPipe", "1F1B"):
        return _single_stage_order(schedule, pp, microbatches)
    if schedule == "LoopedBFS":
        return _looped_bfs_order(pp, microbatches, stages_per_rank)
    if schedule not in SIMULATED:
        raise ValueError(f"no simulation for schedule {schedule!r}; simulated: {', '.join(SIMULATED)}")
    return {rank: list(ops) for rank, ops in enumerate(_torch_order(schedule, pp, microbatches, stages_per_rank))}


def makespan(order: dict[int, list[Action]], stage_costs: Sequence[float], costs: dict[str, float] = COSTS) -> float:
    """Time from the first action to the last, each action of stage ``s`` costing ``costs[kind] × stage_costs[s]``.

    A forward needs the previous stage's forward of its microbatch; a backward or input gradient
    needs its own forward and the next stage's backward (or input gradient); a weight gradient
    needs its input gradient. A rank runs one action at a time, in its order.

    Raises:
        RuntimeError: the order deadlocks (an action waits on one that never runs).
    """
    clocks = rank_finish(order, lambda action: costs[action[1]] * stage_costs[action[0]], len(stage_costs))
    return max(clocks.values(), default=0.0)


def rank_finish(
    order: dict[int, list[Action]], duration: Callable[[Action], float], num_stages: int
) -> dict[int, float]:
    """Rank → when it ends its last action, each action taking ``duration(action)``; communication is free.

    The dependencies are :func:`makespan`'s. With the durations a profile measured, this is the
    step a runtime with no cost of its own would take on those stages (``benchmarks/timeline.py``).

    Raises:
        RuntimeError: the order deadlocks (an action waits on one that never runs).
    """
    last_stage = num_stages - 1
    done: dict[tuple[int, str, int], float] = {}
    clock = {rank: 0.0 for rank in order}
    position = {rank: 0 for rank in order}
    remaining = sum(len(ops) for ops in order.values())
    while remaining:
        moved = False
        for rank, ops in order.items():
            at, now = position[rank], clock[rank]
            while at < len(ops):
                stage, kind, mb = ops[at]
                if kind == "F":
                    start = done.get((stage - 1, "F", mb), None) if stage > 0 else 0.0
                elif kind == "W":
                    start = done.get((stage, "I", mb))
                else:
                    start = done.get((stage, "F", mb))
                    if start is not None and stage < last_stage:
                        grad = done.get((stage + 1, "G", mb))
                        start = None if grad is None else max(start, grad)
                if start is None:
                    break
                now = max(now, start) + duration(ops[at])
                done[(stage, kind, mb)] = now
                if kind in ("B", "I"):
                    done[(stage, "G", mb)] = now  # the input gradient the previous stage waits for
                at += 1
                moved = True
            remaining -= at - position[rank]
            position[rank], clock[rank] = at, now
        if not moved:
            stuck = {r: ops[position[r]] for r, ops in order.items() if position[r] < len(ops)}
            raise RuntimeError(f"schedule order deadlocks; next actions per rank: {stuck}")
    return clock


def compile_order(
    order: dict[int, list[Action]], num_stages: int, costs: dict[str, float] = COSTS
) -> Callable[..., float]:
    """:func:`makespan` of ``order`` as a function of the stage costs alone, the graph built once.

    The actions and what each waits for do not depend on the costs, so the split search, which
    simulates one order under many splits, walks them once here and then only adds and takes
    maxima: each result is :func:`makespan`'s, bit for bit (the same sums in the same order).

    The function takes the stage costs and, optionally, ``step_costs``: what each stage costs once
    a step after its last action (its optimizer step), added to its rank's finish: the step ends
    when the last rank is done with its compute and its optimizer.

    Raises:
        RuntimeError: the order deadlocks.
    """
    last_stage = num_stages - 1
    index: dict[tuple[int, str, int], int] = {}
    steps: list[tuple[int, int, int, float, int]] = []  # (rank's previous, input, gradient, cost, stage)
    gradient: dict[tuple[int, int], int] = {}
    start = 0  # NOTE: index 0 is a finish time of 0.0: no previous action, no input
    position = {rank: 0 for rank in order}
    previous = {rank: start for rank in order}
    remaining = sum(len(ops) for ops in order.values())
    while remaining:
        moved = False
        for rank, ops in order.items():
            at = position[rank]
            while at < len(ops):
                stage, kind, mb = ops[at]
                grad = start
                if kind == "F":
                    source = index.get((stage - 1, "F", mb)) if stage > 0 else start
                elif kind == "W":
                    source = index.get((stage, "I", mb))
                else:
                    source = index.get((stage, "F", mb))
                    if source is not None and stage < last_stage:
                        grad = gradient.get((stage + 1, mb))
                        if grad is None:
                            source = None
                if source is None:
                    break
                steps.append((previous[rank], source, grad, costs[kind], stage))
                previous[rank] = index[(stage, kind, mb)] = len(steps)
                if kind in ("B", "I"):
                    gradient[(stage, mb)] = len(steps)
                at += 1
                moved = True
            remaining -= at - position[rank]
            position[rank] = at
        if not moved:
            stuck = {r: ops[position[r]] for r, ops in order.items() if position[r] < len(ops)}
            raise RuntimeError(f"schedule order deadlocks; next actions per rank: {stuck}")
    ends = np.array(list(previous.values()), dtype=np.int64)
    # NOTE: which stages each rank runs, in the order of ``ends``
    held = np.zeros((len(order), num_stages), dtype=np.float64)
    for row, ops in enumerate(order.values()):
        for stage in {a[0] for a in ops}:
            held[row, stage] = 1.0
    if not steps:
        return lambda stage_costs, step_costs=None: 0.0 if step_costs is None else float((held @ step_costs).max())
    # NOTE: actions at the same depth of the graph are computed together, one numpy operation a
    # depth: the maxima and sums are makespan's own, element by element
    table = np.array([s[:3] for s in steps], dtype=np.int64)
    weight = np.array([s[3] for s in steps], dtype=np.float64)
    stage_of = np.array([s[4] for s in steps], dtype=np.int64)
    depth = np.zeros(len(steps) + 1, dtype=np.int64)
    for i, (before, source, grad) in enumerate(table.tolist(), start=1):
        depth[i] = 1 + max(depth[before], depth[source], depth[grad])
    by_depth = np.argsort(depth[1:], kind="stable")
    cuts = np.flatnonzero(np.diff(depth[1:][by_depth])) + 1
    levels = [
        (rows + 1, table[rows, 0], table[rows, 1], table[rows, 2], weight[rows], stage_of[rows])
        for rows in np.split(by_depth, cuts)
    ]

    def run(stage_costs: Sequence[float], step_costs: Sequence[float] | None = None) -> float:
        costs_ = np.asarray(stage_costs, dtype=np.float64)
        finish = np.zeros(len(steps) + 1, dtype=np.float64)
        for at, before, source, grad, w, stage in levels:
            finish[at] = np.maximum(np.maximum(finish[before], finish[source]), finish[grad]) + w * costs_[stage]
        if step_costs is None:
            return float(finish[ends].max())
        return float((finish[ends] + held @ np.asarray(step_costs, dtype=np.float64)).max())

    return run


def ideal_efficiency(schedule: str, *, pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Share of a step each rank computes when every stage costs the same and communication is free.

    ``1 − bubble``: m/(m+pp−1) for GPipe and 1F1B, v·m/(v·m+pp−1) for Interleaved1F1B,
    6m/(6m+pp−1) for ZBVZeroBubble with ``m ≥ 2·pp − 1`` (see :mod:`ppzoo.estimate`).
    """
    order = schedule_order(schedule, pp=pp, microbatches=microbatches, stages_per_rank=stages_per_rank)
    num_stages = pp * stages_per_rank
    work = microbatches * (COSTS["F"] + COSTS["B"])
    return work / makespan(order, [1.0 / stages_per_rank] * num_stages)
