"""The plan (``ppzoo.planner``): stage count, rank placement, sizes, full-size configs and errors.

How modules are split into stages (the split search, explicit ``stage_modules``) is in
``tests/test_split.py``; the cost model the split balances, in ``tests/test_cost.py``. The
conformance kit checks, per adapter, that plans of every placement kind keep forward order and
count parameters right.
"""

import json
import re

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, BertConfig, LlamaConfig

import ppzoo
from ppzoo import registry
from ppzoo.architectures.llama import TINY

LAYERS = [f"model.layers.{i}" for i in range(8)]
HEAD = ["model.norm", "lm_head"]


def tiny(**overrides):
    return LlamaConfig(**{**TINY, **overrides})


def numel(module):
    return sum(p.numel() for p in module.parameters())


def layers_of(result):
    return [list(s.layers) for s in result.stages]


# -- stage count and placement -----------------------------------------------------------------


def test_one_stage_per_rank_for_1f1b():
    result = ppzoo.plan(tiny(), pp=2, microbatches=8)
    assert result.num_stages == 2
    assert [s.rank for s in result.stages] == [0, 1]
    assert result.placement == "loop"
    assert result.stages[0].modules == ("model.embed_tokens", *LAYERS[:4])
    assert result.stages[1].modules == (*LAYERS[4:], *HEAD)


@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble"])
def test_loop_placement(schedule):
    result = ppzoo.plan(tiny(), pp=2, schedule=schedule)
    assert result.num_stages == 4  # two stages a rank by default
    assert [s.rank for s in result.stages] == [0, 1, 0, 1]
    assert result.placement == "loop"
    assert result.stages_for_rank(0) == [result.stages[0], result.stages[2]]


def test_loop_placement_with_more_stages_per_rank():
    result = ppzoo.plan(tiny(), pp=2, schedule="interleaved1f1b", stages_per_rank=4)
    assert [s.rank for s in result.stages] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert layers_of(result) == [[i] for i in range(8)]


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
@pytest.mark.parametrize("pp, ranks", [(2, [0, 1, 1, 0]), (3, [0, 1, 2, 2, 1, 0]), (4, [0, 1, 2, 3, 3, 2, 1, 0])])
def test_v_placement(schedule, pp, ranks):
    result = ppzoo.plan(tiny(), pp=pp, schedule=schedule)
    assert result.placement == "v"
    assert [s.rank for s in result.stages] == ranks
    # rank r holds stages r and 2·pp − 1 − r
    for r in range(pp):
        assert [s.index for s in result.stages_for_rank(r)] == [r, 2 * pp - 1 - r]


def test_stages_cover_every_module_once_in_forward_order():
    for pp, schedule in [(1, "GPipe"), (2, "1F1B"), (3, "Interleaved1F1B"), (4, "ZBVZeroBubble"), (8, "1F1B")]:
        result = ppzoo.plan(tiny(), pp=pp, schedule=schedule)
        flat = [m for s in result.stages for m in s.modules]
        assert flat == ["model.embed_tokens", *LAYERS, *HEAD], (pp, schedule)
        assert all(s.layers for s in result.stages)


def test_layers_per_stage():
    result = ppzoo.plan(tiny(), pp=3, layers_per_stage=3)
    assert layers_of(result) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    result = ppzoo.plan(tiny(), pp=2, schedule="Interleaved1F1B", layers_per_stage=2)
    assert layers_of(result) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [s.rank for s in result.stages] == [0, 1, 0, 1]


def test_csv_schedule_uses_loop_placement():
    result = ppzoo.plan(tiny(), pp=2, schedule="my_schedule.csv", stages_per_rank=2)
    assert result.schedule == "my_schedule.csv"
    assert [s.rank for s in result.stages] == [0, 1, 0, 1]


def test_stage_modules_with_interleaved_schedule():
    split = [["model.embed_tokens", *LAYERS[:2]], LAYERS[2:4], LAYERS[4:6], [*LAYERS[6:], *HEAD]]
    result = ppzoo.plan(tiny(), pp=2, schedule="Interleaved1F1B", stage_modules=split)
    assert [s.rank for s in result.stages] == [0, 1, 0, 1]


