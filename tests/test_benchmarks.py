"""The estimators of ``ppzoo plan`` and the benchmarks' helpers, on hand-computed numbers (no timing)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ppzoo  # noqa: E402
from ppzoo import registry  # noqa: E402
from ppzoo.cli import main as cli_main  # noqa: E402
from ppzoo.estimate import (  # noqa: E402
    bubble_fraction, estimate_plan, layer_activation_bytes, stage_activation_bytes, training_state_bytes,
)

from benchmarks import common, step  # noqa: E402
from benchmarks.build import touch_parameters  # noqa: E402


# -- estimators ----------------------------------------------------------------------------------
def test_layer_activations_of_a_llama_layer():
    # h=2048, h_kv=4·64=256, I=5632, a=32, s=2048, bf16: per token 2·(6·2048 + 2·256 + 4·5632) = 70656
    # bytes of tensors plus 2·32·2048 = 131072 bytes of attention probabilities
    args = dict(hidden=2048, kv_hidden=256, intermediate=5632, heads=32, seq_len=2048, element_bytes=2)
    assert layer_activation_bytes(**args) == 2048 * (70656 + 131072) == 413_138_944
    # fused attention keeps a fp32 log-sum-exp per head instead: 4·32 bytes a token
    assert layer_activation_bytes(**args, fused_attention=True) == 2048 * (70656 + 128)
    assert layer_activation_bytes(**args, microbatch_size=3) == 3 * 413_138_944


def test_layer_activations_match_korthikanti_for_a_gpt_layer():
    # Korthikanti et al.: s·b·h·(34 + 5·a·s/h) bytes in fp16, of which dropout masks are s·b·h·2
    # and the attention's dropout mask and output s·b·h·3·a·s/h; a gated MLP adds two I-wide
    # tensors (I = 4h): 2 · 2 · 4h = 16h bytes a token.
    s, b, h, a = 512, 2, 1024, 16
    korthikanti = s * b * h * (34 + 5 * a * s / h)
    without_dropout = korthikanti - s * b * h * (2 + 3 * a * s / h)
    gated = without_dropout + s * b * 16 * h
    got = layer_activation_bytes(hidden=h, kv_hidden=h, intermediate=4 * h, heads=a, seq_len=s, microbatch_size=b)
    assert got == gated


def test_stage_activations_add_the_ends():
    layer = 1000
    common_args = dict(layer_bytes=layer, hidden=8, vocab=100, seq_len=10, microbatch_size=2, element_bytes=2)
    # a middle stage holds its output: e·h per token
    assert stage_activation_bytes(layers=3, first=False, last=False, **common_args) == 3000 + 20 * 2 * 8
    assert stage_activation_bytes(layers=3, first=True, last=False, **common_args) == 3000 + 20 * 2 * 8
    # the last: final norm (2·e·h), logits (e·V) and fp32 log-probabilities (4·V) per token
    assert stage_activation_bytes(layers=2, first=False, last=True, **common_args) == 2000 + 20 * (2 * 16 + 2 * 100 + 400)
    # a stage holding only the head
    assert stage_activation_bytes(layers=0, first=False, last=True, **common_args) == 20 * 632
    # a stage holding only the embedding keeps its output for the backward
    assert stage_activation_bytes(layers=0, first=True, last=False, **common_args) == 20 * 2 * 8


def test_training_state_bytes():
    assert training_state_bytes(1000, param_bytes=2) == 1000 * (2 + 2 + 8)
    assert training_state_bytes(1000, param_bytes=4) == 16_000
    assert training_state_bytes(1000, param_bytes=2, state_bytes=2) == 8000
    assert training_state_bytes(1000, param_bytes=2, grad_bytes=4, optimizer_states=0) == 6000


@pytest.mark.parametrize(
    "schedule, pp, m, v, expected",
    [
        ("GPipe", 4, 8, 1, 3 / 11),
        ("1F1B", 2, 4, 1, 1 / 5),
        ("Interleaved1F1B", 2, 4, 2, 1 / 9),
        ("interleaved1f1b", 4, 8, 3, 3 / 27),
        ("ZBVZeroBubble", 2, 4, 2, 1 / 25),
        ("InterleavedZeroBubble", 4, 8, 2, 3 / 51),
        ("ZBVZeroBubble", 4, 6, 2, None),  # fewer than 2·pp − 1 microbatches: not modelled
        ("DualPipeV", 2, 4, 2, None),
        ("LoopedBFS", 2, 4, 2, None),
        ("steps.csv", 2, 4, 2, None),
    ],
)
def test_bubble_fraction(schedule, pp, m, v, expected):
    got = bubble_fraction(schedule, pp=pp, microbatches=m, stages_per_rank=v)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble", "InterleavedZeroBubble"])
@pytest.mark.parametrize("pp, m", [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16)])
def test_bubble_fraction_is_what_the_schedule_simulation_gives(schedule, pp, m):
    v = 1 if schedule in ("GPipe", "1F1B") else 2
    ideal = step.ideal_efficiency(schedule, pp, m, stages_per_rank=v)
    assert 1 - bubble_fraction(schedule, pp=pp, microbatches=m, stages_per_rank=v) == pytest.approx(ideal)


def test_estimate_plan_on_the_tiny_llama():
    from transformers import LlamaConfig

    from ppzoo.architectures.llama import TINY

    config = LlamaConfig(**TINY)  # h=32, I=64, 4 heads of 8, 2 kv heads, vocab 96, 8 layers, fp32
    plan = ppzoo.plan(config, pp=2, layers_per_stage=4)
    got = estimate_plan(plan, config, seq_len=2048)
    # per layer and token: 4·(6·32 + 2·16 + 4·64) = 1920 bytes, probabilities 4·4·2048 = 32768
    layer = 2048 * (1920 + 32768)
    first = 4 * layer + 2048 * 4 * 32
    last = 4 * layer + 2048 * (4 * (2 * 32 + 96) + 4 * 96)
    assert [s["activation_bytes_per_microbatch"] for s in got["stages"]] == [first, last] == [284_426_240, 286_261_248]
    assert [s["training_state_bytes"] for s in got["stages"]] == [16 * s.params for s in plan.stages]
    assert got["microbatches"] == 2 and got["bubble_fraction"] == pytest.approx(1 / 3)
    assert estimate_plan(plan, config, seq_len=2048, microbatches=8)["bubble_fraction"] == pytest.approx(1 / 9)


def test_plan_cli_prints_and_dumps_estimates(tmp_path, capsys):
    from transformers import LlamaConfig

    from ppzoo.architectures.llama import TINY

    LlamaConfig(**TINY).save_pretrained(tmp_path)
    argv = ["plan", str(tmp_path), "--pp", "2", "--seq-len", "128", "--microbatch-size", "2", "--microbatches", "6",
            "--fused-attention"]
    assert cli_main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layer = 2 * 128 * (1920 + 4 * 4)
    assert data["estimates"]["stages"][0]["activation_bytes_per_microbatch"] == 4 * layer + 2 * 128 * 4 * 32
    assert (data["estimates"]["seq_len"], data["estimates"]["microbatch_size"]) == (128, 2)
    assert data["estimates"]["bubble_fraction"] == pytest.approx(1 / 7)
    assert cli_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("bubble with 6 microbatches: 14.3%")
    assert cli_main(["plan", str(tmp_path), "--pp", "2", "--schedule", "DualPipeV", "--microbatches", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("not modelled for this schedule")
    assert cli_main(["plan", str(tmp_path), "--pp", "2", "--seq-len", "0"]) == 2
    assert "--seq-len must be a positive integer, got 0" in capsys.readouterr().err


# -- benchmark helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-bf16")
    config = common.llama_config("tiny")
    return common.generate_checkpoint(directory, config, dtype="bfloat16", shard_bytes=100_000)


def test_generated_checkpoint_is_a_sharded_hf_checkpoint(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = common.checkpoint_files(tiny_checkpoint)
    assert len(shards) > 1
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in shards) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    assert model.model.norm.weight.eq(1).all()
    std = model.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02
    # reused as it is when asked again for the same config
    stamp = (tiny_checkpoint / shards[0].name).stat().st_mtime_ns
    common.generate_checkpoint(tiny_checkpoint, common.llama_config("tiny"), dtype="bfloat16", shard_bytes=100_000)
    assert (tiny_checkpoint / shards[0].name).stat().st_mtime_ns == stamp


def test_touch_parameters_leaves_values_alone(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    touch_parameters(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_balanced_split_is_the_previous_plan():
    config = common.llama_config("small", dtype="float32")
    layers = [f"model.layers.{i}" for i in range(8)]
    # one stage a rank: 7 layers against 1 layer and the 32k-vocab head (which costs ~7.7 layers)
    split = step.layer_balanced_split(config, pp=2, schedule="1F1B", seq_len=128)
    assert split == [["model.embed_tokens", *layers[:7]], [layers[7], "model.norm", "lm_head"]]
    split = step.layer_balanced_split(config, pp=2, schedule="ZBVZeroBubble", seq_len=128)
    assert len(split) == 4 and all(any(m.startswith("model.layers.") for m in stage) for stage in split)
    assert [m for stage in split for m in stage] == ["model.embed_tokens", *layers, "model.norm", "lm_head"]


def test_backward_split_times_the_same_gradients(tiny_checkpoint):
    from benchmarks import backward_split

    # measure() first checks that the full and the split backward give the same gradients
    times = backward_split.measure(tiny_checkpoint, seq_len=16, batch_size=1, pairs=2, warmup=1)
    assert len(times["full"]) == len(times["split"]) == 2
    assert all(t[0] > 0 and t[1] > 0 and t[2] == 0 for t in times["full"])
    assert all(t[0] > 0 and t[1] > 0 and t[2] > 0 for t in times["split"])


def test_measured_ideal_step():
    # balanced 2 stages, 1 s a microbatch: (m + pp − 1) = 5 s for 1F1B; 4 s of work a rank on ZBV
    assert step.measured_ideal_step("1F1B", 2, 4, [1.0, 1.0]) == pytest.approx(5.0)
    assert step.measured_ideal_step("ZBVZeroBubble", 2, 4, [0.5] * 4) == pytest.approx(4 / 0.96)
    # a last stage twice as slow is the bottleneck: 4 of its microbatches plus stage 0's first
    assert step.measured_ideal_step("1F1B", 2, 4, [1.0, 2.0]) == pytest.approx(1 / 3 + 4 * 2 + 2 / 3)


def test_table_and_json(tmp_path):
    text = common.table([{"a": 1, "b": 0.5}, {"a": 22, "b": None}], ["a", "b"])
    assert text.splitlines() == [" a      b", " 1  0.500", "22      -"]
    common.write_json(tmp_path / "x" / "r.json", {"k": [1]})
    assert json.loads((tmp_path / "x" / "r.json").read_text()) == {"k": [1]}
    assert {"cpu", "cores", "torch", "transformers", "load_avg"} <= set(common.machine())


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    from benchmarks import gpu_check

    out = tmp_path / "summary.json"
    assert gpu_check.main(["--device", "cpu", "--small", "--seq-len", "16", "--batch-size", "1",
                           "--dir", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["logits_max_abs_diff"] == 0.0
    assert summary["stage_bytes"] <= summary["file_bytes"]
    assert set(summary["stage_build"]) == {"cold", "warm"}
    assert summary["chain_fwd_bwd_s"] > 0
