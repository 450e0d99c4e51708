"""dtype spellings: the one parser every entry point uses (``"bfloat16"``, ``"torch.float32"``, a dtype)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TRAINING_DTYPES", "parse_dtype"]

#: the parameter dtypes ``ppzoo train`` offers (``--dtype``)
TRAINING_DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(dtype: Any, *, default: torch.dtype = torch.float32) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``; None gives ``default``.

    Raises:
        ValueError: ``dtype`` names no torch dtype, or one parameters cannot have (an integer or
            boolean dtype); the message shows it and valid spellings.
    """
    if dtype is None:
        return default
    if isinstance(dtype, str):
        found = getattr(torch, dtype.replace("torch.", ""), None)
        dtype = found if isinstance(found, torch.dtype) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. bfloat16, float16 or float32")
    if not dtype.is_floating_point:
        raise ValueError(
            f"dtype {dtype!r} is not a floating-point dtype, which parameters need; use e.g. bfloat16, float16 or float32"
        )
    return dtype
