"""The estimates ``ppzoo plan`` prints (``ppzoo.estimate``), on hand-computed numbers: activations,
training state, bubble fraction; ``tests/test_simulate.py`` checks the bubble against the simulated schedules."""

import pytest

import ppzoo
from ppzoo.estimate import (
    bubble_fraction,
    estimate_plan,
    layer_activation_bytes,
    stage_activation_bytes,
    training_state_bytes,
)


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
    assert stage_activation_bytes(layers=2, first=False, last=True, **common_args) == 2000 + 20 * (
        2 * 16 + 2 * 100 + 400
    )
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
