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
