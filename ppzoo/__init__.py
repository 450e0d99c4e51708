"""ppzoo: pipeline-parallel training of Hugging Face causal LMs, for any architecture, through plugins."""

#: every public name is loaded on first use: ``ppzoo plan`` answering from its cache imports neither
#: torch nor transformers, and the runtime (torch.distributed.pipelining, torch._dynamo) loads only
#: for ``pipeline``
_LAZY = {
    "Adapter": "ppzoo.adapter",
    "KeyMap": "ppzoo.adapter",
    "Capability": "ppzoo.capabilities",
    "hookimpl": "ppzoo.hookspecs",
    "Layout": "ppzoo.layout",
    "Plan": "ppzoo.planner",
    "StagePlan": "ppzoo.planner",
    "plan": "ppzoo.planner",
    "adapter_for": "ppzoo.registry",
    "adapters": "ppzoo.registry",
    "Problem": "ppzoo.validation",
    "Settings": "ppzoo.validation",
    "ValidationError": "ppzoo.validation",
    "pipeline": "ppzoo.build",
    "Pipeline": "ppzoo.runtime",
    "RankError": "ppzoo.agreement",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppzoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
