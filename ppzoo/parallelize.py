"""Parallelism inside a stage: tensor parallel, then FSDP2, on the stage's own sub-mesh.

A stage is parallelized on the meta device, before any weight is read, so each rank then reads
only its own slices of the checkpoint (see :func:`ppzoo.checkpoint.load_stage_weights`).

The default, :func:`parallelize_stage`, applies the adapter's tensor-parallel plan on the ``tp``
dimension (attention and MLP projections column/row-wise; embedding, norms and head replicated),
then ``fully_shard`` on each decoder layer and on the stage root over ``(dp_replicate, dp_shard)``
(HSDP when both are > 1). Gradients are averaged over data-parallel ranks, as FSDP and DDP do
by default; the pipeline scales each rank's loss so that the average is the gradient of the
token mean over the *global* batch (a custom ``parallelize_fn`` must average too).

Between tensor parallel and FSDP2 (torchtitan's order), the decoder layers may be wrapped:
activation checkpointing (:func:`apply_activation_checkpointing`: every layer, or every k-th by
its index in the whole model) and ``torch.compile`` per layer (:func:`compile_layers`). Both
change a layer's forward in place, never its parameters or their FQNs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "FSDP_MIXED_PRECISION",
    "ParallelizeFn",
    "TP_GRAD_ALLREDUCE",
    "apply_activation_checkpointing",
    "compile_layers",
    "parallelize_stage",
    "parse_activation_checkpointing",
    "stage_layers",
    "stage_parallelizer",
    "tensor_parallel_styles",
]

#: a user's replacement for :func:`parallelize_stage`: ``fn(stage_module, stage_mesh)``
ParallelizeFn = Callable[[nn.Module, DeviceMesh], None]

#: stage-module attribute: FQNs of replicated parameters whose gradient is partial per tp rank
#: (per-head q/k norms), summed over tp after each step
TP_GRAD_ALLREDUCE = "ppzoo_tp_grad_allreduce"

#: stage-module attribute, True where FSDP2 casts the parameters for mixed-precision compute
FSDP_MIXED_PRECISION = "ppzoo_fsdp_mixed_precision"

#: ``activation_checkpointing=`` names: every how many decoder layers one is checkpointed
ACTIVATION_CHECKPOINTING = {"full": 1, "selective": 2}


def parse_activation_checkpointing(value: Any) -> int | None:
    """Every how many decoder layers one is checkpointed (1: all of them); None: none.

    Args:
        value: None, ``"full"`` (every layer), ``"selective"`` (every second layer), or an
            integer ``k >= 1`` or its digits (every k-th layer: those whose index in the whole
            model is ``k - 1`` modulo ``k``, so the choice does not depend on the split).

    Raises:
        ValueError: any other value; the message names it.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ACTIVATION_CHECKPOINTING:
        return ACTIVATION_CHECKPOINTING[value.lower()]
    every = int(value) if isinstance(value, str) and value.isdecimal() else value  # NOTE: "3" from a command line
    if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return every
    raise ValueError(
        f"activation_checkpointing={value!r} is not one of None, 'full', 'selective' "
        "or an integer k >= 1 (every k-th decoder layer)"
    )


def stage_layers(module: nn.Module, adapter: Any, config: Any) -> list[tuple[int, nn.Module]]:
    """This stage's own decoder layers with their index in the whole model."""
    layers = module.get_submodule(adapter.fqn_layout(config).layers)
    return [(int(key), layer) for key, layer in layers.items()]


