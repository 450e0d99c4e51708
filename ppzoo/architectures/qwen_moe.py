"""Qwen2-MoE and Qwen3-MoE: routed experts on some layers, dense MLPs on the others.

A layer routes when it is not in ``mlp_only_layers`` and ``(index + 1) % decoder_sparse_step == 0``
(and ``num_experts > 0``); only those layers record router logits. Qwen2-MoE adds a gated shared
expert to every MoE block (counted in full by the cost model) and slides the window on the layers
``config.layer_types`` names; Qwen3-MoE slides it on all layers when ``sliding_window`` is set.
Checkpoints hold one ``gate_proj`` / ``up_proj`` / ``down_proj`` per expert; transformers' own
conversion rules (``qwen2_moe``, which ``qwen3_moe`` shares) fuse them, and ppzoo loads and saves
through those rules (``ppzoo.checkpoint.conversion``). The router aux loss: ``ppzoo.architectures.moe``.
"""

from __future__ import annotations

from ppzoo.architectures.mistral import MistralAdapter
from ppzoo.architectures.mixtral import MOE_TINY
from ppzoo.architectures.moe import MoEAdapter
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl


class Qwen2MoeAdapter(MoEAdapter):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    architectures = ("Qwen2MoeForCausalLM",)
    capabilities = MoEAdapter.capabilities | {Capability.SLIDING_WINDOW, Capability.SHARED_EXPERT}

    def moe_layers(self, config):
        step, dense = int(config.decoder_sparse_step), set(config.mlp_only_layers or ())
        if self.num_experts(config) <= 0:
            return []
        return [i for i in range(int(config.num_hidden_layers)) if i not in dense and (i + 1) % step == 0]

    def tiny_config(self):
        from transformers import Qwen2MoeConfig

        # NOTE: sparse step 2 and mlp_only_layers [3] route on layers 1, 5 and 7 only; the window
        # slides on layers 0 and 2 (even layers below max_window_layers).
        return Qwen2MoeConfig(
            **MOE_TINY,
            num_experts=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=4,
        )


class Qwen3MoeAdapter(Qwen2MoeAdapter, MistralAdapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
    capabilities = MoEAdapter.capabilities | {Capability.SLIDING_WINDOW}

    def tiny_config(self):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **MOE_TINY,
            head_dim=8,
            num_experts=4,
            moe_intermediate_size=16,
            mlp_only_layers=[2],
            use_sliding_window=True,
            sliding_window=5,
        )


@hookimpl
def ppzoo_register_adapters(register):
    register(Qwen2MoeAdapter())
    register(Qwen3MoeAdapter())
