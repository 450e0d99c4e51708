"""Masks, RoPE tables and default positions a stage's layers share, kept from one microbatch to the next.

Every stage forward gives its layers one mask per layer type and one RoPE table
(:meth:`ppzoo.Adapter.masks`, :meth:`ppzoo.Adapter.position_embeddings`), computed from the
positions and the attention mask, and the positions ``0 … seq − 1`` when the step gave none. The
microbatches of a step usually give the same ones (always without an attention mask and with
default positions), so each stage keeps the last result of each and hands it out again when
computing it again would compute the very same thing, which is when:

- the arguments are the same: the same tensor, unmodified (its version counter unchanged), or on
  the CPU a tensor of the same shape, dtype and values (``torch.equal``; on an accelerator that
  comparison would wait for the device, so only the same tensor counts); the hidden states'
  type, shape, dtype and device;
- the state read is the same: for masks, the config object and the fields the mask functions read
  (``_attn_implementation``, ``is_causal``, ``sliding_window``); for RoPE, the rotary module, its
  buffers (the same tensors, unmodified), its ``attention_scaling`` and the autocast state; and
  for all, inference mode;
- the result is unmodified (the version counters its tensors had) and holds no tensor that
  requires grad (it would join the autograd graphs of two microbatches).

Then the result handed out is the tensor a recomputation would equal bit for bit: the same
functions on the same inputs and state. The state is noted after the computation, since a dynamic
RoPE updates its frequencies while it computes (``dynamic``, ``longrope``), and an update repeats
nothing on a second call with the same positions. Generation (a KV cache), tracing and compiling
always compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _modules

__all__ = ["LayerInputs", "default_positions", "masks", "of", "position_embeddings"]

_ATTRIBUTE = "ppzoo_layer_inputs"


def _held(tensor: torch.Tensor | None) -> tuple | None:
    """What an argument is compared by later: the tensor and its version, and on the CPU a copy."""
    if tensor is None:
        return None
    copy = tensor.detach().clone() if type(tensor) is torch.Tensor and tensor.device.type == "cpu" else None
    return tensor, tensor._version, copy


def _same(held: tuple | None, tensor: torch.Tensor | None) -> bool:
    if held is None or tensor is None:
        return held is tensor
    kept, version, copy = held
    if kept is tensor and tensor._version == version:
        return True
    return (
        copy is not None
        and type(tensor) is torch.Tensor
        and tensor.device == copy.device
        and tensor.dtype == copy.dtype
        and tensor.shape == copy.shape
        and torch.equal(tensor, copy)
    )


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _Kept:
    """One kept result: what it was computed from and what it was."""

    __slots__ = ("objects", "fields", "arguments", "value", "versions")

    def __init__(self, objects: tuple, fields: tuple, arguments: tuple, value: Any):
        self.objects, self.fields, self.value = objects, fields, value
        self.arguments = tuple(_held(a) for a in arguments)
        self.versions = tuple(t._version for t in _tensors(value))

    def matches(self, objects: tuple, fields: tuple, arguments: tuple) -> bool:
        return (
            len(objects) == len(self.objects)
            and all(a is b for a, b in zip(objects, self.objects))
            and fields == self.fields
            and all(_same(h, a) for h, a in zip(self.arguments, arguments, strict=True))
            and tuple(t._version for t in _tensors(self.value)) == self.versions
        )


def _no_state() -> tuple[tuple, tuple]:
    return (), ()


class LayerInputs:
    """The results one stage (its inner model) keeps, one per kind: masks, RoPE, default positions.

    Attributes:
        reuse: hand kept results out again (default); False computes every time, as ppzoo did
            before it kept them (``benchmarks/stage_forward.py`` compares the two).
    """

    def __init__(self) -> None:
        self.reuse = True
        self._kept: dict[str, _Kept] = {}

    def get(
        self,
        kind: str,
        compute: Callable[[], Any],
        *,
        fields: tuple = (),
        arguments: tuple = (),
        state: Callable[[], tuple[tuple, tuple]] = _no_state,
    ) -> Any:
        """``compute()``, or the kept result of the last call of ``kind`` with the same inputs.

        Args:
            kind: what is computed ("masks", "rope", "positions").
            compute: computes the result.
            fields: plain values it depends on (shapes, dtypes, flags), compared with ``==``.
            arguments: tensors (or None) it is computed from, compared as the module docstring says.
            state: the state it reads, ``(objects compared by identity, plain values)``; read
                before looking and again after computing (computing may change it).
        """
        if not self.reuse or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return compute()
        fields = (*fields, torch.is_inference_mode_enabled())
        kept = self._kept.get(kind)
        if kept is not None:
            objects, values = state()
            if kept.matches(objects, (*fields, *values), arguments):
                return kept.value
        value = compute()
        if any(t.requires_grad for t in _tensors(value)):
            self._kept.pop(kind, None)  # NOTE: a graph of its own each microbatch
        else:
            objects, values = state()
            self._kept[kind] = _Kept(objects, (*fields, *values), arguments, value)
        return value


def of(inner: nn.Module) -> LayerInputs:
    """The :class:`LayerInputs` of a stage's inner model (made on first use)."""
    found = inner.__dict__.get(_ATTRIBUTE)
    if found is None:
        found = LayerInputs()
        inner.__dict__[_ATTRIBUTE] = found
    return found


