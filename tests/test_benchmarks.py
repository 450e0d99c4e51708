"""The benchmarks' own helpers, on hand-computed numbers (no timing); run as ``python -m benchmarks.<name>``.

What the benchmarks measure with (``ppzoo.estimate``, ``ppzoo.simulate``, ``ppzoo.testing.synthetic``)
is tested in the files named for those modules.
"""

import json

import pytest
import torch

from benchmarks import common, step
from benchmarks.build import touch_parameters
from ppzoo.testing.synthetic import generate_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-bf16")
    config = common.llama_config("tiny")
    return generate_checkpoint(directory, config, dtype="bfloat16", shard_bytes=100_000)


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
    assert (
        gpu_check.main(
            [
                "--device",
                "cpu",
                "--small",
                "--seq-len",
                "16",
                "--batch-size",
                "1",
                "--dir",
                str(tmp_path / "ckpt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads(out.read_text())
    assert summary["logits_max_abs_diff"] == 0.0
    assert summary["stage_bytes"] <= summary["file_bytes"]
    assert set(summary["stage_build"]) == {"cold", "warm"}
    assert summary["chain_fwd_bwd_s"] > 0
