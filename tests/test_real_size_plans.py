"""Plans of released models at full size, from their configs alone (no weights exist here).

Each config is the published ``config.json``'s hyperparameters (written out below), built through
transformers' config classes. The plans must count every parameter (as transformers' own model,
built on the meta device, counts them; and near the published total), size every stage, price
each layer by what it holds (routed experts by top-k, Mamba and linear-attention layers without
the attention term, a recurrent state instead), balance the stages by those prices, and leave
out the multi-token prediction layers a checkpoint ships, saying so.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint, CheckpointError
from ppzoo.cost import STATE_FLOPS, module_costs
from ppzoo.meta import meta_model

SEQ = 2048

#: deepseek-ai/DeepSeek-V3 (quantization_config left out: the plan does not depend on it)
DEEPSEEK_V3 = dict(
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_nextn_predict_layers=1,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="noaux_tc",
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    max_position_embeddings=163840,
    rope_theta=10000,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
#: zai-org/GLM-4.5-Air
GLM_45_AIR = dict(
    model_type="glm4_moe",
    attention_bias=True,
    head_dim=128,
    hidden_size=4096,
    partial_rotary_factor=0.5,
    intermediate_size=10944,
    max_position_embeddings=131072,
    moe_intermediate_size=1408,
    norm_topk_prob=True,
    num_attention_heads=96,
    n_group=1,
    topk_group=1,
    n_routed_experts=128,
    n_shared_experts=1,
    routed_scaling_factor=1.0,
    num_experts_per_tok=8,
    first_k_dense_replace=1,
    num_hidden_layers=46,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=1000000,
    num_nextn_predict_layers=1,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    use_qk_norm=False,
    vocab_size=151552,
)
#: Qwen/Qwen3-Next-80B-A3B-Instruct
QWEN3_NEXT = dict(
    model_type="qwen3_next",
    decoder_sparse_step=1,
    full_attention_interval=4,
    head_dim=256,
    hidden_size=2048,
    intermediate_size=5120,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=128,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_value_head_dim=128,
    max_position_embeddings=262144,
    mlp_only_layers=[],
    moe_intermediate_size=512,
    norm_topk_prob=True,
    num_attention_heads=16,
    num_experts=512,
    num_experts_per_tok=10,
    num_hidden_layers=48,
    num_key_value_heads=2,
    partial_rotary_factor=0.25,
    rms_norm_eps=1e-6,
    rope_theta=10000000,
    shared_expert_intermediate_size=512,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    vocab_size=151936,
)
#: meta-llama/Llama-4-Scout-17B-16E, its text_config
LLAMA4_SCOUT = dict(
    model_type="llama4_text",
    attention_chunk_size=8192,
    head_dim=128,
    hidden_size=5120,
    interleave_moe_layer_step=1,
    intermediate_size=8192,
    intermediate_size_mlp=16384,
    max_position_embeddings=10485760,
    num_attention_heads=40,
    num_experts_per_tok=1,
    num_hidden_layers=48,
    num_key_value_heads=8,
    num_local_experts=16,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    use_qk_norm=True,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    vocab_size=202048,
)
#: ai21labs/Jamba-v0.1
JAMBA = dict(
    model_type="jamba",
    vocab_size=65536,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_experts=16,
    num_experts_per_tok=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    attn_layer_period=8,
    attn_layer_offset=4,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=256,
    mamba_conv_bias=True,
    mamba_proj_bias=False,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
#: nvidia/Nemotron-H-8B-Base-8K (M: Mamba-2, -: MLP, *: attention)
NEMOTRON_H_8B = dict(
    model_type="nemotron_h",
    vocab_size=131072,
    hidden_size=4096,
    intermediate_size=21504,
    num_hidden_layers=52,
    hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    mamba_num_heads=128,
    mamba_head_dim=64,
    ssm_state_size=128,
    n_groups=8,
    conv_kernel=4,
    expand=2,
    mlp_hidden_act="relu2",
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
#: name → (config, published total parameters, what the published figure counts)
MODELS = {
    "deepseek-v3": (DEEPSEEK_V3, 671e9, "671B, without the 14B of its MTP module"),
    "glm-4.5-air": (GLM_45_AIR, 106e9, "106B"),
    "qwen3-next-80b-a3b": (QWEN3_NEXT, 80e9, "80B"),
    "llama-4-scout": (LLAMA4_SCOUT, 109e9, "109B with the vision encoder; this is the text model"),
    "jamba-v0.1": (JAMBA, 52e9, "52B"),
    "nemotron-h-8b": (NEMOTRON_H_8B, 8e9, "8B"),
}


def config_of(name):
    settings = dict(MODELS[name][0])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


class Planned:
    """One model's config, its plan at pp=4 (1F1B, many microbatches), meta model and layer costs."""

    def __init__(self, name):
        self.config = config_of(name)
        self.plan = ppzoo.plan(self.config, pp=4, microbatches=32, seq_len=SEQ)
        self.adapter = registry.adapter_for(self.config)
        self.model = meta_model(self.config, dtype=torch.bfloat16)
        self.costs = module_costs(self.config, self.adapter, self.model, self.plan.layout, SEQ)
        self.layers = self.model.get_submodule(self.plan.layout.layers)

    def layer_cost(self, i):
        return self.costs[self.plan.layout.layer(i)]

    def matrices(self, i, under=""):
        return sum(p.numel() for n, p in self.layers[i].named_parameters() if p.dim() >= 2 and n.startswith(under))


