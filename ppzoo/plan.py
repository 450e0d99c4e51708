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

import contextlib
import copy
import itertools
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ppzoo import registry
from ppzoo.adapter import SLIDING, Adapter, Layout

__all__ = ["Plan", "StagePlan", "SCHEDULES", "plan", "load_config", "schedule_kind", "meta_model"]

#: torch schedule names (lower-cased) → placement kind: "single" (one stage a rank), "loop", "v"
SCHEDULES: dict[str, tuple[str, str]] = {
    "gpipe": ("GPipe", "single"),
    "1f1b": ("1F1B", "single"),
    "interleaved1f1b": ("Interleaved1F1B", "loop"),
    "loopedbfs": ("LoopedBFS", "loop"),
    "interleavedzerobubble": ("InterleavedZeroBubble", "loop"),
    "zbvzerobubble": ("ZBVZeroBubble", "v"),
    "dualpipev": ("DualPipeV", "v"),
}


def schedule_kind(schedule: str) -> tuple[str, str]:
    """``(canonical name, kind)`` for a schedule name or CSV file; kind is single, loop, v or csv.

    Raises:
        ValueError: the name is neither a known schedule nor a ``.csv`` file.
    """
    if str(schedule).lower().endswith(".csv"):
        return str(schedule), "csv"
    try:
        return SCHEDULES[str(schedule).lower()]
    except KeyError:
        names = ", ".join(name for name, _ in SCHEDULES.values())
        raise ValueError(f"unknown schedule {schedule!r}; use one of {names}, or a path to a .csv schedule") from None


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


