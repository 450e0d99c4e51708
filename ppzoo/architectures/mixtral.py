"""Mixtral: Mistral's attention (one sliding window for all layers, or none) with routed experts.

Hub checkpoints name the MoE block ``block_sparse_moe`` and its expert matrices ``w1`` (gate),
``w3`` (up) and ``w2`` (down); transformers holds ``mlp.gate`` and fused ``mlp.experts.*``. Its own
conversion rules for ``mixtral`` convert between the two, and ppzoo loads and saves through them
(``ppzoo.checkpoint.conversion``); the router aux loss is in ``ppzoo.architectures.moe``.
"""

from __future__ import annotations

from ppzoo.architectures.llama import TINY
from ppzoo.architectures.mistral import MistralAdapter
from ppzoo.architectures.moe import MoEAdapter
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl

#: the MoE shape every tiny MoE config shares: few, small experts, and the router aux loss on with
#: a weight that makes leaving it out fail the kit's loss and gradient comparisons
MOE_TINY = dict(TINY, intermediate_size=16, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)


class MixtralAdapter(MoEAdapter, MistralAdapter):
    name = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    capabilities = MoEAdapter.capabilities | {Capability.SLIDING_WINDOW}

    def num_experts(self, config):
        return int(config.num_local_experts)

    def tiny_config(self):
        from transformers import MixtralConfig

        return MixtralConfig(**MOE_TINY, num_local_experts=4, sliding_window=5)


@hookimpl
def ppzoo_register_adapters(register):
    register(MixtralAdapter())
