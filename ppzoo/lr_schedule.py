"""Learning-rate schedules: linear warm-up, then constant, linear, cosine or warmup-stable-decay.

A schedule is a pure function of the step, so a resumed run sets the rate of any step without
replaying the ones before it. :meth:`LRSchedule.scheduler` wraps it in torch's ``LambdaLR`` for
code that steps a scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LR_SCHEDULES", "LRSchedule"]

#: the schedule names ``--lr-schedule`` accepts
LR_SCHEDULES = ("constant", "linear", "cosine", "wsd")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimizer step (1-based).

    Warm-up rises linearly to ``lr`` over ``warmup_steps`` (step ``warmup_steps`` trains at
    ``lr``); then ``constant`` stays there, ``linear`` and ``cosine`` fall to ``min_lr`` at
    ``steps``, and ``wsd`` (warmup-stable-decay) stays at ``lr`` until the last ``decay_steps``,
    over which it falls linearly to ``min_lr``.

    Raises:
        ValueError: an unknown name, or settings that leave no room for the schedule.
    """

    name: str
    lr: float
    steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"unknown --lr-schedule {self.name!r}; use one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be between 0 and --steps {self.steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be between 0 and --lr {self.lr}")
        if self.decay_steps is not None and not 1 <= self.decay_steps <= self.steps - self.warmup_steps:
            raise ValueError(
                f"--decay-steps {self.decay_steps} must be between 1 and --steps minus --warmup-steps "
                f"({self.steps - self.warmup_steps})"
            )

    @property
    def wsd_decay_steps(self) -> int:
        """The decay of ``wsd``: ``decay_steps``, else the last 20% of the steps after warm-up."""
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, round(0.2 * (self.steps - self.warmup_steps)))

    def factor(self, step: int) -> float:
        """The rate of ``step`` as a fraction of ``lr``."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps if self.warmup_steps else 1.0
        if self.name == "constant":
            return 1.0
        floor = self.min_lr / self.lr
        if self.name == "wsd":
            decay = self.wsd_decay_steps
            progress = (step - (self.steps - decay)) / decay
        else:
            progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.name == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    def __call__(self, step: int) -> float:
        """The learning rate of ``step``."""
        return self.lr * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group of ``optimizer`` to the rate of ``step``; returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """torch's ``LambdaLR`` over this schedule: the first optimizer step trains at step 1's rate."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr
            group.setdefault("initial_lr", self.lr)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: self.factor(done + 1))
