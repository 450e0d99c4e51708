"""The split search (``ppzoo.split``): which contiguous runs of modules make the stages.

The default split has the shortest step the schedule's own order simulates; an explicit split
(``stage_modules``) is checked module by module.
"""

import itertools
import math
import re

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

import ppzoo
from ppzoo import registry, simulate
from ppzoo.architectures.llama import TINY
from ppzoo.cost import module_costs
from ppzoo.meta import meta_model
from ppzoo.split import _EXHAUSTIVE_SPLITS, min_max_bounds

LAYERS = [f"model.layers.{i}" for i in range(8)]
HEAD = ["model.norm", "lm_head"]
#: Llama-3-8B's shape
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def tiny(**overrides):
    return LlamaConfig(**{**TINY, **overrides})


def numel(module):
    return sum(p.numel() for p in module.parameters())


def layers_of(result):
    return [list(s.layers) for s in result.stages]


# -- cost balance --------------------------------------------------------------------------------


#: the step benchmark's small shape: its 32k-vocabulary head costs about 7.7 of its layers
HEAVY_HEAD = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
)


def _units(config, seq_len):
    """(units, unit costs): the inputs, each layer, the outputs, as the planner prices them."""
    adapter = registry.adapter_for(config)
    layout = adapter.fqn_layout(config)
    costs = module_costs(config, adapter, meta_model(config), layout, seq_len)
    units = [list(layout.inputs)] + [[layout.layer(i)] for i in range(layout.num_layers)] + [list(layout.outputs)]
    return units, [sum(costs[m] for m in unit) for unit in units]


