"""Mixed precision: float32 master parameters, bfloat16 compute, float32 gradients and loss.

``pipeline(..., mixed_precision="bf16")`` keeps every parameter (so the optimizer's state) in
float32 and runs the stages' matrix multiplies in bfloat16, in one of two ways:

- **sharded stages** (ppzoo's FSDP2, any ``dp_replicate × dp_shard > 1``): FSDP2's
  ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` all-gathers bfloat16 copies
  of the parameters for compute and reduce-scatters the gradients in float32;
- **other stages** (pipeline or tensor parallel only, or a custom ``parallelize_fn``): the stage's
  forward runs under ``torch.autocast`` (bfloat16), which casts per operation, so norms, softmax
  and the residual stream stay in float32 inside a stage, as in the unsplit model under autocast.

Either way, what crosses a stage boundary (hidden states, and the last stage's logits) is
bfloat16: half the point-to-point bytes, and the same static dtype whichever way a stage computes.
An autocast stage takes its incoming hidden states back to float32. The loss is computed in
float32 from the bfloat16 logits (:func:`ppzoo.loss.causal_lm_loss`), and gradients land in the
float32 parameters' ``.grad``.

float16 is refused: without loss scaling its gradients underflow, and ppzoo does not scale losses.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

__all__ = ["MIXED_PRECISION", "activation_dtype", "apply_autocast", "fsdp_policy", "parse_mixed_precision"]

#: accepted spellings of ``mixed_precision=`` and the compute dtype each names
MIXED_PRECISION = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_mixed_precision(value: Any, *, dtype: torch.dtype) -> torch.dtype | None:
    """The compute dtype ``mixed_precision=value`` asks for (None: compute in ``dtype``).

    Args:
        value: None, ``"bf16"`` / ``"bfloat16"`` or ``torch.bfloat16``.
        dtype: the parameters' storage dtype (``pipeline(dtype=...)``).

    Raises:
        ValueError: an unknown value, float16, or a storage dtype other than float32 (mixed
            precision keeps float32 master parameters); the message names the value.
    """
    if value is None:
        return None
    if value in (torch.float16, "fp16", "float16", "half"):
        raise ValueError(
            f"mixed_precision={value!r} is not supported: float16 gradients need loss scaling, which ppzoo "
            "does not do; use mixed_precision='bf16'"
        )
    if value is torch.bfloat16:
        compute = value
    elif isinstance(value, str) and value.lower() in MIXED_PRECISION:
        compute = MIXED_PRECISION[value.lower()]
    else:
        raise ValueError(f"mixed_precision={value!r} is not one of None, 'bf16'")
    if dtype != torch.float32:
        raise ValueError(
            f"mixed_precision={value!r} keeps float32 master parameters, but dtype={dtype}; "
            "leave dtype at float32 (the parameters' storage), or drop mixed_precision to train in that dtype"
        )
    return compute


def activation_dtype(*, dtype: torch.dtype, compute: torch.dtype | None) -> torch.dtype:
    """The dtype of what crosses a stage boundary: the compute dtype under mixed precision."""
    return compute if compute is not None else dtype


def fsdp_policy(compute: torch.dtype | None) -> Any:
    """FSDP2's policy for ``compute``: parameters cast for compute, gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, output_dtype=compute)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def _autocast_forward(module: nn.Module, x, *args, forward, compute: torch.dtype, param_dtype: torch.dtype, **kwargs):
    # NOTE: the incoming hidden states (bfloat16 on the wire) go back to the parameters' dtype, so
    # the residual stream inside the stage is float32 as in the unsplit model under autocast.
    device_type = x.device.type
    with torch.autocast(device_type, dtype=compute):
        out = forward(_cast(x, param_dtype), *args, **kwargs)
    return _cast(out, compute)


def apply_autocast(module: nn.Module, compute: torch.dtype, *, param_dtype: torch.dtype = torch.float32) -> None:
    """Run ``module``'s forward under ``torch.autocast(compute)``; its floating output in ``compute``.

    For stages whose parameters FSDP2 does not cast (see :func:`fsdp_policy`). The module keeps
    its parameters, their FQNs and dtype; only its (already patched) forward is wrapped.
    """
    forward = module.forward
    module.forward = types.MethodType(
        functools.partial(_autocast_forward, forward=forward, compute=compute, param_dtype=param_dtype), module
    )