def test_stage_modules_count_must_fit_pp():
    split = [["model.embed_tokens", *LAYERS[:3]], LAYERS[3:6], [*LAYERS[6:], *HEAD]]
    with pytest.raises(ValueError, match=re.escape("3 stages cannot be spread evenly over pp=2 ranks")):
        ppzoo.plan(tiny(), pp=2, stage_modules=split)


# -- parameter counts and bytes --------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_total_params_counts_unique_parameters(tied):
    config = tiny(tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    result = ppzoo.plan(config, pp=2)
    assert result.total_params == model.num_parameters()
    head = model.lm_head.weight.numel()
    # a stage counts what it holds: the tied head copy counts on the last stage too
    assert sum(s.params for s in result.stages) == model.num_parameters() + (head if tied else 0)
    last = result.stages[-1]
    assert last.params == sum(numel(model.get_submodule(m)) for m in last.modules)
    assert last.params == sum(
        p.numel()
        for n, p in model.named_parameters(remove_duplicate=False)
        if any(n.startswith(m + ".") for m in last.modules)
    )


@pytest.mark.parametrize("dtype, size", [(None, 4), ("bfloat16", 2), (torch.float16, 2), ("float32", 4)])
def test_bytes_follow_the_dtype(dtype, size):
    result = ppzoo.plan(tiny(), pp=2, dtype=dtype)
    assert [s.bytes for s in result.stages] == [s.params * size for s in result.stages]


def test_bytes_default_to_the_config_dtype():
    result = ppzoo.plan(tiny(dtype="bfloat16"), pp=2)
    assert result.dtype == "bfloat16"
    assert [s.bytes for s in result.stages] == [2 * s.params for s in result.stages]


def test_to_dict_is_json_with_one_fqn_per_layer():
    result = ppzoo.plan(tiny(), pp=2, microbatches=8)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["total_params"] == result.total_params
    assert [set(s) for s in data["stages"]] == [{"index", "rank", "modules", "params", "bytes"}] * 2
    assert data["stages"][0]["modules"] == ["model.embed_tokens", *LAYERS[:4]]
    assert data["stages"][1]["modules"] == [*LAYERS[4:], *HEAD]


# -- from a directory, and full-size configs -------------------------------------------------------


LLAMA_8B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
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
    torch_dtype="bfloat16",
)


