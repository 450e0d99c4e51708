"""Build one pipeline stage: meta build, prune to the plan, materialise, load, patch forwards.

A stage is the Hugging Face ``*ForCausalLM`` module itself, pruned: modules other stages hold are
set to ``None`` and the layer container becomes a ``ModuleDict`` keyed by the original layer
index, so every parameter keeps its original FQN (``model.layers.7.mlp.up_proj.weight``) and
checkpoint keys match without renaming.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ppzoo.adapter import Adapter, Layout
from ppzoo.plan import Plan, StagePlan, meta_model
from ppzoo.weights import Checkpoint, load_stage_weights

__all__ = ["build_stage", "prune", "materialize", "run_chain"]


def _set_module(root: nn.Module, fqn: str, value: nn.Module | None) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


def prune(model: nn.Module, layout: Layout, stage: StagePlan) -> None:
    """Drop every module ``stage`` does not hold; keep layer FQNs (``ModuleDict`` by index)."""
    keep = set(stage.modules)
    for fqn in layout.inputs + layout.outputs:
        if fqn not in keep:
            _set_module(model, fqn, None)
    container = model.get_submodule(layout.layers)
    _set_module(model, layout.layers, nn.ModuleDict({str(i): container[i] for i in stage.layers}))


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give every meta parameter and buffer real (uninitialised) storage on ``device``.

    Unlike ``Module.to_empty``, tensors shared by several modules stay shared (tied weights).
    """
    memo: dict[int, torch.Tensor] = {}
    for owner in model.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
                owner._parameters[name] = memo[id(param)]
        for name, buf in list(owner._buffers.items()):
            if buf is not None:
                if id(buf) not in memo:
                    memo[id(buf)] = torch.empty_like(buf, device=device)
                owner._buffers[name] = memo[id(buf)]


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each tied copy the very same parameter as its source where the stage holds both."""
    for copy, source in tied.items():
        try:
            src = model.get_parameter(source)
            model.get_parameter(copy)
        except AttributeError:
            continue  # one of the two lives on another stage
        owner, _, name = copy.rpartition(".")
        setattr(model.get_submodule(owner), name, src)


def build_stage(
    config: Any,
    adapter: Adapter,
    plan: Plan,
    stage_index: int,
    *,
    checkpoint: Checkpoint,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    parallelize: Callable[[nn.Module], None] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """One ready stage: built on meta, pruned, parallelized, materialised on ``device``, loaded, patched.

    Args:
        config: the model config.
        adapter: the adapter for ``config``.
        plan: the plan the stage belongs to.
        stage_index: which stage of ``plan`` to build.
        checkpoint: where the weights are read from (only this stage's tensors).
        device: target device.
        dtype: parameter dtype.
        parallelize: applies TP / FSDP to the stage while it is still on the meta device, so
            each rank then reads only its own slices of every tensor.
        **model_kwargs: passed to ``from_config`` (``attn_implementation``, ...).

    Returns:
        The pruned ``*ForCausalLM`` module; its forward maps the stage input to its output.
    """
    stage = plan.stages[stage_index]
    model = meta_model(config, dtype=dtype, **model_kwargs)
    prune(model, plan.layout, stage)
    tied = adapter.tied_weights(config)
    _tie(model, tied)
    if parallelize is not None:
        parallelize(model)
        # NOTE: FSDP2 owns its parameters' storage; let it re-create them (ties re-made after).
        model.to_empty(device=device)
        _tie(model, tied)
    else:
        materialize(model, device)
    for owner in model.modules():
        if owner._non_persistent_buffers_set and any(owner._buffers.get(n) is not None for n in owner._non_persistent_buffers_set):
            adapter.init_buffers(model, owner)
    load_stage_weights(model, checkpoint, adapter=adapter, config=config)
    adapter.patch_inner_forward(model.get_submodule(adapter.inner_name))
    adapter.patch_causal_lm_forward(model)
    model.ppzoo_stage = stage
    return model


def run_chain(
    stages: Sequence[nn.Module], input_ids: torch.Tensor, *, attention_mask=None, position_ids=None
) -> torch.Tensor:
    """Run stages 0 → last in one process (no process group); returns the last stage's logits."""
    x = input_ids
    for module in stages:
        x = module(x, attention_mask=attention_mask, position_ids=position_ids)
    return x
