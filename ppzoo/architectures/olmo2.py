"""OLMo 2: Llama's stage forward; q/k norms and post-norms (instead of pre-norms) are inside the layers."""

from __future__ import annotations

from ppzoo.architectures.llama import TINY, LlamaAdapter
from ppzoo.hookspecs import hookimpl


class Olmo2Adapter(LlamaAdapter):
    name = "olmo2"
    model_types = ("olmo2",)
    architectures = ("Olmo2ForCausalLM",)

    def tiny_config(self):
        from transformers import Olmo2Config

        return Olmo2Config(**TINY)


@hookimpl
def ppzoo_register_adapters(register):
    register(Olmo2Adapter())
