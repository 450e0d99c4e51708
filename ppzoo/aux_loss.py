"""Auxiliary losses a stage adds to the LM loss (MoE router load balancing), per microbatch.

Only hidden states cross stage boundaries, so each stage adds its own term: a forward hook on the
stage module asks the adapter for ``aux_loss`` over this stage's layers for this microbatch,
divides it by the microbatch count, and ties it to the stage output with an identity whose
backward also sends a gradient of one into the term. The detached terms are summed for reporting.

For mixtures of experts the term is the family's own router aux loss over the router logits the
stage recorded during this forward, weighted by the stage's share of the model's routers
(``ppzoo.architectures.moe``), for dedicated adapters and the native one alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["AuxLoss"]


class AuxLoss:
    """Attach the adapter's auxiliary loss to each stage module's output during training.

    Args:
        adapter: the model's adapter (its ``aux_loss``).
        config: the model config.
        modules: this rank's stage modules.
        microbatches: microbatches per step (each term is averaged over them).
        device: where the running total lives.
    """

    def __init__(self, adapter: Any, config: Any, modules: list[nn.Module], *, microbatches: int, device: torch.device):
        self.adapter = adapter
        self.config = config
        self.microbatches = microbatches
        #: the detached sum of this rank's terms since :meth:`reset`
        self.total = torch.zeros((), dtype=torch.float32, device=device)
        for module in modules:
            module.register_forward_hook(self._attach, with_kwargs=True)

    def reset(self) -> None:
        self.total.zero_()

    def _attach(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        if not torch.is_grad_enabled():
            return output
        aux = self.adapter.aux_loss(self.config, [module], kwargs.get("attention_mask"))
        if aux is None:
            return output
        aux = aux / self.microbatches
        self.total += aux.detach().float()
        return _AttachAuxLoss.apply(output, aux)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends a gradient of one into ``aux``."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        # NOTE: a copy, not a view: zero-bubble schedules detach stage outputs in place.
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_output, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)
