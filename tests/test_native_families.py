"""Families the native adapter runs by carrying more than the hidden states across a stage boundary.

Gemma 3n and Gemma 4 give every decoder layer a per-layer input computed from the token ids and
the embeddings, Gemma 3n's later layers reuse the keys and values an earlier layer stored, and
its AltUp hidden states are four streams deep; the native adapter carries all of it across the
boundary (``ppzoo.architectures.native.boundary``). Each is checked as the zoo checks a type
(the stage chain against the unsplit model, dropout included), and through the 2-rank pipeline;
so is Gemma 4's unified text model, whose config holds its head size per layer.
"""

import pytest

import ppzoo
from ppzoo import registry
from ppzoo.architectures.native import NativeAdapter, layout
from ppzoo.testing import census
from ppzoo.testing.tiny_configs import tiny_config
from ppzoo.validation import ValidationError

#: model type -> what crosses its stage boundary besides the hidden states
CARRIED = {
    "gemma4_text": "per-layer inputs",
    "gemma3n_text": "per-layer inputs, shared keys and values, AltUp's stacked hidden states",
}
#: model type -> what the native adapter reads per layer instead of from the config
PER_LAYER_SIZES = {"gemma4_unified_text": "head_dim, which its config holds per layer (per_layer_config)"}


@pytest.mark.parametrize("model_type", sorted({**CARRIED, **PER_LAYER_SIZES}))
def test_the_zoo_finds_these_families_exact(model_type):
    (result,) = census.zoo([model_type], isolate=False)
    assert (result.adapter, result.result) == ("native", "exact"), result.detail


def test_the_boundary_carries_what_later_layers_read():
    adapter = NativeAdapter()
    gemma3n = tiny_config("gemma3n_text")
    boundary = layout.discover(gemma3n).boundary
    layers = gemma3n.num_hidden_layers
    per_layer = [s for s in boundary.slots if s.kind == "argument"]
    assert [s.uses for s in per_layer] == [((i, "per_layer_input", 2),) for i in range(layers)]
    states = [s for s in boundary.slots if s.kind == "state"]
    assert states and {s.name for s in states} == {"shared_kv_states"}
    assert {s.element for s in states} == {0, 1}  # keys and values
    hidden = gemma3n.altup_num_inputs * gemma3n.hidden_size
    width = hidden + layers * gemma3n.hidden_size_per_layer_input + sum(s.packing.width for s in states)
    assert adapter.boundary_width(gemma3n) == width
    # Gemma 4 stores keys and values for readers outside the model: with no layer reusing them,
    # nothing but the per-layer inputs is carried
    gemma4 = tiny_config("gemma4_text")
    width = gemma4.hidden_size + gemma4.num_hidden_layers * gemma4.hidden_size_per_layer_input
    assert adapter.boundary_width(gemma4) == width
    # a model whose layers read only the hidden states hands on (batch, seq, hidden_size)
    gpt2 = tiny_config("gpt2")
    assert not layout.discover(gpt2).boundary.carries
    assert adapter.boundary_width(gpt2) == gpt2.hidden_size


def test_a_block_shared_by_layers_stays_refused_with_the_reason():
    config = tiny_config("zamba")
    problems = registry.adapter_for(config).validate(config)
    assert [p.code for p in problems] == ["native-tied"]
    assert "model.layers.3.shared_transf." in problems[0].message and "not a block" in problems[0].message


def test_a_value_one_layer_hands_the_next_stays_refused():
    # GLM-MoE-DSA's indexer hands its top-k token indices to the next layer
    problems = NativeAdapter().validate(tiny_config("glm_moe_dsa"))
    assert [p.code for p in problems] == ["native-layer-input"]
    assert "'prev_topk_indices' is computed from layer 0" in problems[0].message


def test_a_zero_bubble_schedule_is_refused_where_torch_cannot_split_the_backward():
    # Gemma 3n's AltUp router runs in each layer's prediction and again, on a value computed
    # with it, in its correction; torch's weight pass cannot take that gradient apart
    config = tiny_config("gemma3n_text")
    assert ppzoo.plan(config, pp=2, schedule="1F1B").num_stages == 2
    with pytest.raises(ValidationError) as raised:
        ppzoo.plan(config, pp=2, schedule="ZBVZeroBubble")
    assert [p.code for p in raised.value.problems] == ["native-split-backward"]
    assert "altup.router_norm.weight" in str(raised.value) and "(1F1B, GPipe" in str(raised.value)