@pytest.fixture(scope="module")
def planned():
    # NOTE: a full-size adapter lookup traces the model on the meta device (seconds): once a model
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Planned(name)
        return cache[name]

    return get


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_total_and_stage_sizes(planned, name):
    p = planned(name)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(p.config)
    counted = sum(t.numel() for t in hf.parameters())
    assert p.plan.total_params == counted
    published = MODELS[name][1]
    assert abs(counted / published - 1) < 0.02, (name, counted, MODELS[name][2])
    assert p.plan.dtype == "bfloat16"
    assert sum(s.params for s in p.plan.stages) == counted
    for stage in p.plan.stages:
        assert stage.bytes == 2 * stage.params
        assert stage.params == sum(sum(t.numel() for t in hf.get_submodule(m).parameters()) for m in stage.modules)
    assert [i for s in p.plan.stages for i in s.layers] == list(range(p.config.num_hidden_layers))


def test_deepseek_v3_layer_sizes_by_hand(planned):
    """DeepSeek-V3's layers counted from the published widths: MLA, the three dense layers, MoE."""
    p = planned("deepseek-v3")
    h, heads = 7168, 128
    mla = (
        h * 1536 + 1536  # q_a_proj, q_a_layernorm
        + 1536 * heads * (128 + 64)  # q_b_proj: nope + rope query per head
        + h * (512 + 64) + 512  # kv_a_proj_with_mqa, kv_a_layernorm
        + 512 * heads * (128 + 128)  # kv_b_proj: nope key + value per head
        + heads * 128 * h  # o_proj
    )  # fmt: skip
    norms = 2 * h
    dense = 3 * h * 18432
    moe = 256 * 3 * h * 2048 + 3 * h * 2048 + 256 * h  # routed, shared, router (its bias is a buffer)
    sizes = [sum(t.numel() for t in layer.parameters()) for layer in p.layers]
    assert sizes[:3] == [mla + norms + dense] * 3
    assert set(sizes[3:]) == {mla + norms + moe}
    assert p.plan.total_params == 3 * sizes[0] + 58 * sizes[3] + 2 * 129280 * h + h  # + embedding, head, norm


# -- active compute ------------------------------------------------------------------------------