def _step(result, unit_costs, units, bounds=None, microbatches=4):
    """Simulated step of ``result``'s schedule for the split ``bounds`` (default: the plan's own)."""
    if bounds is None:
        costs = [s.cost for s in result.stages]
    else:
        costs = [sum(unit_costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    order = simulate.schedule_order(
        result.schedule, pp=result.pp, microbatches=microbatches, stages_per_rank=result.stages_per_rank
    )
    return simulate.makespan(order, costs)


def _layer_balanced(unit_costs, stages):
    """The split of the planner before stages could hold no layer: every stage ≥ 1 layer, min-max."""
    n = len(unit_costs)
    best = None
    for cuts in itertools.combinations(range(2, n - 1), stages - 1):
        bounds = (0, *cuts, n)
        key = max(sum(unit_costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        if best is None or key < best[0]:
            best = (key, bounds)
    return best[1]


def test_a_heavy_head_gets_a_stage_of_its_own():
    """With two stages, all 8 layers beside the embedding (8 layers' cost) against the head alone (7.7)
    beats any split that leaves a layer with the head (7 against 8.7)."""
    config = LlamaConfig(**HEAVY_HEAD)
    result = ppzoo.plan(config, pp=2, seq_len=128, microbatches=4)
    assert result.stages[0].modules == ("model.embed_tokens", *LAYERS)
    assert result.stages[1].modules == tuple(HEAD) and result.stages[1].layers == ()
    units, unit_costs = _units(config, 128)
    old = _layer_balanced(unit_costs, 2)
    assert old == (0, 8, 10)  # 7 layers, then 1 layer and the head
    assert _step(result, unit_costs, units) < 0.95 * _step(result, unit_costs, units, old)


@pytest.mark.parametrize(
    "schedule", ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
)
@pytest.mark.parametrize("shape", ["heavy-head", "tiny"])
def test_split_has_the_shortest_simulated_step(schedule, shape):
    """No contiguous split steps more than the tolerance faster; of those that come close, the
    plan's costliest stage is the cheapest."""
    config = LlamaConfig(**HEAVY_HEAD) if shape == "heavy-head" else tiny()
    result = ppzoo.plan(config, pp=2, schedule=schedule, seq_len=128, microbatches=4)
    units, unit_costs = _units(config, 128)
    n, stages = len(units), result.num_stages
    splits = [(0, *cuts, n) for cuts in itertools.combinations(range(1, n), stages - 1)]
    steps = {b: _step(result, unit_costs, units, b) for b in splits}
    shortest = min(steps.values())
    mine = _step(result, unit_costs, units)
    assert mine <= shortest * 1.01 + 1e-6 * shortest
    close = [b for b, t in steps.items() if t <= shortest * 1.01]
    cheapest = min(max(sum(unit_costs[a:b]) for a, b in zip(bs, bs[1:])) for bs in close)
    assert max(s.cost for s in result.stages) == pytest.approx(cheapest, rel=1e-9)
    if shape == "heavy-head" and stages == 4:
        # two stages a rank: the schedule-aware split beats the layer-balanced one by far
        old = _layer_balanced(unit_costs, stages)
        assert mine < 0.93 * steps[old], (schedule, [len(s.layers) for s in result.stages])


def test_without_a_large_head_layers_split_evenly():
    for microbatches in (4, 16):
        result = ppzoo.plan(tiny(), pp=4, microbatches=microbatches)
        assert [len(s.layers) for s in result.stages] == [2, 2, 2, 2]


def test_few_microbatches_lighten_the_last_stage():
    """1F1B with as many microbatches as stages: the last stage is on every microbatch's critical
    path, so a lighter one shortens the step by more than the tolerance; with many it does not."""
    few = ppzoo.plan(tiny(), pp=2, microbatches=2)
    assert [len(s.layers) for s in few.stages] == [5, 3]
    units, unit_costs = _units(tiny(), 2048)
    even = (0, 5, 10)
    assert _step(few, unit_costs, units, microbatches=2) < 0.99 * _step(few, unit_costs, units, even, microbatches=2)
    many = ppzoo.plan(tiny(), pp=2, microbatches=16)
    assert [len(s.layers) for s in many.stages] == [4, 4]


def test_the_search_stops_at_its_budget(monkeypatch):
    """A budget of one split's actions: the search keeps the min-max split it started from."""
    config = LlamaConfig(**HEAVY_HEAD)
    free = ppzoo.plan(config, pp=2, schedule="ZBVZeroBubble", seq_len=128, microbatches=4)
    monkeypatch.setattr("ppzoo.split._SEARCH_ACTIONS", 1)
    capped = ppzoo.plan(config, pp=2, schedule="ZBVZeroBubble", seq_len=128, microbatches=4)
    units, unit_costs = _units(config, 128)
    assert tuple(len(s.layers) for s in capped.stages) != tuple(len(s.layers) for s in free.stages)
    start = min_max_bounds(unit_costs, 4)
    assert [s.cost for s in capped.stages] == pytest.approx([sum(unit_costs[a:b]) for a, b in zip(start, start[1:])])


def test_large_models_are_searched_locally():
    """32 layers in 16 stages is too many splits to simulate each: the local search from the
    min-max split still ends no slower than it, and every module is in exactly one stage."""
    from transformers import LlamaConfig as Config

    config = Config(**{k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "model_type", "torch_dtype")})
    result = ppzoo.plan(config, pp=8, schedule="ZBVZeroBubble", microbatches=16, dtype="bfloat16")
    units, unit_costs = _units(config, 2048)
    assert math.comb(len(units) - 1, result.num_stages - 1) > _EXHAUSTIVE_SPLITS
    flat = [m for s in result.stages for m in s.modules]
    assert flat == [m for unit in units for m in unit]
    start = min_max_bounds(unit_costs, result.num_stages)
    assert _step(result, unit_costs, units, microbatches=16) <= _step(result, unit_costs, units, start, microbatches=16)


# -- explicit stage_modules ----------------------------------------------------------------------


def test_stage_modules_are_accepted():
    split = [["model.embed_tokens", *LAYERS[:1]], LAYERS[1:7], [LAYERS[7], *HEAD]]
    result = ppzoo.plan(tiny(), pp=3, stage_modules=split)
    assert [list(s.modules) for s in result.stages] == split
    assert layers_of(result) == [[0], [1, 2, 3, 4, 5, 6], [7]]
    model = AutoModelForCausalLM.from_config(tiny())
    for stage in result.stages:
        assert stage.params == sum(numel(model.get_submodule(m)) for m in stage.modules)


@pytest.mark.parametrize(
    "split, message",
    [
        (
            [["model.embed_tokens", *LAYERS[:4]], [*LAYERS[4:], "model.layers.8", *HEAD]],
            "stage_modules[1] names unknown module 'model.layers.8'; known modules are 'model.embed_tokens' … "
            "'lm_head' (model.embed_tokens, model.layers.0-7, model.norm, lm_head)",
        ),
        (
            [["model.embed_tokens", *LAYERS[:4]], [*LAYERS[4:], "model.norm", "model.lm_head"]],
            "stage_modules[1] names unknown module 'model.lm_head'",
        ),
        (
            [["model.embed_tokens", *LAYERS[:5]], [*LAYERS[4:], *HEAD]],
            "module 'model.layers.4' is listed in stage 0 and again in stage 1",
        ),
        (
            [["model.embed_tokens", *LAYERS[:4]], [*LAYERS[4:], "lm_head"]],
            "stage_modules leaves ['model.norm'] in no stage; every module must be in exactly one stage",
        ),
        (
            [["model.embed_tokens", *LAYERS], [], HEAD],
            "stage_modules[1] is empty; every stage needs at least one module",
        ),
        (
            [["model.embed_tokens", *LAYERS[4:]], [*LAYERS[:4], *HEAD]],
            "stage_modules must keep forward order (inputs, layers in order, outputs) across stages",
        ),
    ],
    ids=["unknown-layer", "unknown-module", "repeated", "missing", "empty", "out-of-order"],
)
def test_stage_modules_errors(split, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ppzoo.plan(tiny(), pp=2, stage_modules=split)