@pytest.mark.distributed
def test_carried_families_train_through_the_pipeline():
    from ppzoo.testing.step import distributed_step_problems

    gemma4 = [census.zoo_adapter(t) for t in ("gemma4_text", "gemma4_unified_text")]
    gemma3n = census.zoo_adapter("gemma3n_text")
    problems = distributed_step_problems(gemma4, schedules=("1F1B", "ZBVZeroBubble"))
    # Gemma 3n refuses zero-bubble schedules (above)
    problems |= distributed_step_problems([gemma3n], schedules=("1F1B",))
    assert problems == {a.name: [] for a in (*gemma4, gemma3n)}


def test_tensor_parallel_reads_a_per_layer_head_count_per_layer():
    from transformers import Gemma4TextConfig

    # Gemma 4's 26B and 31B checkpoints give their full-attention layers key/value heads of their own
    config = Gemma4TextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    with pytest.raises(ValidationError) as raised:
        ppzoo.plan(config, pp=2, tp=2)
    assert [str(p.message) for p in raised.value.problems] == [
        "tp=2 must divide num_key_value_heads=1; choose a tp that divides them"
    ]


# -- the lookup on a real-size config ------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen3-next-80b-a3b", "jamba-v0.1"])
def test_the_key_check_on_fewer_experts_finds_what_the_full_model_does(monkeypatch, name):
    from test_real_size_plans import config_of

    config = config_of(name)
    checked = []
    check_keys = layout.checkpoint_renames

    def spy(model, kind, *, check=None):
        checked.append(check)
        return check_keys(model, kind, check=check)

    monkeypatch.setattr(layout, "checkpoint_renames", spy)
    shrunk = layout._discover(config)
    monkeypatch.setattr(layout, "_fewer_experts_model", lambda config: None)
    full = layout._discover(config)
    assert checked[0] is not None and checked[1] is None  # the key check ran on fewer experts, then all
    assert isinstance(full, layout.NativeLayout)
    assert shrunk == full


def test_fewer_experts_changes_the_expert_count_only():
    from test_real_size_plans import config_of

    config = config_of("deepseek-v3")
    fewer = layout._fewer_experts(config)
    # the routing still works: 8 groups of 2, top-8 from the 4 groups kept
    assert fewer.n_routed_experts == 16 and config.n_routed_experts == 256
    assert {k: v for k, v in fewer.to_dict().items() if k != "n_routed_experts"} == {
        k: v for k, v in config.to_dict().items() if k != "n_routed_experts"
    }


def test_fewer_experts_keeps_the_routing_valid_and_the_layer_list_unique():
    from transformers import AutoConfig

    assert layout._fewer_experts(tiny_config("gpt2")) is None  # no experts
    mixtral = AutoConfig.for_model("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=4)
    assert layout._fewer_experts(mixtral).num_local_experts == 2
    # 2 experts would make a second list of num_hidden_layers modules
    mixtral = AutoConfig.for_model("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    assert layout._fewer_experts(mixtral).num_local_experts == 3
    few = AutoConfig.for_model("mixtral", num_local_experts=2, num_experts_per_tok=2, num_hidden_layers=6)
    assert layout._fewer_experts(few) is None  # no fewer to go to
    grouped = AutoConfig.for_model(
        "deepseek_v3", n_routed_experts=64, n_group=4, topk_group=2, num_experts_per_tok=6, num_hidden_layers=8
    )
    # 3 per group so that the 2 groups kept hold the top-6
    assert layout._fewer_experts(grouped).n_routed_experts == 12


def test_the_watched_forward_finds_the_tensors_pytree_finds():
    import torch
    from torch.utils._pytree import tree_flatten

    from ppzoo.architectures.native.trace import _tensors

    a, b, c = torch.ones(1), torch.ones(2), torch.ones(3)
    tree = ((a, [b, 2, None], "x"), {"out": c, "dim": 1}, torch.return_types.max((a, b)))
    assert [id(t) for t in _tensors(tree)] == [id(t) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
