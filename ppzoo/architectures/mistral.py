"""Mistral: Llama with a sliding window on every layer when ``sliding_window`` is set."""

from __future__ import annotations

from ppzoo.architectures.llama import TINY, LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl
from ppzoo.layout import FULL, SLIDING


class MistralAdapter(LlamaAdapter):
    name = "mistral"
    model_types = ("mistral",)
    architectures = ("MistralForCausalLM",)
    capabilities = frozenset({Capability.SLIDING_WINDOW})

    def layer_types(self, config):
        # NOTE: Mistral ignores config.layer_types: one window for all layers, or none.
        kind = SLIDING if getattr(config, "sliding_window", None) else FULL
        return [kind] * config.num_hidden_layers

    def tiny_config(self):
        from transformers import MistralConfig

        return MistralConfig(**TINY, sliding_window=5)


@hookimpl
def ppzoo_register_adapters(register):
    register(MistralAdapter())
