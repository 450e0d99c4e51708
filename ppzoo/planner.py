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

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ppzoo import registry
from ppzoo.config import load_config
from ppzoo.cost import module_costs
from ppzoo.dtypes import parse_dtype
from ppzoo.layout import Layout
from ppzoo.meta import meta_model
from ppzoo.schedule import schedule_kind
from ppzoo.split import balanced_bounds, stages_from_modules
from ppzoo.validation import Settings

__all__ = ["Plan", "StagePlan", "placement_for", "plan", "skipped_weights", "stage_rank"]


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
    #: what the plan leaves out of the checkpoint, for people (multi-token prediction layers)
    notes: tuple[str, ...] = ()
    #: what the stages' ``cost`` is: ``"flops"`` (forward FLOPs per token) or ``"measured"``
    #: (seconds of a microbatch's forward, a third of its forward + backward; :mod:`ppzoo.calibration`)
    cost_model: str = "flops"

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
            "notes": list(self.notes),
            "stages": [
                {k: v for k, v in asdict(s).items() if k in ("index", "rank", "modules", "params", "bytes")}
                | {"modules": list(s.modules)}
                for s in self.stages
            ],
        }


def skipped_weights(cfg: Any, model: torch.nn.Module, num_layers: int) -> tuple[str, ...]:
    """A note on the multi-token prediction (MTP) weights a checkpoint may hold beside the model.

    DeepSeek-V3, GLM-4.5 and others ship ``num_nextn_predict_layers`` extra layers after the last
    one (``model.layers.61`` of DeepSeek-V3), Qwen3-Next an ``mtp.*`` block; the causal LM never
    calls them, and ``from_pretrained`` skips their keys (the class's
    ``_keys_to_ignore_on_load_unexpected``). The plan leaves them out too, and says so.
    """
    count = getattr(cfg, "num_nextn_predict_layers", 0) or 0
    patterns = [str(p) for p in getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or ()]
    layer_of = [re.search(r"layers\\?\.(\d+)", p) for p in patterns]
    mtp = [
        p
        for p, m in zip(patterns, layer_of)
        if "mtp" in p or (m and num_layers <= int(m[1]) < num_layers + max(count, 1))
    ]
    if not count and not mtp:
        return ()
    held = (
        f"{count} multi-token prediction layer{'s' if count != 1 else ''}"
        if count
        else "multi-token prediction weights"
    )
    keys = f" (checkpoint keys matching {', '.join(mtp)})" if mtp else ""
    return (
        f"the checkpoint may hold {held}{keys}, which {type(model).__name__} never calls: "
        "skipped (not planned, not read), as from_pretrained skips them",
    )


def _measured_type() -> type:
    from ppzoo.calibration import MeasuredCosts

    return MeasuredCosts


def _measured_costs(
    config: Any, adapter: Any, model: torch.nn.Module, layout: Layout, cost: Any, *, seq_len: int, dtype: torch.dtype
) -> tuple[dict[str, float], dict[str, float]]:
    """Per module: its measured cost a microbatch, and its optimizer step's once a step (seconds)."""
    from ppzoo.calibration import measure_costs

    measured = (
        measure_costs(config, adapter, model, layout, seq_len=seq_len, dtype=dtype) if cost == "measured" else cost
    )
    missing = [m for m in layout.modules if m not in measured.forward or m not in measured.backward]
    if missing:
        raise ValueError(f"the measured costs name no time for {missing[:3]} (measured for another model?)")
    costs = {m: measured.unit_cost(m) for m in layout.modules}
    step_costs = {m: measured.optimizer_per_param * _numel(model.get_submodule(m)) for m in layout.modules}
    return costs, step_costs


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def placement_for(schedule: str) -> str:
    """``"v"`` for the V schedules (ZBVZeroBubble, DualPipeV), else ``"loop"``."""
    return "v" if schedule_kind(schedule)[1] == "v" else "loop"


def stage_rank(index: int, *, num_stages: int, pp: int, placement: str) -> int:
    """The pipeline rank that holds stage ``index``: ``index % pp`` in a loop, or down and back up in a V."""
    if placement == "v":
        return index if index < pp else 2 * pp - 1 - index
    return index % pp


