"""Llama: the reference layout every Llama-like adapter starts from."""

from __future__ import annotations

from ppzoo.adapter import Adapter
from ppzoo.hookspecs import hookimpl


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)

    def tiny_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**TINY)


#: the shape every tiny test config shares (transformers' testers use the same scale)
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


@hookimpl
def ppzoo_register_adapters(register):
    register(LlamaAdapter())
