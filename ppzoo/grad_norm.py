"""The global gradient norm of a pipeline's model, and clipping by it.

Every rank holds a part of the model's gradients: its pipeline stages, and within a stage its
FSDP2 shards and tensor-parallel slices (DTensors), next to plain tensors that other ranks hold
copies of (the whole stage when it is not sharded, norms and embeddings under tensor parallel,
the tied head that mirrors the embedding). The norm counts each gradient element exactly once:
a rank adds a local tensor only where it is the first of the ranks holding that same tensor (its
coordinate is 0 along every mesh dimension the tensor is replicated over), and skips a tied copy
whose source it counts elsewhere. One all-reduce over the world then gives every rank the norm of
the unsplit model's gradients, which :func:`clip_grad_norm_` uses to scale every local gradient
as ``torch.nn.utils.clip_grad_norm_`` scales the unsplit model's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["clip_grad_norm_", "grad_norm"]

#: the mesh dimensions a stage is parallelized over (``pp`` separates stages, it never replicates)
_STAGE_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


def _norm_type(norm_type: Any) -> float:
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(norm_type, bool) or not (value > 0):  # NOTE: also refuses NaN
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    return value


def _sharded_dims(grad: torch.Tensor) -> set[str]:
    """The mesh dimensions ``grad`` is split over (none for a plain tensor)."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(grad, DTensor):
        return set()
    names = grad.device_mesh.mesh_dim_names
    if names is None:
        raise ValueError(f"a gradient's DTensor mesh has no dimension names ({grad.device_mesh}); ppzoo needs them")
    if any(isinstance(p, Partial) for p in grad.placements):
        raise ValueError(f"a gradient is a partial sum over {names} ({grad.placements}); reduce it first")
    return {name for name, p in zip(names, grad.placements) if p.is_shard()}


def _local(grad: torch.Tensor) -> torch.Tensor:
    # NOTE: without autograd, to_local() is the DTensor's own local tensor: in-place changes land.
    return grad.to_local() if hasattr(grad, "to_local") else grad


def _counted_grads(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *, mesh: Any, skip: set[str]):
    """This rank's local gradients that it alone counts towards the global norm."""
    coordinate = {dim: mesh[dim].get_local_rank() for dim in _STAGE_DIMS}
    for name, param in named_parameters:
        if param.grad is None or name in skip:
            continue
        sharded = _sharded_dims(param.grad)
        if all(coordinate[dim] == 0 for dim in _STAGE_DIMS if dim not in sharded):
            yield _local(param.grad)


@torch.no_grad()
def grad_norm(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    mesh: Any,
    norm_type: float = 2.0,
    skip: Iterable[str] = (),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ``norm_type`` norm of every gradient of the model, the same on every rank (collective).

    Args:
        named_parameters: this rank's parameters under their FQNs, each object once.
        mesh: the 5D mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` of the pipeline.
        norm_type: ``p`` of the p-norm (> 0), or ``inf`` for the largest absolute value.
        skip: FQNs of tied copies whose gradient is counted with their source on another stage.
        device: where the result lives.

    Returns:
        A float32 scalar tensor.

    Raises:
        ValueError: ``norm_type`` is not a positive number or inf.
    """
    p = _norm_type(norm_type)
    grads = list(_counted_grads(named_parameters, mesh=mesh, skip=set(skip)))
    # NOTE: per-tensor norms in float32 (whatever the gradient dtype), then combined as torch does.
    norms = [torch.linalg.vector_norm(g, p, dtype=torch.float32).to(device) for g in grads]
    if math.isinf(p):
        total = torch.stack(norms).max() if norms else torch.zeros((), device=device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return total
    total = torch.stack(norms).pow(p).sum() if norms else torch.zeros((), device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.pow(1.0 / p)


@torch.no_grad()
def clip_grad_norm_(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    max_norm: float,
    *,
    mesh: Any,
    norm_type: float = 2.0,
    skip: Iterable[str] = (),
    error_if_nonfinite: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Scale every gradient by ``max_norm / (total norm + 1e-6)`` when that is below 1 (collective).

    The scale is ``torch.nn.utils.clip_grad_norm_``'s and the same on every rank, so tied copies
    stay equal and sharded gradients stay consistent.

    Args:
        named_parameters: this rank's parameters under their FQNs, each object once.
        max_norm: the largest norm the gradients may have.
        mesh, norm_type, skip, device: as for :func:`grad_norm`.
        error_if_nonfinite: raise when the total norm is nan or inf (on every rank alike).

    Returns:
        The total norm before clipping (a float32 scalar tensor, the same on every rank).

    Raises:
        ValueError: ``max_norm`` is not a non-negative number, or ``norm_type`` is not valid.
        RuntimeError: ``error_if_nonfinite`` and the norm is not finite.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"max_norm must be a non-negative number, got {max_norm!r}")
    named = list(named_parameters)
    total = grad_norm(named, mesh=mesh, norm_type=norm_type, skip=skip, device=device)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is {total.item()}; "
            "pass error_if_nonfinite=False to clip anyway"
        )
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for _, param in named:
        if param.grad is not None:
            local = _local(param.grad)
            local.mul_(coefficient.to(local.device, local.dtype))
    return total
