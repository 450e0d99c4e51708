"""Tied parameters across pipeline stages (an LM head tied to the embedding).

With the embedding on the first stage and the head on the last, each of the two ranks keeps its
own copy; after every backward the copies' gradients are summed over the two ranks, so both apply
the same update and stay identical. Where one rank holds both ends (V placement), the copy *is* the
source parameter, as in the unsplit model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TiedWeights"]


class TiedWeights:
    """The tied parameters of this rank's stages and how their gradients are kept in step.

    Args:
        tied: ``{copy_fqn: source_fqn}``, as :meth:`ppzoo.Adapter.tied_weights` gives.
        modules: this rank's stage modules by stage index.
        num_stages: the plan's stage count.
        first_rank, last_rank: the pp ranks that hold the first and the last stage.
        pp_rank: this rank's position along the pipeline.
        mesh: the 5D device mesh (one group per pipeline line is made from it).

    NOTE: building it is collective over the world when the ends are on two ranks (every rank
    creates every pipeline line's group, as ``new_group`` requires).
    """

    def __init__(
        self,
        tied: dict[str, str],
        *,
        modules: dict[int, nn.Module],
        num_stages: int,
        first_rank: int,
        last_rank: int,
        pp_rank: int,
        mesh: Any,
    ):
        self.tied = dict(tied)
        self._modules = modules
        self._last = num_stages - 1
        self._group: Any = None
        if not self.tied or num_stages == 1:
            return
        if first_rank == last_rank:
            if pp_rank == first_rank:
                head, body = modules[self._last], modules[0]
                for copy, source in self.tied.items():
                    owner, _, name = copy.rpartition(".")
                    setattr(head.get_submodule(owner) if owner else head, name, body.get_parameter(source))
            return
        pp_lines = mesh.mesh.reshape(mesh["pp"].size(), -1).T  # one row per (dp, cp, tp) position
        for line in pp_lines.tolist():
            group = dist.new_group([line[first_rank], line[last_rank]])
            if dist.get_rank() in (line[first_rank], line[last_rank]):
                self._group = group

    def sync_grads(self) -> None:
        """Sum the tied copies' gradients over the two ranks that hold them (no-op elsewhere)."""
        if self._group is None:
            return
        holds_first = 0 in self._modules
        for copy, source in self.tied.items():
            module = self._modules[0] if holds_first else self._modules[self._last]
            param = module.get_parameter(source if holds_first else copy)
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            dist.all_reduce(grad, group=self._group)
