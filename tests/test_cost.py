"""The cost model (``ppzoo.cost``) as the planner uses it; MoE costs are in ``tests/test_moe.py``."""

from transformers import LlamaConfig

import ppzoo

#: a 32k-vocabulary head on 256-wide layers (the step benchmark's small shape, a narrower MLP)
SHAPE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
)


def test_cost_balance_counts_the_lm_head():
    """A 32k-vocab head costs as much as several 256-wide layers: the last stage gets fewer layers."""
    config = LlamaConfig(**SHAPE)
    for pp in (2, 4):
        result = ppzoo.plan(config, pp=pp, microbatches=4 * pp)
        counts = [len(s.layers) for s in result.stages]
        plain = 8 // pp  # a split by layer count alone
        assert sum(counts) == 8
        assert counts[-1] < plain, counts
        by_count = ppzoo.plan(config, pp=pp, layers_per_stage=plain)
        assert [len(s.layers) for s in by_count.stages] == [plain] * pp
        assert max(s.cost for s in result.stages) < max(s.cost for s in by_count.stages)


def test_attended_keys_by_layer_type():
    from types import SimpleNamespace

    from ppzoo.cost import CHUNKED, attended_keys
    from ppzoo.layout import FULL, SLIDING

    cfg = SimpleNamespace(sliding_window=256, attention_chunk_size=1024)
    assert attended_keys(FULL, cfg, 4096) == 2048
    assert attended_keys(SLIDING, cfg, 4096) == 256
    assert attended_keys(SLIDING, cfg, 300) == 150  # a window longer than half the sequence
    assert attended_keys(CHUNKED, cfg, 4096) == 512  # half a chunk on average
    assert attended_keys(CHUNKED, cfg, 512) == 256  # a chunk longer than the sequence: causal


def test_recurrent_layers_pay_for_their_state_not_for_attention():
    """A Mamba layer's state is d_inner × d_state, a gated delta-rule layer's v_heads × d_k × d_v."""
    import torch
    from transformers import JambaConfig, Qwen3NextConfig

    from ppzoo.cost import STATE_FLOPS, state_flops
    from ppzoo.meta import meta_model

    jamba = JambaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_expand=2,
        mamba_dt_rank=8,
        vocab_size=96,
    )
    layers = meta_model(jamba).model.layers
    assert state_flops(layers[0]) == STATE_FLOPS["selective-scan"] * (2 * 64) * 8
    assert state_flops(layers[1]) == 0  # the attention layer
    qwen = Qwen3NextConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        full_attention_interval=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        vocab_size=96,
    )
    layers = meta_model(qwen).model.layers
    assert state_flops(layers[0]) == STATE_FLOPS["delta-rule"] * 4 * 16 * 8
    assert state_flops(layers[1]) == 0
    assert all(p.device == torch.device("meta") for p in layers.parameters())