def _check_count(arg: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")


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
    dp_replicate: int | None = None,
    dp_shard: int | None = None,
    cp: int | None = None,
    tp: int | None = None,
    custom_parallelize: bool | None = None,
    cost: Any = "flops",
) -> Plan:
    """Split a model into pipeline stages and place them on ranks.

    Every validation rule runs (the adapter's, ppzoo's own and every plugin's; see
    :mod:`ppzoo.validation`) on what is known: the mesh degrees, when given, are checked here, as
    :func:`ppzoo.pipeline` passes them, so a plan refuses exactly what a pipeline would.

    Args:
        config_or_path: a transformers config, a directory with ``config.json``, or a hub id.
        pp: pipeline-parallel degree (ranks along the pipeline).
        schedule: a torch schedule name (case-insensitive) or a ``.csv`` schedule file.
        stages_per_rank: stages each rank holds; default 1 for GPipe/1F1B, 2 otherwise.
        layers_per_stage: fixed layers per stage instead of the cost-balanced split.
        stage_modules: an explicit split: one list of module FQNs per stage, in forward order.
        dtype: parameter dtype for ``bytes``; default the config's dtype, else float32.
        seq_len: sequence length the cost model assumes for attention.
        microbatches: microbatches per step, for the simulated step the split is chosen by and for
            the schedule's rules (default: the number of stages, as :func:`ppzoo.pipeline`).
        dp_replicate, dp_shard, cp, tp: the other mesh degrees, when known (None: not checked).
        custom_parallelize: a ``parallelize_fn`` will replace ppzoo's tensor parallel + FSDP2.
        cost: what the split balances: ``"flops"`` (default; :mod:`ppzoo.cost`), ``"measured"``
            (each layer kind's and the head's forward + backward timed here on the CPU, in
            ``dtype``, plus each stage's AdamW step; :mod:`ppzoo.calibration`), or a
            :class:`~ppzoo.calibration.MeasuredCosts` measured elsewhere (on the device).

    Returns:
        The :class:`Plan`.

    Raises:
        ValueError: an argument of the wrong type or range, or an explicit split that names
            modules wrongly; the message names the value.
        ppzoo.validation.ValidationError: the config, the split or the settings break rules; every
            problem at once, each with its code (``.problems``).
    """
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp must be an integer >= 1, got {pp!r}")
    for arg, value in (
        ("stages_per_rank", stages_per_rank),
        ("layers_per_stage", layers_per_stage),
        ("microbatches", microbatches),
        ("dp_replicate", dp_replicate),
        ("dp_shard", dp_shard),
        ("cp", cp),
        ("tp", tp),
    ):
        _check_count(arg, value)
    if stage_modules is not None and layers_per_stage is not None:
        raise ValueError("pass either stage_modules or layers_per_stage, not both")
    if not (cost in ("flops", "measured") if isinstance(cost, str) else isinstance(cost, _measured_type())):
        raise ValueError(f"cost must be 'flops', 'measured' or a ppzoo.calibration.MeasuredCosts, got {cost!r}")
    name, kind = schedule_kind(schedule)
    config = load_config(config_or_path)
    adapter = registry.adapter_for(config)
    settings = Settings(
        pp=pp,
        schedule=name,
        stages_per_rank=stages_per_rank,
        microbatches=microbatches,
        dp_replicate=dp_replicate,
        dp_shard=dp_shard,
        cp=cp,
        tp=tp,
        custom_parallelize=custom_parallelize,
    )
    try:
        layout = adapter.fqn_layout(config)
    except Exception:
        # NOTE: a config the adapter refuses may have no layout at all; its problems say why.
        registry.validate(config, adapter=adapter, settings=settings)
        raise
    n_layers = layout.num_layers
    if stage_modules is not None:
        num_stages = len(stage_modules)
    elif layers_per_stage is not None:
        num_stages = -(-n_layers // layers_per_stage)
    else:
        num_stages = pp * (stages_per_rank or (1 if kind == "single" else 2))
    split = stages_from_modules(layout, stage_modules) if stage_modules is not None else None
    settings = replace(settings, num_stages=num_stages)
    # NOTE: every rule before anything is built: nothing is costed or split for a config, split
    # or setting a rule refuses (a vision-language config, say, has no layout to cost).
    registry.validate(config, adapter=adapter, settings=settings)
    placement = placement_for(name)

    pdtype = parse_dtype(dtype if dtype is not None else getattr(config, "dtype", None))
    model = meta_model(config, dtype=pdtype)
    step_costs = None
    if cost == "flops":
        costs = module_costs(config, adapter, model, layout, seq_len)
    else:
        costs, step_costs = _measured_costs(config, adapter, model, layout, cost, seq_len=seq_len, dtype=pdtype)
    if split is None:
        units = [list(layout.inputs)] + [[layout.layer(i)] for i in range(n_layers)] + [list(layout.outputs)]
        if layers_per_stage is not None:
            # NOTE: unit 0 is the inputs, so the cut after layer i - 1 is unit bound i + 1
            cuts = [1 + s * layers_per_stage for s in range(1, num_stages)]
            bounds = [0, *cuts, len(units)]
        else:
            bounds = balanced_bounds(
                [sum(costs[m] for m in unit) for unit in units],
                num_stages,
                schedule=name,
                pp=pp,
                microbatches=num_stages if microbatches is None else microbatches,
                step_costs=None if step_costs is None else [sum(step_costs[m] for m in unit) for unit in units],
            )
        split = [[m for unit in units[a:b] for m in unit] for a, b in zip(bounds, bounds[1:], strict=False)]

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
        rank = stage_rank(s, num_stages=num_stages, pp=pp, placement=placement)
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
        notes=skipped_weights(adapter.text_config(config), model, n_layers),
        cost_model="flops" if cost == "flops" else "measured",
    )
    # NOTE: plugins' rules about the stages themselves (their modules, ranks, sizes)
    registry.validate(config, result, adapter=adapter, settings=settings)
    return result
