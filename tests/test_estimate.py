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


# -- layer shapes measured from the modules: every dense layer kind ---------------------------------
def _widths_from_config(model_type, cfg):
    """What each family's config says its layer is (the measurement never reads these names)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = h // heads
    if model_type in ("gpt2", "opt", "bloom"):
        kv_heads = heads
    elif model_type == "gpt_bigcode":
        kv_heads = 1 if cfg.multi_query else heads
    elif model_type == "falcon":
        kv_heads = cfg.num_kv_heads if cfg.new_decoder_architecture else 1 if cfg.multi_query else heads
    else:
        kv_heads = cfg.num_key_value_heads
    if model_type in ("gpt2", "gpt_bigcode"):
        mlp = cfg.n_inner or 4 * h
    elif model_type == "opt":
        mlp = cfg.ffn_dim
    elif model_type == "falcon":
        mlp = getattr(cfg, "ffn_hidden_size", None) or 4 * h
    elif model_type == "bloom":
        mlp = 4 * h
    else:
        mlp = cfg.intermediate_size
    gated = model_type in ("llama", "phi3")
    return dict(heads=heads, q_width=heads * head_dim, kv_width=kv_heads * head_dim, mlp_width=mlp, gated=gated)


SHAPED = [
    ("gpt2", {}),  # fused QKV as Conv1D, multi-head, non-gated MLP
    ("gpt_bigcode", {"multi_query": True}),  # multi-query, fused Conv1D
    ("falcon", {"multi_query": True}),  # multi-query, fused Linear
    ("falcon", {"multi_query": False}),  # multi-head, fused Linear
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # grouped-query, fused
    ("opt", {}),  # separate q/k/v, ffn_dim
    ("bloom", {}),  # fused QKV, 4h MLP without a width in the config
    ("llama", {}),  # grouped-query, gated MLP
    ("phi3", {}),  # fused QKV and gate_up, o_proj registered first
]


def _tiny(model_type, overrides):
    from ppzoo.testing.tiny_configs import tiny_config

    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("model_type, overrides", SHAPED, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_layer_shape_is_measured_from_the_layer(model_type, overrides):
    from ppzoo import registry
    from ppzoo.meta import meta_model

    config = _tiny(model_type, overrides)
    adapter = registry.adapter_for(config)
    layer = meta_model(config).get_submodule(adapter.fqn_layout(config).layer(0))
    shape = adapter.layer_shape(config, layer)
    want = _widths_from_config(model_type, config)
    assert {k: getattr(shape, k) for k in want} == want
    assert shape.hidden == config.hidden_size


def _saved_bytes_per_layer(config, seq_len):
    """Bytes autograd really keeps for the backward of each decoder layer (one sequence, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ppzoo import registry

    config._attn_implementation = "eager"
    layout = registry.adapter_for(config).fqn_layout(config)
    model = AutoModelForCausalLM.from_config(config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, saved = [None], {}
    for i in range(layout.num_layers):
        layer = model.get_submodule(layout.layer(i))
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        storage = t.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in params:
            saved.setdefault(current[0], {})[storage.data_ptr()] = storage.nbytes()  # a storage counts once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(3, config.vocab_size, (1, seq_len)))
    return [sum(saved[i].values()) for i in range(layout.num_layers)]


@pytest.mark.parametrize("model_type, overrides", SHAPED[:7], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_layer_estimate_follows_what_autograd_keeps(model_type, overrides):
    """The per-layer estimate is within the formula's reach of the tensors the real layer saves
    (dropout off; the formula leaves out small tensors and counts each kept tensor once)."""
    config = _tiny(model_type, overrides)
    for name, value in vars(config).items():
        if "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    seq_len = 64
    got = estimate_plan(ppzoo.plan(config, pp=2, layers_per_stage=2), config, seq_len=seq_len)
    real = _saved_bytes_per_layer(config, seq_len)
    last_stage = got["stages"][1]["activation_bytes_per_microbatch"]
    ends = stage_activation_bytes(
        layer_bytes=0,
        layers=0,
        first=False,
        last=True,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        seq_len=seq_len,
        element_bytes=4,
    )
    estimated = (last_stage - ends) / 2
    assert 0.65 < estimated / (sum(real[2:4]) / 2) < 1.4
