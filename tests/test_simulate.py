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
