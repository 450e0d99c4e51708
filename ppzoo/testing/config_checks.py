"""Conformance checks of what an adapter declares, on its tiny config alone (nothing is loaded or
trained): the tiny config's size and capabilities, the layout, the plans, the validation rules.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch

from ppzoo import registry
from ppzoo.adapter import Adapter
from ppzoo.hookspecs import hookimpl
from ppzoo.meta import meta_model
from ppzoo.planner import Plan, plan
from ppzoo.testing.exercised import exercised
from ppzoo.testing.harness import SEQ_LEN, _fail_if, _owners, resolving_to
from ppzoo.validation import Problem, Settings

__all__ = ["check_layout", "check_plan", "check_tiny_config", "check_validation"]

#: the tiny config must split into this many stages with two layers each (interleaved, pp=4)
MIN_LAYERS = 8
#: above this many parameters the matrix stops being fast on two CPU cores
MAX_TINY_PARAMS = 2_000_000
#: (pp, schedule, extra plan arguments) the plan check exercises: every placement kind
PLAN_CASES: tuple[tuple[int, str, dict], ...] = (
    (1, "1F1B", {}),
    (2, "GPipe", {}),
    (3, "1F1B", {}),
    (4, "1F1B", {}),
    (2, "Interleaved1F1B", {}),
    (4, "Interleaved1F1B", {}),
    (2, "ZBVZeroBubble", {}),
    (4, "DualPipeV", {}),
)


# -- tiny config -------------------------------------------------------------------------------
def check_tiny_config(adapter: Adapter) -> None:
    """The tiny config is small, has at least 8 layers (the kit splits it into up to 8 stages), and
    exercises every declared capability (and declares every one it exercises), so the checks each
    capability names test it."""
    config = adapter.tiny_config()
    problems = []
    layers = adapter.fqn_layout(config).num_layers
    if layers < MIN_LAYERS:
        problems.append(
            f"tiny_config() has {layers} layers; the kit splits it into up to 8 stages, give it >= {MIN_LAYERS}"
        )
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_TINY_PARAMS:
        problems.append(
            f"tiny_config() has {params:,} parameters; keep it under {MAX_TINY_PARAMS:,} (hidden 32-64, vocab ~100)"
        )
    declared = set(adapter.capabilities)
    for capability, used in exercised(adapter, config, model, seq_len=SEQ_LEN).items():
        if capability in declared and not used:
            problems.append(
                f"declares {capability.value!r} but tiny_config() does not exercise it, so no check would test it "
                f"(it needs: {capability.description})"
            )
        if used and capability not in declared:
            problems.append(
                f"tiny_config() exercises {capability.value!r}; add it to {type(adapter).__name__}.capabilities"
            )
    _fail_if(problems, f"adapter {adapter.name!r}: tiny config")


# -- layout ----------------------------------------------------------------------------------
def check_layout(adapter: Adapter) -> None:
    """``fqn_layout`` names existing modules and covers every parameter exactly once."""
    config = adapter.tiny_config()
    layout = adapter.fqn_layout(config)
    model = meta_model(config)
    problems = []
    for fqn in layout.inputs + layout.outputs + layout.shared + (layout.layers,):
        try:
            model.get_submodule(fqn)
        except AttributeError:
            problems.append(f"layout names module {fqn!r}, which the model does not have")
    _fail_if(problems, f"adapter {adapter.name!r}: layout")
    held = len(model.get_submodule(layout.layers))
    if held != layout.num_layers:
        problems.append(f"layout says {layout.num_layers} layers but {layout.layers!r} holds {held}")
    for name, _ in model.named_parameters(remove_duplicate=False):
        owners = _owners(name, layout.modules)
        if len(owners) != 1:
            problems.append(
                f"parameter {name!r} is in {len(owners)} layout modules {owners}; it must be in exactly one"
            )
    for fqn in layout.shared:
        names = [n for n, _ in model.get_submodule(fqn).named_parameters()]
        if names:
            problems.append(
                f"shared module {fqn!r} holds parameters {names}; every stage keeps a copy, so they would not be trained once"
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    layer_of = {layout.layer(i): i for i in range(layout.num_layers)}
    for copy_, source in adapter.tied_weights(config).items():
        missing = [(fqn, side) for fqn, side in ((copy_, "copy"), (source, "source")) if fqn not in params]
        problems += [f"tied {side} {fqn!r} is not a parameter of the model" for fqn, side in missing]
        if missing:
            continue
        # NOTE: a head tied to the embedding, or a block several layers share (a later layer's copy
        # of the first's); ppzoo.tied sums the gradients over the stages holding them
        layers = [next((layer_of[m] for m in _owners(fqn, tuple(layer_of))), None) for fqn in (copy_, source)]
        if None not in layers:
            if layers[0] <= layers[1]:
                problems.append(f"tied copy {copy_!r} must be in a later layer than its source {source!r}")
            continue
        for fqn, side, modules in ((copy_, "copy", layout.outputs), (source, "source", layout.inputs)):
            if not _owners(fqn, modules):
                problems.append(
                    f"tied {side} {fqn!r} must be in an {'output' if side == 'copy' else 'input'} module, "
                    "or both ends in layers"
                )
    _fail_if(problems, f"adapter {adapter.name!r}: layout")


# -- plan --------------------------------------------------------------------------------------
def _plan_problems(the_plan: Plan, adapter: Adapter, config: Any, model: torch.nn.Module, label: str) -> list[str]:
    layout = the_plan.layout
    problems = []
    order = [m for s in the_plan.stages for m in s.modules]
    if order != list(layout.modules):
        problems.append(f"{label}: stages do not hold every layout module once, in forward order: {order}")
    if [s.index for s in the_plan.stages] != list(range(the_plan.num_stages)):
        problems.append(f"{label}: stage indices are {[s.index for s in the_plan.stages]}")
    for s in the_plan.stages:
        want = tuple(int(m.rsplit(".", 1)[1]) for m in s.modules if m.startswith(layout.layers + "."))
        if s.layers != want:
            problems.append(f"{label}: stage {s.index} lists layers {s.layers}, its modules hold {want}")
        # NOTE: only the first stage may hold the input modules alone, only the last the outputs alone
        if not s.layers and 0 < s.index < the_plan.num_stages - 1:
            problems.append(f"{label}: middle stage {s.index} holds no layer: {s.modules}")
        numel = sum(p.numel() for m in s.modules for p in model.get_submodule(m).parameters())
        if s.params != numel:
            problems.append(f"{label}: stage {s.index} counts {s.params} parameters, its modules hold {numel}")
    if not set(layout.inputs) <= set(the_plan.stages[0].modules):
        problems.append(f"{label}: the first stage does not hold the inputs {layout.inputs}")
    if not set(layout.outputs) <= set(the_plan.stages[-1].modules):
        problems.append(f"{label}: the last stage does not hold the outputs {layout.outputs}")
    pp, n = the_plan.pp, the_plan.num_stages
    for s in the_plan.stages:
        want_rank = s.index % pp if the_plan.placement == "loop" else min(s.index, 2 * pp - 1 - s.index)
        if s.rank != want_rank:
            problems.append(
                f"{label}: stage {s.index} is on rank {s.rank}, {the_plan.placement} placement puts it on {want_rank}"
            )
    per_rank = [len(the_plan.stages_for_rank(r)) for r in range(pp)]
    if per_rank != [n // pp] * pp:
        problems.append(f"{label}: stages per rank are {per_rank}, expected {n // pp} each")
    unique = sum(p.numel() for p in model.parameters())
    if the_plan.total_params != unique:
        problems.append(f"{label}: total_params is {the_plan.total_params}, the model has {unique} (tied counted once)")
    return problems


def check_plan(adapter: Adapter) -> None:
    """Plans for every placement kind keep forward order, cover every module once, place stages
    where their schedule needs them, count parameters right, and round-trip through
    ``stage_modules`` and through a saved ``config.json``."""
    from transformers import AutoModelForCausalLM

    config = adapter.tiny_config()
    # NOTE: a real model, not ppzoo's meta build: Hugging Face ties its embeddings, so its
    # parameter count is the truth the plan's total must match.
    model = AutoModelForCausalLM.from_config(config)
    problems = []
    n_layers = adapter.fqn_layout(config).num_layers
    cases = PLAN_CASES + ((2, "1F1B", {"layers_per_stage": -(-n_layers // 2)}),)
    with resolving_to(adapter), tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        for pp, schedule, extra in cases:
            label = f"pp={pp} {schedule}" + "".join(f" {k}={v}" for k, v in extra.items())
            the_plan = plan(config, pp=pp, schedule=schedule, **extra)
            problems += _plan_problems(the_plan, adapter, config, model, label)
            explicit = plan(config, pp=pp, schedule=schedule, stage_modules=[s.modules for s in the_plan.stages])
            if explicit.stages != the_plan.stages:
                problems.append(f"{label}: the same split passed as stage_modules gives other stages")
            if plan(tmp, pp=pp, schedule=schedule, **extra).to_dict() != the_plan.to_dict():
                problems.append(f"{label}: the plan from the saved config.json differs from the plan from the config")
            if the_plan.placement == "v" and the_plan.stages[0].rank != the_plan.stages[-1].rank:
                problems.append(f"{label}: V placement must put the first and last stage on one rank")
    _fail_if(problems, f"adapter {adapter.name!r}: plan")


# -- validation -------------------------------------------------------------------------------------
class _ExtraRule:
    """A plugin rule added by the kit: it must be reported together with the adapter's own."""

    CODE = "ppzoo-testing-extra-rule"

    @hookimpl
    def ppzoo_validate(self, config: Any, adapter: Any, plan: Any, settings: Settings) -> list[Problem]:
        return [Problem(self.CODE, "a plugin's rule (added by the conformance kit)")]


