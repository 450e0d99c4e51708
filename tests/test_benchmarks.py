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


# -- benchmarks/peers.py: the ppzoo side always, the run itself when torchtitan is installed -------
def test_peers_split_is_torchtitans_default():
    from benchmarks import peers

    layers = [f"model.layers.{i}" for i in range(8)]
    # 8 layers + embedding + head = 10 units: 5 and 5 on two stages, 3, 3, 2, 2 on four
    assert peers.titan_split("1F1B", pp=2, num_layers=8) == [
        ["model.embed_tokens", *layers[:4]],
        [*layers[4:], "model.norm", "lm_head"],
    ]
    for schedule in ("Interleaved1F1B", "ZBVZeroBubble"):
        assert peers.titan_split(schedule, pp=2, num_layers=8) == [
            ["model.embed_tokens", *layers[:2]],
            layers[2:5],
            layers[5:7],
            [layers[7], "model.norm", "lm_head"],
        ]
    names = ["model.embed_tokens", *layers, "model.norm", "lm_head"]
    assert [peers.hf_name(peers.titan_name(n)) for n in names] == names
    assert (
        peers.titan_name("model.layers.3") == "layers.3" and peers.titan_name("model.embed_tokens") == "tok_embeddings"
    )
    with pytest.raises(ValueError, match="no torchtitan module"):
        peers.titan_name("model.rotary_emb")


def test_peers_split_matches_torchtitans_own_rule():
    pytest.importorskip("torchtitan")
    from torchtitan.distributed.pipeline_parallel import _generate_llm_fqn_per_model_part

    from benchmarks import peers

    for stages, schedule in ((2, "1F1B"), (4, "Interleaved1F1B")):
        for layers in (4, 8, 13):
            theirs = _generate_llm_fqn_per_model_part(stages, layers, 1, 1)
            ours = peers.titan_split(schedule, pp=2, num_layers=layers)
            assert [[peers.titan_name(m) for m in stage] for stage in ours] == theirs


def test_peers_summaries_and_loss_agreement():
    from benchmarks import peers

    # the step of each pair is the slower rank's
    got = peers.summarize([[1.0, 2.0, 3.0], [1.5, 1.0, 3.5]])
    assert got == {"steps_s": [1.5, 2.0, 3.5], "median_s": 2.0, "min_s": 1.5, "max_s": 3.5}
    assert peers.losses_agree([10.4140720, 10.3749819], [10.4140720, 10.3749810])  # one float32 ulp
    assert not peers.losses_agree([10.41407], [10.41409])
    assert not peers.losses_agree([1.0], [1.0, 1.0])
    assert peers.cpu_seconds([[1.0, 3.0, 2.0], [1.0, 1.0, 1.0]]) == 3.0
    assert peers._describe(["model.embed_tokens", "model.layers.0", "model.layers.1"]) == "emb+2L"
    assert peers._describe(["model.norm", "lm_head"]) == "head"


@pytest.mark.distributed
def test_peers_runs_both_runtimes_to_the_same_losses(tmp_path):
    pytest.importorskip("torchtitan")
    from benchmarks import peers

    config = common.llama_config("tiny", dtype="float32")
    directory = generate_checkpoint(tmp_path / "tiny", config, dtype="float32")
    case = dict(shape="tiny", seq_len=16, microbatches=4)
    rows = peers.run(directory, schedules=["1F1B", "ZBVZeroBubble"], split="titan", steps=2, warmup=0, case=case)
    for row in rows:
        assert row["losses_agree"], row["losses"]
        assert len(row["ppzoo"]["steps_s"]) == len(row["torchtitan"]["steps_s"]) == 2


# -- benchmarks/overhead.py: the per-microbatch table ------------------------------------------------
def test_overhead_microbatch_rows():
    from benchmarks import overhead

    # two ranks, 1F1B, 4 microbatches of stages costing 1 s and 2 s: the schedule takes 1/3 + 4 × 2 + 2/3 = 9 s
    rank = {
        "wall": [10.0, 11.0],
        "cpu": [9.0, 9.0],
        "stage_s": {0: 1.0},
        "stage_cpu_s": {0: 1.0},
        "collectives": {"all_gather": 1, "all_reduce": 1},
        "python_calls": 400,
    }
    other = dict(rank, wall=[9.5, 12.0], cpu=[8.5, 8.5], stage_s={1: 2.0}, stage_cpu_s={1: 2.0}, python_calls=600)
    (row,) = overhead.microbatch_rows([{4: rank}, {4: other}], schedule="1F1B", counts=[4])
    assert row["steps_s"] == [10.0, 12.0] and row["step_s"] == 11.0
    assert row["ideal_s"] == pytest.approx(9.0)
    assert row["overhead_per_mb_ms"] == pytest.approx(500.0)
    # rank 0: 9 s of CPU against 4 × 1 s of its stage; rank 1: 8.5 against 8
    assert row["cpu_overhead_per_mb_ms"] == pytest.approx(1250.0)
    assert row["python_calls_per_mb"] == 150 and row["collectives_per_step"] == 2


@pytest.mark.distributed
def test_overhead_microbatches_runs_end_to_end(tmp_path):
    from benchmarks import overhead

    out = tmp_path / "overhead.json"
    argv = ["--microbatches", "2", "4", "--steps", "1", "--warmup", "0", "--seq-len", "8", "--root", str(tmp_path)]
    assert overhead.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runtime"], r["microbatches"]) for r in rows] == [("ppzoo", 2), ("ppzoo", 4)]
    # the agreement exchange and the loss's all-reduce, whatever the microbatch count
    assert all(r["collectives_per_step"] == 2 and r["python_calls_per_mb"] > 0 for r in rows)
