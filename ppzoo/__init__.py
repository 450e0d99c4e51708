"""ppzoo: pipeline-parallel training of Hugging Face causal LMs, for any architecture, through plugins."""

import sys as _sys
import types as _types

from ppzoo.adapter import Adapter, KeyMap, Layout
from ppzoo.hookspecs import hookimpl
from ppzoo.plan import Plan, StagePlan, plan
from ppzoo.registry import adapter_for, adapters

#: public names loaded on first use: the runtime imports torch.distributed.pipelining (and with it
#: torch._dynamo), which ``ppzoo plan``, ``ppzoo list`` and the conformance checks do not need
_LAZY = {"pipeline": "ppzoo.pipeline", "Pipeline": "ppzoo.pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppzoo' has no attribute {name!r}")


class _Package(_types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # NOTE: importing the submodule ppzoo.pipeline sets the package attribute `pipeline` to the
        # module; the public `ppzoo.pipeline` is the function of that name, so keep the function.
        if name in _LAZY and isinstance(value, _types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = [
    "Adapter",
    "KeyMap",
    "Layout",
    "Pipeline",
    "Plan",
    "StagePlan",
    "adapter_for",
    "adapters",
    "hookimpl",
    "pipeline",
    "plan",
]
__version__ = "0.1.0"