def _codes_raised(adapter: Adapter, config: Any) -> list[str]:
    try:
        registry.validate(config, adapter=adapter)
    except registry.ValidationError as exc:
        missing = [p.message for p in exc.problems if p.message not in str(exc)]
        if missing:
            return [f"<the message does not list {missing}: {exc}>"]
        return exc.codes
    return []


def check_validation(adapter: Adapter) -> None:
    """The tiny config passes every rule; each rule the adapter claims (``validation_cases()``:
    a config and the code it must raise) and the base class's encoder-decoder rule raise their
    code, reported together with every plugin's rules; a plan with more stages than layers is
    refused with the code ``stages-exceed-layers``, naming both numbers."""
    config = adapter.tiny_config()
    problems = []
    with resolving_to(adapter):
        n_layers = adapter.fqn_layout(config).num_layers
        for where, found in (
            ("alone", registry.problems(config, adapter=adapter)),
            ("under a plan", _plan_problems_or_error(config)),
        ):
            if found:
                problems.append(f"the tiny config is rejected {where}: {[(p.code, p.message) for p in found]}")
        enc_dec = copy.deepcopy(config)
        enc_dec.is_encoder_decoder = True
        cases = [(enc_dec, "encoder-decoder"), *adapter.validation_cases()]
        for bad, code in cases:
            raised = _codes_raised(adapter, bad)
            if code not in raised:
                problems.append(f"rule {code!r} did not fire; validation raised {raised}")
        with registry.plugin(_ExtraRule(), name="ppzoo.testing extra rule"):
            for bad, code in cases:
                raised = _codes_raised(adapter, bad)
                if code not in raised or _ExtraRule.CODE not in raised:
                    problems.append(f"{code!r} is not reported together with plugin rules: {raised}")
        too_many = n_layers + 1
        try:
            plan(config, pp=too_many)
            problems.append(f"plan(pp={too_many}) for {n_layers} layers did not raise")
        except registry.ValidationError as exc:
            named = [p for p in exc.problems if p.code == "stages-exceed-layers"]
            if not named or not all(str(n) in named[0].message for n in (too_many, n_layers)):
                problems.append(
                    f"plan(pp={too_many}) for {n_layers} layers raised {exc.codes}, expected 'stages-exceed-layers' "
                    f"naming {too_many} and {n_layers}: {exc}"
                )
    _fail_if(problems, f"adapter {adapter.name!r}: validation")


def _plan_problems_or_error(config: Any) -> list[Problem]:
    try:
        plan(config, pp=2)
    except registry.ValidationError as exc:
        return exc.problems
    return []
