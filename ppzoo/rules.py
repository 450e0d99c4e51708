"""ppzoo's own validation rules: a built-in plugin on ``ppzoo_validate``, like any other.

The registry registers this module first; its hook implementation is marked ``tryfirst``, so the
adapter's rules and the core's are reported before any plugin's. Each rule fires once its inputs
are known: the adapter's rules always, the split rules once :class:`~ppzoo.validation.Settings`
carries ``num_stages``, the microbatch rules once it carries ``microbatches``, the mesh rules once
it carries the degrees. Every problem has a code from :data:`ppzoo.validation.CODES`.
"""

from __future__ import annotations

from typing import Any

from ppzoo.checkpoint.quantized import quantization_problems
from ppzoo.hookspecs import hookimpl
from ppzoo.validation import Problem, Settings

__all__ = ["microbatch_problems", "ppzoo_validate"]


@hookimpl(tryfirst=True)
def ppzoo_validate(config: Any, adapter: Any, plan: Any, settings: Settings) -> list[Problem]:
    """The adapter's rules and the quantized-weights rule, then the split, microbatch and mesh rules
    whose settings are known."""
    problems = _adapter_problems(config, adapter, plan) + quantization_problems(config)
    known = settings.pp is not None and settings.num_stages is not None and settings.schedule is not None
    if known:
        problems += _split_problems(config, adapter, settings)
    if known and settings.microbatches is not None:
        problems += microbatch_problems(
            schedule=settings.schedule,
            microbatches=settings.microbatches,
            num_stages=settings.num_stages,
            pp=settings.pp,
        )
    return problems + _mesh_problems(config, adapter, settings)


def _adapter_problems(config: Any, adapter: Any, plan: Any) -> list[Problem]:
    from ppzoo.registry import PluginError

    problems = list(adapter.validate(config, plan) or ())
    for problem in problems:
        if not isinstance(problem, Problem):
            raise PluginError(
                f"{type(adapter).__name__}.validate (adapter {adapter.name!r}) returned {problem!r}; return "
                "ppzoo.validation.Problem(code, message) objects — see docs/adapters.md"
            )
    return problems


def _split_problems(config: Any, adapter: Any, settings: Settings) -> list[Problem]:
    from ppzoo.schedule import schedule_kind

    n, pp = settings.num_stages, settings.pp
    if n % pp:
        return [
            Problem(
                "stages-uneven",
                f"{n} stages cannot be spread evenly over pp={pp} ranks; choose a stage count divisible by {pp}",
            )
        ]
    per_rank = n // pp
    problems = []
    if settings.stages_per_rank is not None and per_rank != settings.stages_per_rank:
        problems.append(
            Problem(
                "stages-per-rank-mismatch",
                f"stages_per_rank={settings.stages_per_rank} but the split has {per_rank} stages per rank",
            )
        )
    layers = adapter.fqn_layout(config).num_layers
    if n > layers:
        problems.append(
            Problem(
                "stages-exceed-layers",
                f"{n} stages (pp={pp} × {per_rank} per rank) is more than the model's {layers} layers; "
                "lower pp or stages per rank",
            )
        )
    name, kind = schedule_kind(settings.schedule)
    if kind == "single" and per_rank != 1:
        problems.append(
            Problem(
                "schedule-stages-per-rank",
                f"schedule {name} runs one stage per rank, but the plan puts {per_rank} on each",
            )
        )
    if kind == "v" and per_rank != 2:
        problems.append(
            Problem(
                "schedule-stages-per-rank",
                f"schedule {name} needs V placement with exactly two stages per rank, got {per_rank}",
            )
        )
    return problems


def microbatch_problems(*, schedule: str, microbatches: int, num_stages: int, pp: int) -> list[Problem]:
    """What makes ``microbatches`` unfit for ``schedule`` with ``num_stages`` stages over ``pp`` ranks."""
    from ppzoo.schedule import schedule_kind

    name, _ = schedule_kind(schedule)
    problems = []
    if name in ("1F1B", "DualPipeV") and microbatches < num_stages:
        problems.append(
            Problem(
                "microbatches-too-few",
                f"schedule {name} needs at least as many microbatches as stages: got {microbatches} microbatches "
                f"for {num_stages} stages; raise microbatches to {num_stages} or more",
            )
        )
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and microbatches % pp:
        problems.append(
            Problem(
                "microbatches-not-multiple",
                f"schedule {name} runs microbatches in rounds of pp={pp}: {microbatches} microbatches is not a "
                f"multiple of {pp}",
            )
        )
    return problems


def _per_layer_values(cfg: Any, name: str) -> list[Any]:
    """``cfg.name``, or each layer's where the config holds it per layer (Gemma 4's key/value heads).

    NOTE: transformers' heterogeneous configs refuse the global read of a per-layer attribute
    (``AmbiguousGlobalPerLayerAttributeError``, a RuntimeError).
    """
    try:
        return [getattr(cfg, name, None)]
    except RuntimeError:
        return sorted({getattr(layer, name, None) for layer in cfg.per_layer_config}, key=str)


def _mesh_problems(config: Any, adapter: Any, settings: Settings) -> list[Problem]:
    problems = []
    if settings.cp not in (None, 1):
        problems.append(
            Problem(
                "cp-unsupported",
                f"cp={settings.cp}: ppzoo does not implement context parallelism (and gloo on CPU cannot run it); use cp=1",
            )
        )
    tp = settings.tp
    if tp is not None and tp > 1 and not settings.custom_parallelize:
        cfg = adapter.text_config(config)
        sizes = [
            (name, value)
            for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
            for value in _per_layer_values(cfg, name)
        ]
        bad = [f"{k}={v}" for k, v in sizes if isinstance(v, int) and v % tp]
        if bad:
            problems.append(
                Problem("tp-divisibility", f"tp={tp} must divide {', '.join(bad)}; choose a tp that divides them")
            )
        if not adapter.tp_plan(config):
            problems.append(
                Problem(
                    "tp-plan-missing",
                    f"tp={tp}: adapter {adapter.name!r} has no tensor-parallel plan; pass parallelize_fn=...",
                )
            )
    if settings.dp is not None and settings.dp > 1 and _shares_first_and_last_rank(settings):
        if adapter.tied_weights(config):
            problems.append(
                Problem(
                    "tied-v-placement-dp",
                    "V placement puts the tied embedding and head on one rank as one parameter, which FSDP cannot "
                    f"shard in two stages (dp_replicate × dp_shard = {settings.dp}); use a loop schedule "
                    "(1F1B, Interleaved1F1B)",
                )
            )
    return problems


def _shares_first_and_last_rank(settings: Settings) -> bool:
    """Whether the first and the last of several stages land on one rank."""
    from ppzoo.planner import placement_for, stage_rank

    n, pp = settings.num_stages, settings.pp
    if n is None or pp is None or n < 2 or n % pp or settings.schedule is None:
        return False
    placement = placement_for(settings.schedule)
    return stage_rank(0, num_stages=n, pp=pp, placement=placement) == stage_rank(
        n - 1, num_stages=n, pp=pp, placement=placement
    )
