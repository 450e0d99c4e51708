"""Qwen2 and Qwen3: Llama with per-layer sliding windows from ``layer_types``."""

from __future__ import annotations

from ppzoo.architectures.llama import TINY, LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl


class Qwen2Adapter(LlamaAdapter):
    """``use_sliding_window`` / ``max_window_layers`` become ``config.layer_types``, which the base reads."""

    name = "qwen2"
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM",)
    capabilities = frozenset({Capability.SLIDING_WINDOW})

    def tiny_config(self):
        from transformers import Qwen2Config

        return Qwen2Config(**TINY, use_sliding_window=True, sliding_window=5, max_window_layers=3)


class Qwen3Adapter(Qwen2Adapter):
    """Qwen3 adds q/k norms inside attention, which the decoder layer applies itself."""

    name = "qwen3"
    model_types = ("qwen3",)
    architectures = ("Qwen3ForCausalLM",)

    def tiny_config(self):
        from transformers import Qwen3Config

        return Qwen3Config(**TINY, head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=3)


@hookimpl
def ppzoo_register_adapters(register):
    register(Qwen2Adapter())
    register(Qwen3Adapter())
