"""dtype spellings: the one parser every entry point uses (``"bfloat16"``, ``"torch.float32"``, a dtype)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["parse_dtype"]


def parse_dtype(dtype: Any, *, default: torch.dtype = torch.float32) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``; None gives ``default``.

    Raises:
        ValueError: ``dtype`` names no torch dtype (the message shows it and valid spellings).
    """
    if dtype is None:
        return default
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. bfloat16, float16 or float32")
    return dtype
