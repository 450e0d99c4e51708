"""Non-persistent buffers as the model's own constructor computes them.

A stage is built on the meta device, so buffers that are not in the checkpoint (RoPE ``inv_freq``,
Falcon-H1's ``mup_vector``, embedding scales) must be computed again. ``_init_weights`` knows
some of them, not all; the constructor knows every one. :func:`reference_buffers` runs the
constructor once per config and dtype with every *parameter* sent to the meta device as it is
registered (no memory, no initialisation) and keeps the buffers it computed on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["reference_buffers"]

#: buffers by (config JSON, dtype): every stage of a model asks for the same ones
_CACHE: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}
_CACHE_SIZE = 8


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def reference_buffers(config: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of ``config``'s CausalLM by FQN, as its constructor computes them."""
    try:
        key = (type(config).__name__ + config.to_json_string(use_diff=False), dtype)
    except Exception:  # noqa: BLE001 - an unserialisable config is built each time
        return _build(config, dtype)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _build(config, dtype)
    return _CACHE[key]


def _build(config: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from ppzoo.meta import model_class

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _parameters_on_meta(), no_init_weights():
            model = model_class(config).from_config(copy.deepcopy(config), dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return {
        f"{name}.{buffer}" if name else buffer: module._buffers[buffer]
        for name, module in model.named_modules()
        for buffer in module._non_persistent_buffers_set
        if module._buffers.get(buffer) is not None
    }
