"""Tied parameters across pipeline stages: tie groups over any set of stages and ranks.

A tie group is a source parameter and its tied copies (``{copy: source}``, as
:meth:`ppzoo.Adapter.tied_weights` gives): an LM head tied to the embedding (the first and the
last stage), or a block several layers share (Zamba's shared transformer, the source in the first
layer that uses it, a copy in every later one, wherever those layers are). Each stage holding a
member keeps a copy, loaded from the source's checkpoint keys. On one rank the members are one
parameter, as in the unsplit model (V placement puts the embedding and the head on rank 0; loop
placement may put two layers of a shared block there); across ranks, after every backward, the
copies' gradients are summed over the ranks that hold the group, so every holder applies the same
update and the copies stay identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TieGroup", "TiedWeights", "tie_groups"]


class TieGroup:
    """One source parameter, its copies, and the stages that hold them.

    Attributes:
        source: the source FQN.
        members: the source and its copies, in that order.
        stages: ``{fqn: stage index}`` for the members some stage holds.
    """

    def __init__(self, source: str, copies: Sequence[str], stages: dict[str, int]):
        self.source = source
        self.members = (source, *copies)
        self.stages = stages

    def ranks(self, stage_ranks: dict[int, int]) -> tuple[int, ...]:
        """The pipeline ranks holding a member, ascending."""
        return tuple(sorted({stage_ranks[s] for s in self.stages.values()}))


def tie_groups(tied: dict[str, str], stage_modules: Sequence[Sequence[str]]) -> list[TieGroup]:
    """``tied`` as tie groups, sorted by source, each member placed on the stage whose modules hold it.

    Args:
        tied: ``{copy: source}``.
        stage_modules: per stage index, the FQNs of the modules it holds (a plan's ``stage.modules``:
            input and output modules, layers such as ``model.layers.3``).
    """

    def stage_of(fqn: str) -> int | None:
        return next(
            (i for i, modules in enumerate(stage_modules) for m in modules if fqn == m or fqn.startswith(m + ".")),
            None,
        )

    copies: dict[str, list[str]] = {}
    for copy_, source in tied.items():
        copies.setdefault(source, []).append(copy_)
    groups = []
    for source in sorted(copies):
        members = (source, *sorted(copies[source]))
        placed = {fqn: s for fqn in members if (s := stage_of(fqn)) is not None}
        groups.append(TieGroup(source, sorted(copies[source]), placed))
    return groups


class TiedWeights:
    """The tied parameters of this rank's stages and how their gradients are kept in step.

    Args:
        tied: ``{copy_fqn: source_fqn}``, as :meth:`ppzoo.Adapter.tied_weights` gives.
        modules: this rank's stage modules by stage index.
        stages: the plan's stages (each with ``index``, ``rank``, ``modules``).
        pp_rank: this rank's position along the pipeline.
        mesh: the 5D device mesh (one group per pipeline line is made from it).

    Raises:
        ValueError: two members of a group on one rank are sharded (FSDP, TP) in two stages,
            which cannot hold one parameter.

    NOTE: building it is collective over the world when a group spans two or more ranks (every
    rank creates every pipeline line's group for every set of holding ranks, in one order, as
    ``new_group`` requires).
    """

    def __init__(
        self,
        tied: dict[str, str],
        *,
        modules: dict[int, nn.Module],
        stages: Sequence[Any],
        pp_rank: int,
        mesh: Any,
    ):
        self.tied = dict(tied)
        self._modules = modules
        #: (process group, this rank's parameter) per group this rank shares with other ranks
        self._synced: list[tuple[Any, nn.Parameter]] = []
        if not self.tied or len(stages) == 1:
            return
        ranks = {s.index: s.rank for s in stages}
        groups = tie_groups(self.tied, [s.modules for s in stages])
        made: dict[tuple[int, ...], Any] = {}
        pp_lines = None
        for group in groups:
            held = [(fqn, s) for fqn, s in group.stages.items() if ranks[s] == pp_rank and s in modules]
            param = _tie_on_rank(group, held, modules) if held else None
            holders = group.ranks(ranks)
            if len(holders) < 2:
                continue
            if holders not in made:
                if pp_lines is None:
                    pp_lines = mesh.mesh.reshape(mesh["pp"].size(), -1).T.tolist()  # one per (dp, cp, tp)
                made[holders] = None
                for line in pp_lines:
                    pg = dist.new_group([line[r] for r in holders])
                    if dist.get_rank() in (line[r] for r in holders):
                        made[holders] = pg
            if param is not None:
                self._synced.append((made[holders], param))

    def sync_grads(self) -> None:
        """Sum each group's gradients over the ranks that hold it (no-op on ranks that hold none).

        NOTE: one all-reduce per set of holding ranks and dtype, of the group gradients flattened
        together (a shared block has a dozen parameters); every holder does them in one order.
        """
        buckets: dict[tuple[int, torch.dtype], tuple[Any, list[torch.Tensor]]] = {}
        for pg, param in self._synced:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            buckets.setdefault((id(pg), grad.dtype), (pg, []))[1].append(grad)
        for pg, grads in buckets.values():
            if len(grads) == 1:
                dist.all_reduce(grads[0], group=pg)
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=pg)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def _tie_on_rank(group: TieGroup, held: list[tuple[str, int]], modules: dict[int, nn.Module]) -> nn.Parameter:
    """Make the members this rank holds one parameter (the source's where it is here); return it."""
    held = sorted(held, key=lambda item: (item[0] != group.source, item[1]))
    fqn, s = held[0]
    keep = modules[s].get_parameter(fqn)
    for fqn, s in held[1:]:
        module = modules[s]
        if module.get_parameter(fqn) is keep:
            continue
        if hasattr(keep, "to_local"):
            raise ValueError(
                f"{fqn!r} (stage {s}) is tied to {held[0][0]!r} (stage {held[0][1]}) on the same rank, and sharded "
                "parameters (FSDP, TP) cannot be one parameter in two stages; choose a split or schedule that puts "
                "them on different ranks, or train without dp/tp"
            )
        owner, _, name = fqn.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, name, keep)
    return keep