class _RealTensors(TorchDispatchMode):
    """Records every tensor an operator returns that is not on the meta device."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.created.append(f"{func}: {tuple(leaf.shape)} on {leaf.device}")
        return out


def test_real_tensor_watch_sees_real_tensors():
    with _RealTensors() as watch:
        torch.zeros(3)
        with torch.device("meta"):
            torch.zeros(5)
    assert len(watch.created) == 1 and "(3,)" in watch.created[0]


def test_llama_8b_config_plans_without_allocating_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    with _RealTensors() as watch:
        result = ppzoo.plan(tmp_path, pp=4, schedule="Interleaved1F1B")
    assert watch.created == []
    assert result.total_params == 8_030_261_248  # Llama-3-8B
    assert sum(s.params for s in result.stages) == result.total_params
    assert [s.bytes for s in result.stages] == [2 * s.params for s in result.stages]  # bfloat16 config
    assert result.num_stages == 8
    assert sum(len(s.layers) for s in result.stages) == 32
    # the 128k-vocab head weighs on the last stage: it gets fewer layers than the others
    assert len(result.stages[-1].layers) < min(len(s.layers) for s in result.stages[1:-1])


def test_plan_from_a_directory_with_config_only(tmp_path):
    tiny().save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert ppzoo.plan(tmp_path, pp=2) == ppzoo.plan(tiny(), pp=2)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pp=0), "pp must be an integer >= 1, got 0"),
        (dict(pp=-2), "pp must be an integer >= 1, got -2"),
        (dict(pp="2"), "pp must be an integer >= 1, got '2'"),
        (
            dict(pp=9),
            "9 stages (pp=9 × 1 per rank) is more than the model's 8 layers; lower pp or stages per rank",
        ),
        (
            dict(pp=3, schedule="Interleaved1F1B", stages_per_rank=3),
            "9 stages (pp=3 × 3 per rank) is more than the model's 8 layers",
        ),
        (
            dict(pp=5, schedule="ZBVZeroBubble"),
            "10 stages (pp=5 × 2 per rank) is more than the model's 8 layers; lower pp or stages per rank",
        ),
        (
            dict(pp=2, layers_per_stage=3),
            "3 stages cannot be spread evenly over pp=2 ranks; choose a stage count divisible by 2",
        ),
        (
            dict(pp=2, schedule="ZBVZeroBubble", stages_per_rank=3),
            "schedule ZBVZeroBubble needs V placement with exactly two stages per rank, got 3",
        ),
        (
            dict(pp=4, schedule="DualPipeV", layers_per_stage=2),
            "schedule DualPipeV needs V placement with exactly two stages per rank, got 1",
        ),
        (
            dict(pp=1, schedule="ZBVZeroBubble", stages_per_rank=1),
            "schedule ZBVZeroBubble needs V placement with exactly two stages per rank, got 1",
        ),
        (
            dict(pp=2, layers_per_stage=2),
            "schedule 1F1B runs one stage per rank, but the plan puts 2 on each",
        ),
        (
            dict(pp=2, schedule="Interleaved1F1B", stages_per_rank=2, layers_per_stage=1),
            "stages_per_rank=2 but the split has 4 stages per rank",
        ),
        (dict(pp=None), "pp must be an integer >= 1, got None"),
        (dict(pp=2, layers_per_stage=0), "layers_per_stage must be an integer >= 1, got 0"),
        (dict(pp=2, layers_per_stage=2.5), "layers_per_stage must be an integer >= 1, got 2.5"),
        (dict(pp=2, schedule="Interleaved1F1B", stages_per_rank=0), "stages_per_rank must be an integer >= 1, got 0"),
        (dict(pp=2, schedule="my.csv", stages_per_rank=-1), "stages_per_rank must be an integer >= 1, got -1"),
        (dict(pp=2, stages_per_rank=1.5), "stages_per_rank must be an integer >= 1, got 1.5"),
        (dict(pp=2, microbatches=0), "microbatches must be an integer >= 1, got 0"),
        (
            dict(pp=2, schedule="PipeDream"),
            "unknown schedule 'PipeDream'; use one of GPipe, 1F1B, Interleaved1F1B, LoopedBFS, "
            "InterleavedZeroBubble, ZBVZeroBubble, DualPipeV, or a path to a .csv schedule",
        ),
        (
            dict(pp=2, dtype="float33"),
            "dtype 'float33' is not a torch dtype; use e.g. bfloat16, float16 or float32",
        ),
        (
            dict(pp=2, layers_per_stage=2, stage_modules=[LAYERS]),
            "pass either stage_modules or layers_per_stage, not both",
        ),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ppzoo.plan(tiny(), **kwargs)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{str(tmp_path)!r} has no config.json")):
        ppzoo.plan(tmp_path, pp=2)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no directory {str(missing)!r}")):
        ppzoo.plan(missing, pp=2)


def test_unknown_architecture():
    with pytest.raises(
        registry.UnknownArchitectureError, match="^no ppzoo adapter for model_type 'bert'; registered: "
    ):
        ppzoo.plan(BertConfig(), pp=2)


@pytest.mark.distributed
def test_planning_does_not_load_the_runtime(tmp_path):
    """``import ppzoo`` and a plan leave torch.distributed.pipelining unloaded; the runtime names still work."""
    import subprocess
    import sys

    tiny().save_pretrained(tmp_path)
    script = f"""
import sys, types
import ppzoo
ppzoo.plan({str(tmp_path)!r}, pp=2)
assert "torch.distributed.pipelining" not in sys.modules, "the plan loaded the runtime"
import ppzoo.runtime
from ppzoo import Pipeline, pipeline
assert isinstance(ppzoo.pipeline, types.FunctionType) and ppzoo.pipeline is pipeline, ppzoo.pipeline
assert isinstance(ppzoo.Pipeline, type) and ppzoo.Pipeline is Pipeline
assert isinstance(ppzoo.plan, types.FunctionType), ppzoo.plan
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
