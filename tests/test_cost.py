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