def _checkpointed_forward(*args: Any, forward: Callable, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    # NOTE: non-reentrant, and the RNG state preserved, so that dropout recomputes the same mask.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(layers: list[tuple[int, nn.Module]], every: int) -> list[int]:
    """Recompute the forward of each ``(index, layer)`` whose ``(index + 1) % every == 0`` in backward.

    The layer keeps its parameters and FQNs (no wrapper module): its ``forward`` is replaced by
    one running the original under ``torch.utils.checkpoint`` (non-reentrant). Module hooks (TP,
    FSDP2) still run around it; those of its sub-modules run again in the recomputation.

    Returns:
        The indices of the checkpointed layers.
    """
    done = []
    for index, layer in layers:
        if (index + 1) % every == 0:
            layer.forward = functools.partial(_checkpointed_forward, forward=layer.forward)
            done.append(index)
    return done


def compile_layers(layers: list[tuple[int, nn.Module]]) -> None:
    """``torch.compile`` each decoder layer (``Module.compile``: parameters and FQNs unchanged).

    Layers of one class share compiled code (the parameters are graph inputs), so a stage
    compiles each layer class once per input shape.
    """
    for _, layer in layers:
        layer.compile()


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


def parallelize_stage(
    module: nn.Module,
    mesh: DeviceMesh,
    *,
    adapter: Any,
    config: Any,
    mixed_precision: torch.dtype | None = None,
    activation_checkpointing: int | None = None,
    compile: bool = False,
) -> None:
    """Tensor parallel on ``mesh["tp"]``, layer wrappers, then FSDP2 over ``mesh["dp_replicate", "dp_shard"]``.

    Args:
        module: the stage module, still on the meta device.
        mesh: the stage's sub-mesh ``(dp_replicate, dp_shard, cp, tp)``.
        adapter: the stage's adapter (its ``tp_plan`` and layout).
        config: the model config.
        mixed_precision: the compute dtype under mixed precision (FSDP2 casts parameters to it
            and reduces gradients in float32, see :mod:`ppzoo.precision`); None: no cast.
        activation_checkpointing: checkpoint every k-th decoder layer (1: all); None: none.
        compile: ``torch.compile`` each decoder layer.
    """
    from torch.distributed.fsdp import fully_shard

    from ppzoo.precision import fsdp_policy

    if mesh["tp"].size() > 1:
        _apply_tensor_parallel(module, mesh["tp"], adapter.tp_plan(config))
    layers = stage_layers(module, adapter, config)
    if activation_checkpointing is not None:
        apply_activation_checkpointing(layers, activation_checkpointing)
    if compile:
        compile_layers(layers)
    replicate, shard = mesh["dp_replicate"].size(), mesh["dp_shard"].size()
    if replicate * shard == 1:
        return
    dp_mesh = mesh["dp_replicate", "dp_shard"] if replicate > 1 else mesh["dp_shard"]
    policy = fsdp_policy(mixed_precision)
    for _, layer in layers:
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy)
    setattr(module, FSDP_MIXED_PRECISION, mixed_precision is not None)


def stage_parallelizer(
    mesh: DeviceMesh,
    *,
    adapter: Any,
    config: Any,
    parallelize_fn: ParallelizeFn | None = None,
    mixed_precision: torch.dtype | None = None,
    activation_checkpointing: int | None = None,
    compile: bool = False,
) -> Callable[[nn.Module], None] | None:
    """What :func:`ppzoo.stage.build_stage` applies to each stage on the meta device; None: nothing.

    ppzoo's :func:`parallelize_stage` where the stage mesh has more than one rank or a layer
    wrapper is asked for; with ``parallelize_fn``, the layer wrappers first, then that function.
    """
    if parallelize_fn is not None:

        def custom(module: nn.Module) -> None:
            layers = stage_layers(module, adapter, config)
            if activation_checkpointing is not None:
                apply_activation_checkpointing(layers, activation_checkpointing)
            if compile:
                compile_layers(layers)
            parallelize_fn(module, mesh)

        return custom
    if mesh.size() == 1 and activation_checkpointing is None and not compile:
        return None
    return functools.partial(
        parallelize_stage,
        mesh=mesh,
        adapter=adapter,
        config=config,
        mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing,
        compile=compile,
    )


def local_slice(target: torch.Tensor) -> tuple[slice, ...] | None:
    """The part of the global tensor this rank holds when ``target`` is a DTensor; None otherwise."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))
