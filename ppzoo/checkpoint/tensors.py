"""The tensors of a module that a checkpoint holds: its parameters and persistent buffers."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["persistent_tensors"]


def persistent_tensors(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(fqn, owner, attribute, tensor) for every parameter and persistent buffer, ties included.

    NOTE: a tensor held under two names (a head tied to the embedding on one stage) is yielded
    under each, so loading can fill it once and saving can leave the tied name out.
    """
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for name, param in owner._parameters.items():
            if param is not None:
                yield (f"{prefix}.{name}" if prefix else name), owner, name, param
        for name, buf in owner._buffers.items():
            if buf is not None and name not in owner._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), owner, name, buf