def load_config(config_or_path: Any, **kwargs: Any) -> Any:
    """A transformers config from a config object, a local directory or a hub id."""
    if isinstance(config_or_path, (str, os.PathLike)):
        from transformers import AutoConfig

        path = os.fspath(config_or_path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face model directory or hub id")
        if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~"))):
            raise FileNotFoundError(f"no directory {path!r}; pass a Hugging Face model directory or hub id")
        return AutoConfig.from_pretrained(path, **kwargs)
    return config_or_path


def _dtype_of(config: Any, dtype: Any) -> torch.dtype:
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. bfloat16, float16 or float32")
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def meta_model(config: Any, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """The whole causal LM on the meta device: structure and shapes, no memory, no init."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    # NOTE: from_config prefers config.dtype to the default dtype, and writes the dtype it uses
    # back into the config it is given: pass the dtype explicitly, on a copy of the config.
    with torch.device("meta"), no_init_weights(), _default_dtype(dtype):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, **kwargs)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _module_costs(config: Any, adapter: Adapter, model: torch.nn.Module, layout: Layout, seq_len: int) -> dict[str, float]:
    """Estimated forward FLOPs per token of each module (backward scales them all alike).

    Matrix multiplies cost 2 FLOPs per weight; attention adds 4·heads·head_dim per attended key
    (a causal query sees seq/2 keys on average, a sliding one at most the window); the head adds
    the softmax of the loss. An embedding is a lookup: a row read and written per token.
    """
    cfg = adapter.text_config(config)
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 1))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    window = getattr(cfg, "sliding_window", None) or seq_len
    kinds = adapter.layer_types(config)
    costs: dict[str, float] = {}
    for fqn in layout.modules:
        module = model.get_submodule(fqn)
        matrix = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
        if fqn in layout.inputs:
            costs[fqn] = 2.0 * hidden * len(list(module.parameters()))
        elif fqn in layout.outputs:
            vocab = getattr(cfg, "vocab_size", 0) if matrix else 0
            costs[fqn] = 2.0 * matrix + 5.0 * vocab + 4.0 * hidden
        else:
            index = int(fqn.rsplit(".", 1)[1])
            keys = min(window, seq_len / 2) if kinds[index] == SLIDING else seq_len / 2
            costs[fqn] = 2.0 * adapter.active_matrix_params(cfg, module, matrix) + 4.0 * heads * head_dim * keys
    return costs


#: up to this many candidate splits the planner simulates every one; above, it searches locally
_EXHAUSTIVE_SPLITS = 2000
#: the most schedule actions the search simulates in all (a few seconds of planning at most)
_SEARCH_ACTIONS = 2_000_000
#: a split less even than the min-max one must shorten the simulated step by more than this
#: share: uneven stages cost memory (the first stages keep the most microbatches in flight)
_STEP_TOLERANCE = 0.01


def _min_max_bounds(unit_costs: Sequence[float], stages: int) -> tuple[int, ...]:
    """Stage bounds over the units (each stage ≥ 1 unit, contiguous) minimising the costliest stage.

    The bounds ``(0, b1, …, n)`` cut the units into stages ``units[b_i : b_i+1]``.
    """
    n = len(unit_costs)
    prefix = [0.0]
    for c in unit_costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max-cost splitting the first i units into s stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                # NOTE: on ties prefer the earlier cut, which keeps the split deterministic.
                if value < best[s][i] - 1e-9 * abs(value):
                    best[s][i], cut[s][i] = value, j
    bounds, i = [n], n
    for s in range(stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    return tuple(bounds[::-1])


def _stage_costs(unit_costs: Sequence[float], bounds: Sequence[int]) -> list[float]:
    return [sum(unit_costs[a:b]) for a, b in zip(bounds, bounds[1:])]


def _balanced_bounds(
    unit_costs: Sequence[float], stages: int, *, schedule: str, pp: int, microbatches: int
) -> tuple[int, ...]:
    """The split of the units into ``stages`` contiguous stages whose simulated step is shortest.

    Each candidate split runs through the schedule's own order (:mod:`ppzoo.simulate`): every
    split when there are few, else those a local search visits from the min-max split (moving one
    or two neighbouring boundaries by a unit while the step gets shorter). Of the splits within
    ``_STEP_TOLERANCE`` of the shortest step, the one with the cheapest costliest stage wins. With
    one stage a rank and many microbatches this is the min-max split; with few microbatches the
    last stages, on every microbatch's critical path, get lighter; with two stages a rank, a
    rank's work is the sum of two and the order decides which pairs stall. Schedules the
    simulation does not know (a CSV file) keep the min-max split.
    """
    from ppzoo import simulate

    bounds = _min_max_bounds(unit_costs, stages)
    if schedule not in simulate.SIMULATED or stages == 1:
        return bounds
    try:
        order = simulate.schedule_order(schedule, pp=pp, microbatches=microbatches, stages_per_rank=stages // pp)
    except (ValueError, RuntimeError):  # NOTE: an order torch refuses to generate for these counts
        return bounds
    total = sum(unit_costs) or 1.0
    units = [c / total for c in unit_costs]

    def step(b: tuple[int, ...]) -> float:
        return simulate.makespan(order, _stage_costs(units, b))

    def evenness(b: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
        return round(max(_stage_costs(units, b)), 12), b

    n = len(units)
    # NOTE: a budget in simulated actions, not in seconds, so that every rank plans alike
    budget = max(1, _SEARCH_ACTIONS // max(1, sum(len(ops) for ops in order.values())))
    if math.comb(n - 1, stages - 1) <= min(_EXHAUSTIVE_SPLITS, budget):
        steps = {b: step(b) for b in ((0, *cuts, n) for cuts in itertools.combinations(range(1, n), stages - 1))}
    else:
        steps = {bounds: step(bounds)}
        while len(steps) < budget:
            # NOTE: one boundary, or two neighbouring ones together (a stage shifting whole), by one unit
            for k in range(1, stages):
                for width in (1, 2)[: stages - k]:
                    for delta in (-1, 1):
                        moved = bounds[:k] + tuple(b + delta for b in bounds[k:k + width]) + bounds[k + width:]
                        if moved not in steps and all(a < b for a, b in zip(moved, moved[1:])):
                            steps[moved] = step(moved)
            shortest = min(steps, key=lambda b: (steps[b], b))
            if steps[shortest] >= steps[bounds]:
                break
            bounds = shortest
    shortest = min(steps.values())
    return min((b for b, t in steps.items() if t <= shortest * (1 + _STEP_TOLERANCE)), key=evenness)


def _stages_from_modules(layout: Layout, stage_modules: Sequence[Sequence[str]]) -> list[list[str]]:
    known = layout.modules
    position = {fqn: i for i, fqn in enumerate(known)}
    seen: dict[str, int] = {}
    for s, mods in enumerate(stage_modules):
        if not mods:
            raise ValueError(f"stage_modules[{s}] is empty; every stage needs at least one module")
        for fqn in mods:
            if fqn not in position:
                raise ValueError(
                    f"stage_modules[{s}] names unknown module {fqn!r}; known modules are "
                    f"{known[0]!r} … {known[-1]!r} ({', '.join(layout.inputs)}, {layout.layers}.0-"
                    f"{layout.num_layers - 1}, {', '.join(layout.outputs)})"
                )
            if fqn in seen:
                raise ValueError(f"module {fqn!r} is listed in stage {seen[fqn]} and again in stage {s}")
            seen[fqn] = s
    missing = [fqn for fqn in known if fqn not in seen]
    if missing:
        raise ValueError(f"stage_modules leaves {missing} in no stage; every module must be in exactly one stage")
    order = [fqn for mods in stage_modules for fqn in mods]
    if order != list(known):
        raise ValueError(
            "stage_modules must keep forward order (inputs, layers in order, outputs) across stages; "
            f"got {order}"
        )
    return [list(m) for m in stage_modules]


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
        split = _stages_from_modules(layout, stage_modules)
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

    pdtype = _dtype_of(config, dtype)
    model = meta_model(config, dtype=pdtype)
    costs = _module_costs(config, adapter, model, layout, seq_len)
    if split is None:
        units = [list(layout.inputs)] + [[layout.layer(i)] for i in range(n_layers)] + [list(layout.outputs)]
        if layers_per_stage is not None:
            # NOTE: unit 0 is the inputs, so the cut after layer i - 1 is unit bound i + 1
            cuts = [1 + s * layers_per_stage for s in range(1, num_stages)]
            bounds = [0, *cuts, len(units)]
        else:
            bounds = _balanced_bounds(
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
