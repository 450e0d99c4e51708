"""The whole causal LM on the meta device: structure and shapes, no memory, no initialisation."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

__all__ = ["meta_model"]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def meta_model(config: Any, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """The whole causal LM on the meta device: structure and shapes, no memory, no init."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    # NOTE: from_config prefers config.dtype to the default dtype, and writes the dtype it uses
    # back into the config it is given: pass the dtype explicitly, on a copy of the config.
    with torch.device("meta"), no_init_weights(), _default_dtype(dtype):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, **kwargs)
