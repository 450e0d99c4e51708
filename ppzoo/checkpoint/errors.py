"""The one error every checkpoint operation raises for a checkpoint it cannot read or write."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing a tensor or a file, holds a tensor of the wrong shape, or cannot be written."""
