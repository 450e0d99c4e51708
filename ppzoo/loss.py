"""The causal-LM loss, computed exactly as Hugging Face computes it, in pieces that add up.

Hugging Face shifts labels left by one (padding the end with ``-100``), ignores ``-100`` and takes
the mean over the valid tokens of the batch. Microbatches must not average their own means: each
returns its summed loss divided by the valid-token count of the *whole* batch, so the sum over
microbatches is the batch loss and the gradients match the unsplit model's.

A pipeline step's loss is known on the last stage's rank; :class:`PendingLoss` is how every rank
gets it without waiting for it at the end of the step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

__all__ = ["IGNORE_INDEX", "PendingLoss", "causal_lm_loss", "count_label_tokens", "shift_labels"]

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: position t predicts ``labels[t + 1]``; the last is ignored."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss (after the shift)."""
    return int((shift_labels(labels) != IGNORE_INDEX).sum())


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Summed token cross-entropy divided by ``num_tokens`` (default: this batch's valid tokens)."""
    targets = shift_labels(labels).reshape(-1).to(logits.device)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_tokens is None:
        num_tokens = (targets != IGNORE_INDEX).sum()
    return loss / num_tokens


class PendingLoss(torch.Tensor):
    """A step's loss, a float32 scalar, while the all-reduce that brings it to this rank may still run.

    It is a tensor like any other: the first operation on it (``.item()``, ``float()``, printing,
    arithmetic, ``torch.allclose`` ...) waits for the reduction and from then on it holds
    ``parts[0] + parts[1] / dp_size``, the value a blocking reduction would have given, bit for bit.
    So a rank can leave the step (and start its optimizer step) while another still runs its last
    backward, and pays the wait only where the loss is read.

    Args:
        parts: the tensor being reduced: ``[loss, auxiliary loss]``.
        work: the reduction's handle (``all_reduce(..., async_op=True)``).
        dp_size: the data-parallel degree the auxiliary terms are averaged over.
    """

    @staticmethod
    def __new__(cls, parts: torch.Tensor, work: Any, *, dp_size: int = 1) -> PendingLoss:
        self = torch.Tensor._make_subclass(cls, torch.zeros((), dtype=parts.dtype, device=parts.device))
        self._parts, self._work, self._dp_size = parts, work, dp_size
        return self

    def settle(self) -> None:
        """Wait for the reduction (once) and fill in the value."""
        work, self._work = self.__dict__.get("_work"), None
        if work is None:
            return
        work.wait()
        with torch._C.DisableTorchFunctionSubclass():
            self.copy_(self._parts[0] + self._parts[1] / self._dp_size)
        self._parts = None

    def plain(self) -> torch.Tensor:
        """The settled value as a plain tensor (what copies and pickles of a pending loss are)."""
        self.settle()
        with torch._C.DisableTorchFunctionSubclass():
            return self.detach().clone()

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.plain()

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.plain().__reduce_ex__(protocol)

    def __repr__(self, **kwargs: Any) -> str:
        return repr(self.plain())

    def __format__(self, format_spec: str) -> str:
        # NOTE: torch formats only plain scalar tensors as numbers (f"{loss:.4f}")
        self.settle()
        return self.item().__format__(format_spec)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA:  # NOTE: shape, dtype, device ... are known before the value
            for value in pytree.tree_leaves((args, kwargs)):
                if isinstance(value, PendingLoss):
                    value.settle()
        # NOTE: results are plain tensors: only the step's own return value is ever pending
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


#: tensor attributes a pending loss answers without waiting for its value
_METADATA = frozenset(
    {
        *(getattr(torch.Tensor, name).__get__ for name in ("shape", "dtype", "device", "ndim", "requires_grad")),
        torch.Tensor.dim,
        torch.Tensor.size,
        torch.Tensor.numel,
    }
)
