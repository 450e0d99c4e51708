"""Parallelism inside a stage: tensor parallel, then FSDP2, on the stage's own sub-mesh.

A stage is parallelized on the meta device, before any weight is read, so each rank then reads
only its own slices of the checkpoint (see :func:`ppzoo.checkpoint.load_stage_weights`).

The default, :func:`parallelize_stage`, applies the adapter's tensor-parallel plan on the ``tp``
dimension (attention and MLP projections column/row-wise; embedding, norms and head replicated),
then ``fully_shard`` on each decoder layer and on the stage root over ``(dp_replicate, dp_shard)``
(HSDP when both are > 1). Gradients are averaged over data-parallel ranks, as FSDP and DDP do
by default; the pipeline scales each rank's loss so that the average is the gradient of the
token mean over the *global* batch (a custom ``parallelize_fn`` must average too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["ParallelizeFn", "parallelize_stage", "tensor_parallel_styles", "TP_GRAD_ALLREDUCE"]

#: a user's replacement for :func:`parallelize_stage`: ``fn(stage_module, stage_mesh)``
ParallelizeFn = Callable[[nn.Module, DeviceMesh], None]

#: stage-module attribute: FQNs of replicated parameters whose gradient is partial per tp rank
#: (per-head q/k norms), summed over tp after each step
TP_GRAD_ALLREDUCE = "ppzoo_tp_grad_allreduce"


def tensor_parallel_styles(plan: dict[str, str]) -> dict[str, Any]:
    """torch ``ParallelStyle`` objects for a Hugging Face style TP plan (``"colwise"``, ``"rowwise"``).

    Raises:
        ValueError: a style ppzoo cannot apply exactly.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles: dict[str, Any] = {}
    for pattern, style in plan.items():
        if style == "colwise":
            styles[pattern] = ColwiseParallel()
        elif style == "rowwise":
            styles[pattern] = RowwiseParallel()
        elif style == "replicated_with_grad_allreduce":
            styles[pattern] = TP_GRAD_ALLREDUCE
        elif style == "embedding_rowwise":
            # NOTE: the default keeps embeddings replicated, which is exact; transformers plans
            # name a vocab-sharded one for some models (and, in 5.17, for every tied model).
            continue
        else:
            raise ValueError(
                f"tensor-parallel style {style!r} for {pattern!r} is not supported by ppzoo's default "
                "parallelize; pass parallelize_fn=... to apply your own"
            )
    return styles


def _apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str]) -> None:
    import fnmatch

    from torch.distributed.tensor.parallel import parallelize_module

    styles = tensor_parallel_styles(plan)
    parallel = {k: v for k, v in styles.items() if v != TP_GRAD_ALLREDUCE}
    names = [name for name, _ in module.named_modules()]
    # NOTE: only patterns that match in this stage; a stage holds a subset of the layers.
    parallel = {k: v for k, v in parallel.items() if any(fnmatch.fnmatchcase(n, k) for n in names)}
    if parallel:
        parallelize_module(module, tp_mesh, parallel)
    partial = {
        f"{name}.{pname}"
        for pattern, style in styles.items()
        if style == TP_GRAD_ALLREDUCE
        for name, sub in module.named_modules()
        if fnmatch.fnmatchcase(name, pattern)
        for pname, _ in sub.named_parameters()
    }
    setattr(module, TP_GRAD_ALLREDUCE, sorted(partial))


def parallelize_stage(module: nn.Module, mesh: DeviceMesh, *, adapter: Any, config: Any) -> None:
    """Tensor parallel on ``mesh["tp"]``, then FSDP2 over ``mesh["dp_replicate", "dp_shard"]``.

    Args:
        module: the stage module, still on the meta device.
        mesh: the stage's sub-mesh ``(dp_replicate, dp_shard, cp, tp)``.
        adapter: the stage's adapter (its ``tp_plan`` and layout).
        config: the model config.
    """
    from torch.distributed.fsdp import fully_shard

    if mesh["tp"].size() > 1:
        _apply_tensor_parallel(module, mesh["tp"], adapter.tp_plan(config))
    replicate, shard = mesh["dp_replicate"].size(), mesh["dp_shard"].size()
    if replicate * shard == 1:
        return
    dp_mesh = mesh["dp_replicate", "dp_shard"] if replicate > 1 else mesh["dp_shard"]
    layers = module.get_submodule(adapter.fqn_layout(config).layers)
    for layer in layers.values():
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=False)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=False)


def local_slice(target: torch.Tensor) -> tuple[slice, ...] | None:
    """The part of the global tensor this rank holds when ``target`` is a DTensor; None otherwise."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))