def test_routed_experts_count_by_top_k(planned):
    p = planned("deepseek-v3")
    attention = 4 * 128 * 128 * SEQ / 2  # the query width is heads × v_head_dim, as o_proj reads it
    routed = 256 * 3 * 7168 * 2048
    dense, moe = p.layer_cost(0), p.layer_cost(3)
    assert dense == 2 * p.matrices(0) + attention
    assert moe == 2 * (p.matrices(3) - routed + routed * 8 // 256) + attention
    # 8 routed + 1 shared expert of 2048 are as wide as the dense 18432: the layers cost alike
    assert moe == pytest.approx(dense, rel=0.01)
    assert moe < 0.1 * (2 * p.matrices(3) + attention)  # not all 256 experts


def test_llama4_scout_routes_one_expert_of_sixteen_beside_the_shared_one(planned):
    p = planned("llama-4-scout")
    h, width = 5120, 8192
    attention = h * 40 * 128 + 2 * h * 8 * 128 + 40 * 128 * h
    active = attention + 16 * h + 3 * h * width + 3 * h * width  # router, one routed expert, shared expert
    # chunked (8192) and full attention see the same keys at 2048 tokens
    assert {p.layer_cost(i) for i in range(48)} == {2 * active + 4 * 40 * 128 * SEQ / 2}


def test_dense_first_layers_are_placed_by_their_cost(planned):
    """DeepSeek-V3's three dense layers cost what a MoE layer costs: the first stage takes as many."""
    for name, dense in (("deepseek-v3", 3), ("glm-4.5-air", 1)):
        p = planned(name)
        counts = [len(s.layers) for s in p.plan.stages]
        assert p.plan.stages[0].layers[:dense] == tuple(range(dense))
        assert counts[0] <= min(counts[1:-1]) + 1, (name, counts)


# -- layer types ---------------------------------------------------------------------------------


def test_jamba_prices_mamba_and_attention_layers_apart(planned):
    p = planned("jamba-v0.1")
    h, inner, state, rank = 4096, 8192, 16, 256
    mamba = h * 2 * inner + inner * 4 + inner * (rank + 2 * state) + rank * inner + inner * h + inner * state
    attention = h * h + 2 * h * 1024 + h * h
    mlp = 3 * h * 14336
    experts = 16 * mlp
    assert p.layer_cost(0) == 2 * (mamba + mlp) + STATE_FLOPS["selective-scan"] * inner * state  # A_log is 2-D
    assert p.layer_cost(4) == 2 * (attention + mlp) + 4 * h * SEQ / 2
    assert p.layer_cost(1) == 2 * (mamba + 16 * h + experts * 2 // 16) + STATE_FLOPS["selective-scan"] * inner * state
    # attention every 8th layer from 4 (dense: experts sit on odd layers), Mamba elsewhere
    assert {p.layer_cost(i) for i in range(32)} == {p.layer_cost(0), p.layer_cost(1), p.layer_cost(4)}
    assert len({p.layer_cost(0), p.layer_cost(1), p.layer_cost(4)}) == 3


def test_nemotron_h_prices_mamba_mlp_and_attention_layers_apart(planned):
    p = planned("nemotron-h-8b")
    h, inner, state, groups = 4096, 128 * 64, 128, 8
    kinds = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    mamba = h * (2 * inner + 2 * groups * state + 128) + (inner + 2 * groups * state) * 4 + inner * h
    want = {
        "M": 2 * mamba + STATE_FLOPS["selective-scan"] * inner * state,
        "-": 2 * (2 * h * 21504),  # relu² MLP: up and down
        "*": 2 * (2 * h * h + 2 * h * 1024) + 4 * h * SEQ / 2,
    }
    assert [p.layer_cost(i) for i in range(52)] == [want[k] for k in kinds]


def test_qwen3_next_prices_linear_attention_by_its_state(planned):
    p = planned("qwen3-next-80b-a3b")
    kinds = p.adapter.layer_types(p.config)
    assert kinds[:4] == ["linear_attention"] * 3 + ["full_attention"]
    h, routed = 2048, 512 * 3 * 2048 * 512
    moe = 2 * (p.matrices(0, "mlp") - routed + routed * 10 // 512)
    linear, full = p.layer_cost(0), p.layer_cost(3)
    state = STATE_FLOPS["delta-rule"] * 32 * 128 * 128
    assert linear == moe + 2 * p.matrices(0, "linear_attn") + state
    assert full == moe + 2 * p.matrices(3, "self_attn") + 4 * 16 * 256 * SEQ / 2
    assert linear != full
    assert {p.layer_cost(i) for i in range(48)} == {linear, full}
    del h


def _optimal_max_stage(costs, stages):
    """The smallest possible costliest stage over contiguous splits, by bisection on the answer."""

    def fits(limit):
        count, running = 1, 0.0
        for c in costs:
            if c > limit:
                return False
            if running + c > limit:
                count, running = count + 1, c
            else:
                running += c
        return count <= stages

    low, high = max(costs), sum(costs)
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


@pytest.mark.parametrize("name", ["jamba-v0.1", "nemotron-h-8b", "qwen3-next-80b-a3b", "deepseek-v3"])
def test_plans_balance_by_the_layer_costs(planned, name):
    p = planned(name)
    layout = p.plan.layout
    units = [list(layout.inputs)] + [[layout.layer(i)] for i in range(layout.num_layers)] + [list(layout.outputs)]
    unit_costs = [sum(p.costs[m] for m in unit) for unit in units]
    for stage in p.plan.stages:
        assert stage.cost == pytest.approx(sum(p.costs[m] for m in stage.modules))
    best = _optimal_max_stage(unit_costs, p.plan.num_stages)
    assert max(s.cost for s in p.plan.stages) == pytest.approx(best, rel=1e-6)
    by_count = ppzoo.plan(p.config, pp=4, microbatches=32, seq_len=SEQ, layers_per_stage=-(-layout.num_layers // 4))
    assert max(s.cost for s in p.plan.stages) <= max(s.cost for s in by_count.stages)


# -- multi-token prediction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown", "hidden"),
    [
        ("deepseek-v3", r"model\.layers\.61", None),
        ("glm-4.5-air", r"model\.layers\.46", r"model\.layers\.92"),
        ("qwen3-next-80b-a3b", "mtp", None),
    ],
)
def test_mtp_layers_are_skipped_with_a_note(planned, name, shown, hidden):
    p = planned(name)
    (note,) = p.plan.notes
    assert shown in note and "skipped" in note
    assert hidden is None or hidden not in note
    assert p.plan.to_dict()["notes"] == [note]
    assert p.plan.layout.num_layers == p.config.num_hidden_layers


def test_no_note_without_mtp(planned):
    assert planned("llama-4-scout").plan.notes == ()


def test_checkpoint_with_an_mtp_layer_is_not_refused(tmp_path):
    """DeepSeek-V3's checkpoint holds model.layers.61 (MTP) beside 61 layers; one more is refused."""
    from safetensors.torch import save_file

    def checkpoint(layers, mtp):
        directory = tmp_path / f"{layers}-{mtp}"
        directory.mkdir()
        save_file(
            {f"model.layers.{i}.input_layernorm.weight": torch.ones(2) for i in range(layers)},
            directory / "model.safetensors",
        )
        (directory / "config.json").write_text(
            json.dumps({"model_type": "deepseek_v3", "num_nextn_predict_layers": mtp})
        )
        return Checkpoint(directory)

    checkpoint(62, 1).check_layer_count("model.layers", 61)
    with pytest.raises(CheckpointError, match="holds 63 layers"):
        checkpoint(63, 1).check_layer_count("model.layers", 61)
    with pytest.raises(CheckpointError, match="holds 62 layers"):
        checkpoint(62, 0).check_layer_count("model.layers", 61)


def test_activation_estimate_keeps_the_dense_layers_width(planned):
    """GLM-4.5-Air's first layer is a dense 10944-wide MLP; the others route 8 of 1408 plus one shared."""
    from ppzoo.estimate import estimate_plan, layer_activation_bytes, stage_activation_bytes

    p = planned("glm-4.5-air")
    common = dict(hidden=4096, q_hidden=96 * 128, kv_hidden=8 * 128, heads=96, seq_len=SEQ, element_bytes=2)
    dense = layer_activation_bytes(intermediate=10944, **common)
    moe = layer_activation_bytes(intermediate=8 * 1408 + 1408, **common)
    assert dense != moe
    first = p.plan.stages[0]
    want = stage_activation_bytes(
        layer_bytes=dense + (len(first.layers) - 1) * moe,
        layers=1,
        first=True,
        last=False,
        hidden=4096,
        vocab=151552,
        seq_len=SEQ,
        element_bytes=2,
    )
    estimates = estimate_plan(p.plan, p.config, seq_len=SEQ)
    assert first.layers[0] == 0
    assert estimates["stages"][0]["activation_bytes_per_microbatch"] == want
