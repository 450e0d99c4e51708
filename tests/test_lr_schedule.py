"""ppzoo.lr_schedule: warm-up, then constant, linear, cosine or warmup-stable-decay; torch's LambdaLR."""

import math

import pytest
import torch

from ppzoo.lr_schedule import LR_SCHEDULES, LRSchedule


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_warmup_rises_linearly_to_the_peak(name):
    schedule = LRSchedule(name, lr=1.0, steps=20, warmup_steps=4, min_lr=0.1)
    assert [schedule(s) for s in range(1, 5)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("name", ["linear", "cosine", "wsd"])
def test_decays_fall_monotonically_to_min_lr(name):
    schedule = LRSchedule(name, lr=2.0, steps=30, warmup_steps=5, min_lr=0.2)
    after = [schedule(s) for s in range(5, 31)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert after[0] == pytest.approx(2.0) and after[-1] == pytest.approx(0.2)


def test_shapes_between_the_ends():
    linear = LRSchedule("linear", lr=1.0, steps=10, min_lr=0.0)
    cosine = LRSchedule("cosine", lr=1.0, steps=10, min_lr=0.0)
    # half way: the linear rate is half the peak, the cosine one too (cos(pi/2) = 0), a quarter differs
    assert linear(5) == pytest.approx(0.5) and cosine(5) == pytest.approx(0.5)
    assert cosine(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert LRSchedule("constant", lr=3.0, steps=10, warmup_steps=2)(10) == 3.0


def test_wsd_is_stable_until_its_decay():
    schedule = LRSchedule("wsd", lr=1.0, steps=20, warmup_steps=2, min_lr=0.0, decay_steps=4)
    assert [schedule(s) for s in range(2, 17)] == [1.0] * 15
    assert [schedule(s) for s in range(17, 21)] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    # default decay: the last 20% of the steps after warm-up
    assert LRSchedule("wsd", lr=1.0, steps=12, warmup_steps=2).wsd_decay_steps == 2


def test_apply_and_lambda_lr_agree():
    schedule = LRSchedule("cosine", lr=0.5, steps=8, warmup_steps=3, min_lr=0.05)
    param = torch.nn.Parameter(torch.zeros(1))
    stepped = torch.optim.SGD([param], lr=123.0)
    scheduler = schedule.scheduler(stepped)
    applied = torch.optim.SGD([param], lr=123.0)
    for step in range(1, 9):
        assert schedule.apply(applied, step) == applied.param_groups[0]["lr"]
        assert stepped.param_groups[0]["lr"] == pytest.approx(applied.param_groups[0]["lr"])
        stepped.step()
        scheduler.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="step"), "unknown --lr-schedule 'step'; use one of constant, linear, cosine, wsd"),
        (dict(warmup_steps=11), "--warmup-steps 11 must be between 0 and --steps 10"),
        (dict(min_lr=2.0), "--min-lr 2.0 must be between 0 and --lr 1.0"),
        (dict(decay_steps=0), "--decay-steps 0 must be between 1 and --steps minus --warmup-steps (10)"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError) as info:
        LRSchedule(**{"name": "cosine", "lr": 1.0, "steps": 10, **kwargs})
    assert message in str(info.value)
