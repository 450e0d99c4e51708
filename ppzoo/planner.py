"""Plan: layout → stages → ranks, from a config alone (no weights are read).

The plan decides how many stages there are (``pp`` × stages per rank, or from
``layers_per_stage``), which modules each stage holds, and which rank holds each stage:
loop placement (stage ``s`` on rank ``s % pp``) or V placement (rank ``r`` holds stages ``r`` and
``2·pp − 1 − r``). The default split balances estimated compute, counting the embedding and the LM
head, so a large-vocabulary head does not leave the last stage the slowest: the first stage may
hold only the embedding and the last only the final norm and head, and among the splits the one
whose step, simulated with the schedule's own order (:mod:`ppzoo.simulate`), is shortest wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ppzoo import registry
from ppzoo.config import load_config
from ppzoo.cost import module_costs
from ppzoo.dtypes import parse_dtype
from ppzoo.layout import Layout
from ppzoo.meta import meta_model
from ppzoo.schedule import schedule_kind
from ppzoo.split import balanced_bounds, stages_from_modules

__all__ = ["Plan", "StagePlan", "plan"]


@dataclass(frozen=True)
class StagePlan:
    index: int
    rank: int
    modules: tuple[str, ...]
    layers: tuple[int, ...]
    params: int
    bytes: int
    cost: float

    @property
    def is_first(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class Plan:
    model_type: str
    adapter: str
    pp: int
    schedule: str
    placement: str  # "loop" or "v"
    layout: Layout
    stages: tuple[StagePlan, ...]
    total_params: int
    dtype: str

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stages_per_rank(self) -> int:
        return len(self.stages) // self.pp

    def stages_for_rank(self, rank: int) -> list[StagePlan]:
        return [s for s in self.stages if s.rank == rank]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "adapter": self.adapter,
            "pp": self.pp,
            "schedule": self.schedule,
            "placement": self.placement,
            "dtype": self.dtype,
            "total_params": self.total_params,
            "stages": [
                {k: v for k, v in asdict(s).items() if k in ("index", "rank", "modules", "params", "bytes")}
                | {"modules": list(s.modules)}
                for s in self.stages
            ],
        }



def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



def plan(
    config_or_path: Any,
    *,
    pp: int,
    schedule: str = "1F1B",
    stages_per_rank: int | None = None,
    layers_per_stage: int | None = None,
    stage_modules: Sequence[Sequence[str]] | None = None,
    dtype: Any = None,
    seq_len: int = 2048,
    microbatches: int | None = None,
    validate: bool = True,
) -> Plan:
    """Split a model into pipeline stages and place them on ranks.

    Args:
        config_or_path: a transformers config, a directory with ``config.json``, or a hub id.
        pp: pipeline-parallel degree (ranks along the pipeline).
        schedule: a torch schedule name (case-insensitive) or a ``.csv`` schedule file.
        stages_per_rank: stages each rank holds; default 1 for GPipe/1F1B, 2 otherwise.
        layers_per_stage: fixed layers per stage instead of the cost-balanced split.
        stage_modules: an explicit split: one list of module FQNs per stage, in forward order.
        dtype: parameter dtype for ``bytes``; default the config's dtype, else float32.
        seq_len: sequence length the cost model assumes for attention.
        microbatches: microbatches per step, for the simulated step the split is chosen by
            (default: the number of stages, as :func:`ppzoo.pipeline`).
        validate: run the adapter's and plugins' validation rules on the result.

    Returns:
        The :class:`Plan`.

    Raises:
        ValueError: impossible degrees or splits; the message names the numbers.
        ppzoo.registry.ValidationError: the adapter rejects the config.
    """
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp must be an integer >= 1, got {pp!r}")
    for arg, value in (
        ("stages_per_rank", stages_per_rank), ("layers_per_stage", layers_per_stage), ("microbatches", microbatches)
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
    if stage_modules is not None and layers_per_stage is not None:
        raise ValueError("pass either stage_modules or layers_per_stage, not both")
    name, kind = schedule_kind(schedule)
    config = load_config(config_or_path)
    adapter = registry.adapter_for(config)
    if validate:
        # NOTE: config rules first: nothing is built from a config the adapter refuses (a
        # vision-language config, say, has no layout to cost). The plan's own rules run at the end.
        registry.validate(config, None, adapter=adapter)
    layout = adapter.fqn_layout(config)
    n_layers = layout.num_layers

    if stage_modules is not None:
        split = stages_from_modules(layout, stage_modules)
        num_stages = len(split)
    elif layers_per_stage is not None:
        num_stages = -(-n_layers // layers_per_stage)
        split = None
    else:
        if stages_per_rank is None:
            stages_per_rank = 1 if kind == "single" else 2
        num_stages = pp * stages_per_rank
        split = None

    if num_stages % pp:
        raise ValueError(
            f"{num_stages} stages cannot be spread evenly over pp={pp} ranks; "
            f"choose a stage count divisible by {pp}"
        )
    per_rank = num_stages // pp
    if stages_per_rank is not None and per_rank != stages_per_rank:
        raise ValueError(f"stages_per_rank={stages_per_rank} but the split has {per_rank} stages per rank")
    if num_stages > n_layers:
        raise ValueError(
            f"{num_stages} stages (pp={pp} × {per_rank} per rank) is more than the model's {n_layers} layers; "
            "lower pp or stages per rank"
        )
    if kind == "single" and per_rank != 1:
        raise ValueError(f"schedule {name} runs one stage per rank, but the plan puts {per_rank} on each")
    if kind == "v" and per_rank != 2:
        raise ValueError(f"schedule {name} needs V placement with exactly two stages per rank, got {per_rank}")
    placement = "v" if kind == "v" else "loop"

    pdtype = parse_dtype(dtype if dtype is not None else getattr(config, "dtype", None))
    model = meta_model(config, dtype=pdtype)
    costs = module_costs(config, adapter, model, layout, seq_len)
    if split is None:
        units = [list(layout.inputs)] + [[layout.layer(i)] for i in range(n_layers)] + [list(layout.outputs)]
        if layers_per_stage is not None:
            # NOTE: unit 0 is the inputs, so the cut after layer i - 1 is unit bound i + 1
            cuts = [1 + s * layers_per_stage for s in range(1, num_stages)]
            bounds = [0, *cuts, len(units)]
        else:
            bounds = balanced_bounds(
                [sum(costs[m] for m in unit) for unit in units], num_stages,
                schedule=name, pp=pp, microbatches=num_stages if microbatches is None else microbatches,
            )
        split = [[m for unit in units[a:b] for m in unit] for a, b in zip(bounds, bounds[1:])]

    # NOTE: parameters() already counts a shared tensor once; a tie the meta model did not make
    # (the copy is a separate tensor) is subtracted here, as num_parameters() counts it once too.
    untied_copies = [
        model.get_parameter(copy)
        for copy, source in adapter.tied_weights(config).items()
        if model.get_parameter(copy) is not model.get_parameter(source)
    ]
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in untied_copies)
    element = pdtype.itemsize
    stages = []
    for s, mods in enumerate(split):
        rank = s % pp if placement == "loop" else (s if s < pp else 2 * pp - 1 - s)
        params = sum(_numel(model.get_submodule(m)) for m in mods)
        layers = tuple(int(m.rsplit(".", 1)[1]) for m in mods if m.startswith(layout.layers + "."))
        stages.append(StagePlan(s, rank, tuple(mods), layers, params, params * element, sum(costs[m] for m in mods)))
    result = Plan(
        model_type=config.model_type,
        adapter=adapter.name,
        pp=pp,
        schedule=name,
        placement=placement,
        layout=layout,
        stages=tuple(stages),
        total_params=total,
        dtype=str(pdtype).replace("torch.", ""),
    )
    if validate:
        registry.validate(config, result, adapter=adapter)
    return result
