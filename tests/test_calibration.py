"""Measured costs (``ppzoo.calibration``): what feeds the split, and the optimizer's share.

No assertion here is about how long anything takes: the measurements are random on a shared
machine; what is tested is where they go.
"""

import dataclasses
import os

import pytest
from transformers import LlamaConfig

import ppzoo
from ppzoo import calibration, simulate
from ppzoo.architectures.llama import TINY
from ppzoo.split import balanced_bounds

LAYERS = [f"model.layers.{i}" for i in range(8)]
INPUTS, OUTPUTS = ("model.embed_tokens",), ("model.norm", "lm_head")


def tiny(**overrides):
    return LlamaConfig(**{**TINY, **overrides})


def costs(*, layer=1.0, head_layers=1.0, embed=0.0, optimizer_per_param=0.0):
    """Hand-made measurements of the tiny Llama: each layer's forward + backward ``layer`` s, the head's
    ``head_layers`` layers'."""
    forward = {m: layer / 3 for m in LAYERS} | {m: embed / 3 for m in INPUTS}
    forward |= {m: head_layers * layer / 3 / len(OUTPUTS) for m in OUTPUTS}
    backward = {m: 2 * v for m, v in forward.items()}
    return calibration.MeasuredCosts(
        forward=forward,
        backward=backward,
        optimizer_per_param=optimizer_per_param,
        device="cpu",
        dtype="float32",
        seq_len=128,
        microbatch_size=1,
        threads=1,
    )


def last_stage_layers(result):
    return len(result.stages[-1].layers)


def test_measured_weights_feed_the_split():
    result = ppzoo.plan(tiny(), pp=2, microbatches=8, cost=costs(head_layers=0.0))
    assert result.cost_model == "measured"
    # NOTE: a stage's cost is the sum of its modules' unit costs, a third of forward + backward
    assert [s.cost for s in result.stages] == pytest.approx([len(s.layers) / 3 for s in result.stages])
    assert [len(s.layers) for s in result.stages] == [4, 4]


def test_a_head_measured_as_k_layers_moves_the_split():
    held = [last_stage_layers(ppzoo.plan(tiny(), pp=2, microbatches=8, cost=costs(head_layers=k))) for k in (0, 2, 6)]
    # NOTE: 8 layers: a head of k layers leaves the last stage (8 - k) / 2 of them
    assert held == [4, 3, 1]


def test_flops_plans_are_unchanged_by_the_cost_option():
    assert ppzoo.plan(tiny(), pp=2) == ppzoo.plan(tiny(), pp=2, cost="flops")


def test_unknown_cost_is_refused():
    with pytest.raises(ValueError, match="cost must be"):
        ppzoo.plan(tiny(), pp=2, cost="guess")


def test_measured_costs_of_another_model_are_refused():
    other = costs()
    other = dataclasses.replace(other, forward={k: v for k, v in other.forward.items() if k != "lm_head"})
    with pytest.raises(ValueError, match="measured for another model"):
        ppzoo.plan(tiny(), pp=2, cost=other)


# -- the optimizer's step -------------------------------------------------------------------------


def test_step_costs_add_to_their_rank_finish():
    order = simulate.schedule_order("1F1B", pp=2, microbatches=4)
    run = simulate.compile_order(order, 2)
    base = run([1.0, 1.0])
    assert run([1.0, 1.0], [0.0, 0.0]) == base
    # NOTE: under 1F1B rank 0 finishes last, so its optimizer adds in full; rank 1's hides
    # behind rank 0's last backwards until it is longer than them
    assert run([1.0, 1.0], [0.5, 0.0]) == pytest.approx(base + 0.5)
    assert run([1.0, 1.0], [0.0, 0.5]) == pytest.approx(base)
    assert run([1.0, 1.0], [0.0, 5.0]) > base


def test_the_optimizer_term_grows_a_stage_cost_with_its_parameters():
    """Under 1F1B the first rank finishes last: the dearer each unit's optimizer step, the fewer
    units the first stage keeps (never more)."""
    units = [0.0] + [1.0] * 8 + [1.0]
    cuts = [
        balanced_bounds(units, 2, schedule="1F1B", pp=2, microbatches=4, step_costs=[0.0] + [price] * 9)[1]
        for price in (0.0, 1.0, 4.0, 8.0)
    ]
    assert cuts == sorted(cuts, reverse=True) and cuts[-1] < cuts[0]


def test_plan_prices_each_stage_optimizer_by_its_parameters():
    """An optimizer priced per parameter moves layers off the first stage, which finishes last."""
    held = [
        len(
            ppzoo.plan(tiny(), pp=2, microbatches=4, cost=costs(head_layers=2.0, optimizer_per_param=price))
            .stages[0]
            .layers
        )
        for price in (0.0, 1e-4, 1e-3)
    ]
    assert held == sorted(held, reverse=True) and held[-1] < held[0]


# -- the measurement itself -----------------------------------------------------------------------


def test_measure_costs_times_every_module_once_per_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("PPZOO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "_MEMORY", {})
    config = tiny(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=8)
    result = ppzoo.plan(config, pp=2, seq_len=16, cost="measured")
    assert result.cost_model == "measured"
    (measured,) = calibration._MEMORY.values()
    layers = [f"model.layers.{i}" for i in range(4)]
    assert set(measured.forward) == set(INPUTS + tuple(layers) + OUTPUTS) == set(measured.backward)
    assert all(measured.forward[m] > 0 and measured.backward[m] > 0 for m in layers + list(OUTPUTS))
    assert measured.optimizer_per_param > 0
    # NOTE: two kinds (full and sliding attention): layers of a kind cost alike
    assert measured.forward[layers[0]] == measured.forward[layers[2]]
    assert measured.forward[layers[1]] == measured.forward[layers[3]]
    # NOTE: measured once: kept in memory and on disk
    (stored,) = os.listdir(tmp_path / "costs")
    monkeypatch.setattr(calibration, "_MEMORY", {})
    assert calibration._load(stored.removesuffix(".json")) == measured
    again = ppzoo.plan(config, pp=2, seq_len=16, cost="measured")
    assert again == result


# -- the pipeline ---------------------------------------------------------------------------------


def _measured_pipeline(rank, world, directory, cache):
    import torch

    from ppzoo.testing.reference import load_reference

    os.environ["PPZOO_CACHE_DIR"] = cache
    pipe = ppzoo.pipeline(directory, pp=world, microbatches=4, seq_len=16, device="cpu", cost="measured")
    ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    loss = float(pipe.step(ids, labels=ids))
    reference = load_reference(directory)
    expected = float(reference(input_ids=ids, labels=ids).loss)
    return {
        "stages": [list(s.ppzoo_stage.modules) for s in pipe.stages],
        "measured_here": len(calibration._MEMORY),
        "loss": loss,
        "expected": expected,
    }


@pytest.mark.distributed
def test_pipeline_measures_on_rank_0_and_every_rank_splits_alike(tmp_path):
    from ppzoo import registry
    from ppzoo.testing.distributed import run_distributed
    from ppzoo.testing.reference import save_tiny_model

    directory = save_tiny_model(registry.adapters()["llama"], tmp_path / "llama")
    results = run_distributed(_measured_pipeline, 2, str(directory), str(tmp_path / "cache"), timeout_s=600)
    assert [r["measured_here"] for r in results] == [1, 0]
    stages = [m for r in results for s in r["stages"] for m in s]
    assert stages == list(INPUTS) + LAYERS + list(OUTPUTS)
    assert os.listdir(tmp_path / "cache" / "costs")
    for r in results:
        assert r["loss"] == pytest.approx(r["expected"], rel=1e-5)
