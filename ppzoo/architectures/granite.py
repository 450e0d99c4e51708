"""Granite: three scalar multipliers, each applied exactly once.

- ``embedding_multiplier`` multiplies the embeddings in the *base* model's forward, after
  ``embed_tokens``: the first stage applies it in :meth:`GraniteAdapter.embed`.
- ``residual_multiplier`` (and ``attention_multiplier``) act inside the decoder layers.
- the CausalLM head divides the logits by ``logits_scaling``: the last stage does, after ``lm_head``.
"""

from __future__ import annotations

from ppzoo.architectures.llama import TINY, LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl


class GraniteAdapter(LlamaAdapter):
    name = "granite"
    model_types = ("granite",)
    architectures = ("GraniteForCausalLM",)
    capabilities = frozenset({Capability.EMBEDDING_MULTIPLIER, Capability.LOGITS_SCALING})

    def embed(self, inner, input_ids):
        return getattr(inner, self.embed_name)(input_ids) * inner.config.embedding_multiplier

    def logits(self, lm, hidden):
        return getattr(lm, self.head_name)(hidden) / lm.config.logits_scaling

    def tiny_config(self):
        from transformers import GraniteConfig

        return GraniteConfig(
            **TINY, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=4.0
        )


@hookimpl
def ppzoo_register_adapters(register):
    register(GraniteAdapter())
