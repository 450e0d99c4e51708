"""Schedule simulation (``ppzoo.simulate``): with equal stage costs, the schedules' own action orders
give the textbook bubble of each schedule, the closed forms of ``ppzoo.estimate``. The planner's use
of the simulation (the split with the shortest step) is in ``tests/test_split.py``."""

import pytest

from ppzoo import simulate
from ppzoo.estimate import bubble_fraction


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble", "InterleavedZeroBubble"])
@pytest.mark.parametrize("pp, m", [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16)])
def test_bubble_fraction_is_what_the_schedule_simulation_gives(schedule, pp, m):
    v = 1 if schedule in ("GPipe", "1F1B") else 2
    ideal = simulate.ideal_efficiency(schedule, pp=pp, microbatches=m, stages_per_rank=v)
    assert 1 - bubble_fraction(schedule, pp=pp, microbatches=m, stages_per_rank=v) == pytest.approx(ideal)


@pytest.mark.parametrize(
    "schedule, pp, m, v",
    [
        ("GPipe", 3, 4, 1),
        ("1F1B", 4, 8, 1),
        ("Interleaved1F1B", 4, 8, 2),
        ("Interleaved1F1B", 8, 16, 3),
        ("LoopedBFS", 3, 6, 2),
        ("InterleavedZeroBubble", 4, 8, 2),
        ("ZBVZeroBubble", 4, 8, 2),
        ("DualPipeV", 4, 8, 2),
    ],
)
def test_a_compiled_order_gives_makespan_bit_for_bit(schedule, pp, m, v):
    import random

    order = simulate.schedule_order(schedule, pp=pp, microbatches=m, stages_per_rank=v)
    compiled = simulate.compile_order(order, pp * v)
    rng = random.Random(0)
    for _ in range(5):
        costs = [rng.uniform(0.1, 3.0) for _ in range(pp * v)]
        assert compiled(costs) == simulate.makespan(order, costs)


def test_a_compiled_order_that_deadlocks_is_refused():
    order = {0: [(0, "B", 0), (0, "F", 0)]}  # a backward before its forward
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate.compile_order(order, 1)


def test_rank_finish_replays_measured_durations_of_each_action():
    # 1F1B, pp=2, 2 microbatches: rank 0 runs F0 F1 B0 B1, rank 1 F0 B0 F1 B1
    order = simulate.schedule_order("1F1B", pp=2, microbatches=2)
    assert order == {
        0: [(0, "F", 0), (0, "F", 1), (0, "B", 0), (0, "B", 1)],
        1: [(1, "F", 0), (1, "B", 0), (1, "F", 1), (1, "B", 1)],
    }
    took = {(0, "F"): 1.0, (0, "B"): 2.0, (1, "F"): 3.0, (1, "B"): 4.0}
    finish = simulate.rank_finish(order, lambda action: took[action[:2]] + (0.5 if action == (1, "F", 1) else 0.0), 2)
    # rank 1: F0 1-4, B0 4-8, F1 8-11.5, B1 11.5-15.5; rank 0: F0 0-1, F1 1-2, B0 8-10, B1 15.5-17.5
    assert finish == {0: 17.5, 1: 15.5}
    # with durations proportional to stage costs, the latest finish is makespan's
    costs = [1.0, 1.5]
    replay = simulate.rank_finish(order, lambda a: simulate.COSTS[a[1]] * costs[a[0]], 2)
    assert max(replay.values()) == simulate.makespan(order, costs)