def _hidden_fields(hidden: torch.Tensor) -> tuple:
    return type(hidden), tuple(hidden.shape), hidden.dtype, hidden.device


def _autocast(device_type: str) -> tuple:
    try:
        on = torch.is_autocast_enabled(device_type)
        return on, torch.get_autocast_dtype(device_type) if on else None
    except RuntimeError:  # NOTE: a device type autocast does not know (meta)
        return None, None


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook would see ``module``'s calls (then every call must happen)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _modules._global_forward_hooks
        or _modules._global_forward_pre_hooks
    )


def default_positions(inner: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``0 … seq − 1`` as a ``(1, seq)`` tensor on the hidden states' device (what the model's own forward uses)."""
    length, device = hidden.shape[1], hidden.device
    return of(inner).get("positions", lambda: torch.arange(length, device=device).unsqueeze(0), fields=(length, device))


def masks(
    inner: nn.Module,
    hidden: torch.Tensor,
    attention_mask,
    position_ids,
    needed: Iterable[str],
    compute: Callable[[], dict],
    *,
    functions: tuple = (),
) -> dict:
    """The masks ``compute()`` builds (one per layer type in ``needed``) with the mask ``functions``,
    reused while their inputs stay the same."""
    config = inner.config
    fields = (
        tuple(sorted(needed)),
        *_hidden_fields(hidden),
        getattr(config, "_attn_implementation", None),
        getattr(config, "is_causal", True),
        getattr(config, "sliding_window", None),
    )
    value = of(inner).get(
        "masks",
        compute,
        fields=fields,
        arguments=(attention_mask, position_ids),
        state=lambda: ((config, *functions), ()),
    )
    return dict(value)  # NOTE: a copy each time: a caller may change its own (an override adding a mask)


def position_embeddings(
    inner: nn.Module,
    rotary: nn.Module,
    hidden: torch.Tensor,
    position_ids,
    needed: Iterable[str],
    compute: Callable[[], dict],
) -> dict:
    """The RoPE tables ``compute()`` builds with ``rotary``, reused while their inputs stay the same."""
    if _hooked(rotary):
        return compute()

    def state() -> tuple[tuple, tuple]:
        buffers = tuple(rotary._buffers.values())
        versions = tuple(None if b is None else b._version for b in buffers)
        forward = (type(rotary).forward, rotary.__dict__.get("forward"))
        return (rotary, *forward, *buffers), (versions, repr(getattr(rotary, "attention_scaling", None)))

    fields = (tuple(sorted(needed)), *_hidden_fields(hidden), *_autocast(hidden.device.type))
    value = of(inner).get("rope", compute, fields=fields, arguments=(position_ids,), state=state)
    return dict(value)
