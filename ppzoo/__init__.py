"""ppzoo: pipeline-parallel training of Hugging Face causal LMs, for any architecture, through plugins."""

from ppzoo.adapter import Adapter, KeyMap
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl
from ppzoo.layout import Layout
from ppzoo.planner import Plan, StagePlan, plan
from ppzoo.registry import adapter_for, adapters
from ppzoo.validation import Problem, Settings, ValidationError

#: public names loaded on first use: the runtime imports torch.distributed.pipelining (and with it
#: torch._dynamo), which ``ppzoo plan``, ``ppzoo list`` and the conformance checks do not need
_LAZY = {"pipeline": "ppzoo.runtime", "Pipeline": "ppzoo.runtime", "RankError": "ppzoo.agreement"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppzoo' has no attribute {name!r}")


__all__ = [
    "Adapter",
    "Capability",
    "KeyMap",
    "Layout",
    "Pipeline",
    "Plan",
    "Problem",
    "RankError",
    "Settings",
    "StagePlan",
    "ValidationError",
    "adapter_for",
    "adapters",
    "hookimpl",
    "pipeline",
    "plan",
]
__version__ = "0.1.0"
