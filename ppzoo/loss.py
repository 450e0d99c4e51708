"""The causal-LM loss, computed exactly as Hugging Face computes it, in pieces that add up.

Hugging Face shifts labels left by one (padding the end with ``-100``), ignores ``-100`` and takes
the mean over the valid tokens of the batch. Microbatches must not average their own means: each
returns its summed loss divided by the valid-token count of the *whole* batch, so the sum over
microbatches is the batch loss and the gradients match the unsplit model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "count_label_tokens", "shift_labels"]

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
