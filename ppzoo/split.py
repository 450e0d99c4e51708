"""The split search: which contiguous runs of layout units make the stages.

Units are the layout's input modules, each layer, and the output modules. :func:`balanced_bounds`
picks the split whose step, simulated with the schedule's own order (:mod:`ppzoo.simulate`), is
shortest; :func:`stages_from_modules` checks an explicit split a user gives.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from ppzoo.layout import Layout

__all__ = ["balanced_bounds", "min_max_bounds", "stage_costs", "stages_from_modules"]

#: up to this many candidate splits the planner simulates every one; above, it searches locally
_EXHAUSTIVE_SPLITS = 2000
#: the most schedule actions the search simulates in all (a few seconds of planning at most)
_SEARCH_ACTIONS = 2_000_000
#: a split less even than the min-max one must shorten the simulated step by more than this
#: share: uneven stages cost memory (the first stages keep the most microbatches in flight)
_STEP_TOLERANCE = 0.01


def min_max_bounds(unit_costs: Sequence[float], stages: int) -> tuple[int, ...]:
    """Stage bounds over the units (each stage ≥ 1 unit, contiguous) minimising the costliest stage.

    The bounds ``(0, b1, …, n)`` cut the units into stages ``units[b_i : b_i+1]``.
    """
    n = len(unit_costs)
    prefix = [0.0]
    for c in unit_costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max-cost splitting the first i units into s stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                # NOTE: on ties prefer the earlier cut, which keeps the split deterministic.
                if value < best[s][i] - 1e-9 * abs(value):
                    best[s][i], cut[s][i] = value, j
    bounds, i = [n], n
    for s in range(stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    return tuple(bounds[::-1])


def stage_costs(unit_costs: Sequence[float], bounds: Sequence[int]) -> list[float]:
    return [sum(unit_costs[a:b]) for a, b in zip(bounds, bounds[1:])]


def balanced_bounds(
    unit_costs: Sequence[float],
    stages: int,
    *,
    schedule: str,
    pp: int,
    microbatches: int,
    step_costs: Sequence[float] | None = None,
) -> tuple[int, ...]:
    """The split of the units into ``stages`` contiguous stages whose simulated step is shortest.

    Each candidate split runs through the schedule's own order (:mod:`ppzoo.simulate`): every
    split when there are few, else those a local search visits from the min-max split (moving one
    or two neighbouring boundaries by a unit while the step gets shorter). Of the splits within
    ``_STEP_TOLERANCE`` of the shortest step, the one with the cheapest costliest stage wins. With
    one stage a rank and many microbatches this is the min-max split; with few microbatches the
    last stages, on every microbatch's critical path, get lighter; with two stages a rank, a
    rank's work is the sum of two and the order decides which pairs stall. Schedules the
    simulation does not know (a CSV file) keep the min-max split.

    ``step_costs`` (same unit as ``unit_costs``, which are per microbatch) is what each unit costs
    once a step, after its stage's last backward: its optimizer step. Each stage's sum is added to
    its rank's finish in the simulated step, so a rank that finishes last (the first, under 1F1B)
    gets fewer parameters to update.
    """
    from ppzoo import simulate

    bounds = min_max_bounds(unit_costs, stages)
    if schedule not in simulate.SIMULATED or stages == 1:
        return bounds
    try:
        order = simulate.schedule_order(schedule, pp=pp, microbatches=microbatches, stages_per_rank=stages // pp)
    except (ValueError, RuntimeError):  # NOTE: an order torch refuses to generate for these counts
        return bounds
    total = sum(unit_costs) or 1.0
    units = [c / total for c in unit_costs]
    once = None if step_costs is None else [c / total for c in step_costs]

    # NOTE: one order, many splits: its dependency graph is built once (same results as makespan)
    simulated = simulate.compile_order(order, stages)

    def step(b: tuple[int, ...]) -> float:
        if once is None:
            return simulated(stage_costs(units, b))
        return simulated(stage_costs(units, b), stage_costs(once, b))

    def evenness(b: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
        return round(max(stage_costs(units, b)), 12), b

    n = len(units)
    # NOTE: a budget in simulated actions, not in seconds, so that every rank plans alike
    budget = max(1, _SEARCH_ACTIONS // max(1, sum(len(ops) for ops in order.values())))
    if math.comb(n - 1, stages - 1) <= min(_EXHAUSTIVE_SPLITS, budget):
        steps = {b: step(b) for b in ((0, *cuts, n) for cuts in itertools.combinations(range(1, n), stages - 1))}
    else:
        steps = {bounds: step(bounds)}
        while len(steps) < budget:
            # NOTE: one boundary, or two neighbouring ones together (a stage shifting whole), by one unit
            for k in range(1, stages):
                for width in (1, 2)[: stages - k]:
                    for delta in (-1, 1):
                        moved = bounds[:k] + tuple(b + delta for b in bounds[k : k + width]) + bounds[k + width :]
                        if moved not in steps and all(a < b for a, b in zip(moved, moved[1:])):
                            steps[moved] = step(moved)
            shortest = min(steps, key=lambda b: (steps[b], b))
            if steps[shortest] >= steps[bounds]:
                break
            bounds = shortest
    shortest = min(steps.values())
    return min((b for b, t in steps.items() if t <= shortest * (1 + _STEP_TOLERANCE)), key=evenness)


def stages_from_modules(layout: Layout, stage_modules: Sequence[Sequence[str]]) -> list[list[str]]:
    known = layout.modules
    position = {fqn: i for i, fqn in enumerate(known)}
    seen: dict[str, int] = {}
    for s, mods in enumerate(stage_modules):
        if not mods:
            raise ValueError(f"stage_modules[{s}] is empty; every stage needs at least one module")
        for fqn in mods:
            if fqn not in position:
                raise ValueError(
                    f"stage_modules[{s}] names unknown module {fqn!r}; known modules are "
                    f"{known[0]!r} … {known[-1]!r} ({', '.join(layout.inputs)}, {layout.layers}.0-"
                    f"{layout.num_layers - 1}, {', '.join(layout.outputs)})"
                )
            if fqn in seen:
                raise ValueError(f"module {fqn!r} is listed in stage {seen[fqn]} and again in stage {s}")
            seen[fqn] = s
    missing = [fqn for fqn in known if fqn not in seen]
    if missing:
        raise ValueError(f"stage_modules leaves {missing} in no stage; every module must be in exactly one stage")
    order = [fqn for mods in stage_modules for fqn in mods]
    if order != list(known):
        raise ValueError(
            f"stage_modules must keep forward order (inputs, layers in order, outputs) across stages; got {order}"
        )
    return [list(m) for m in stage_modules]
