"""What every in-process conformance check runs in: the adapter claimed in the registry
(:func:`resolving_to`), its tiny checkpoint in a temporary directory, stages built from it, and one
``AssertionError`` that lists every problem a check found.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ppzoo import registry
from ppzoo.adapter import Adapter
from ppzoo.checkpoint import Checkpoint
from ppzoo.hookspecs import hookimpl
from ppzoo.planner import Plan
from ppzoo.stage import build_stage
from ppzoo.testing.reference import save_tiny_model

__all__ = ["DROPOUT_SEED", "SEQ_LEN", "resolving_to"]

#: sequence length of the kit's batches; a tiny sliding window must be shorter to be exercised
SEQ_LEN = 12
#: the base seed of the dropout streams of the stages and the reference the kit compares
DROPOUT_SEED = 1234


class _Claim:
    """A plugin that makes the registry resolve an adapter's configs to that very adapter."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    @hookimpl
    def ppzoo_adapter_for(self, config: Any) -> Adapter | None:
        archs = getattr(config, "architectures", None) or ()
        if self.adapter.matches(config) or any(a in self.adapter.architectures for a in archs):
            return self.adapter
        return None


@contextlib.contextmanager
def resolving_to(adapter: Adapter) -> Iterator[None]:
    """Make ``registry.adapter_for`` return ``adapter`` for its configs inside the block.

    The checks go through the real entry points (``ppzoo.plan``, ``ppzoo.pipeline``), which ask the
    registry; an adapter under test that is not the registered one (an instance built in a test,
    or one whose package is not installed) is claimed for the duration of the block.
    """
    try:
        current = registry.adapter_for(adapter.tiny_config())
    except registry.UnknownArchitectureError:
        current = None
    if current is adapter:
        yield
        return
    with registry.plugin(_Claim(adapter), name=f"ppzoo.testing claim for {adapter.name}"):
        yield


def _fail_if(problems: list[str], heading: str) -> None:
    if problems:
        raise AssertionError(heading + "".join(f"\n  - {p}" for p in problems))


@contextlib.contextmanager
def _tiny_checkpoint(adapter: Adapter, **kwargs: Any) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"ppzoo-{adapter.name}-") as tmp:
        yield save_tiny_model(adapter, tmp, **kwargs)


def _build_stages(adapter: Adapter, config: Any, the_plan: Plan, checkpoint_dir: os.PathLike, **kwargs: Any):
    return [
        build_stage(
            config, adapter, the_plan, i, checkpoint=Checkpoint(checkpoint_dir), attn_implementation="eager", **kwargs
        )
        for i in range(the_plan.num_stages)
    ]


def _owners(name: str, modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if name.startswith(m + ".")]
