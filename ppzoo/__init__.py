"""ppzoo: pipeline-parallel training of Hugging Face causal LMs, for any architecture, through plugins."""

from ppzoo.adapter import Adapter, KeyMap, Layout
from ppzoo.hookspecs import hookimpl
from ppzoo.plan import Plan, StagePlan, plan
from ppzoo.registry import adapter_for, adapters

__all__ = ["Adapter", "KeyMap", "Layout", "Plan", "StagePlan", "adapter_for", "adapters", "hookimpl", "plan"]
__version__ = "0.1.0"
