"""Phi-3: Llama's stage forward; what differs lives inside the layers or the rotary module.

Fused ``qkv_proj`` and ``gate_up_proj`` are plain parameters with checkpoint keys of their own.
Partial rotary (``partial_rotary_factor``) and rope scaling (``longrope``, which switches between
short and long factors by the largest position id) happen in ``rotary_emb``, which every stage
runs on the same ``position_ids``. As in Mistral, ``sliding_window`` applies to every layer.
"""

from __future__ import annotations

from ppzoo.architectures.llama import TINY
from ppzoo.architectures.mistral import MistralAdapter
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl


class Phi3Adapter(MistralAdapter):
    name = "phi3"
    model_types = ("phi3",)
    architectures = ("Phi3ForCausalLM",)
    capabilities = frozenset({Capability.SLIDING_WINDOW, Capability.ROPE_SCALING})

    def tiny_config(self):
        from transformers import Phi3Config

        # NOTE: 4 heads of 16 with partial_rotary_factor 0.5 rotate 8 dims: 4 factors each. The
        # original length 8 is shorter than the test sequences, so the long factors are in use.
        return Phi3Config(
            **dict(TINY, hidden_size=64, max_position_embeddings=64),
            sliding_window=5,
            partial_rotary_factor=0.5,
            original_max_position_embeddings=8,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.2, 1.3],
                "long_factor": [1.5, 2.0, 3.0, 4.0],
            },
        )


@hookimpl
def ppzoo_register_adapters(register):
    register(Phi3Adapter())
