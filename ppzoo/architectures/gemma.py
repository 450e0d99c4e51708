"""Gemma, Gemma 2 and Gemma 3 (text): Llama's layout with three differences around the layers.

- Gemma scales embeddings inside ``embed_tokens`` by a non-persistent ``embed_scale`` buffer,
  which is not in the checkpoint; ``init_buffers`` (the model's own ``_init_weights``) re-creates
  it after meta init, so the embedding runs unchanged on the first stage.
- Gemma 2 and 3 soft-cap the final logits in the CausalLM head (``final_logit_softcapping``),
  applied once, on the last stage, after ``lm_head``. Attention soft-capping and the sliding
  window live inside the layers; the stage builds a mask per ``config.layer_types``.
- Gemma 3 has one RoPE per layer type (``rope_parameters`` keyed by layer type):
  ``rotary_emb(x, position_ids, layer_type)``.

All three tie ``lm_head`` to ``embed_tokens`` by default.
"""

from __future__ import annotations

import torch

from ppzoo.architectures.llama import TINY, LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.hookspecs import hookimpl
from ppzoo.validation import Problem

#: Gemma's tiny shape: like Llama's, tied embeddings as the released models have them
GEMMA_TINY = dict(TINY, tie_word_embeddings=True, head_dim=8)


class GemmaAdapter(LlamaAdapter):
    name = "gemma"
    model_types = ("gemma",)
    architectures = ("GemmaForCausalLM",)
    capabilities = frozenset({Capability.TIED_EMBEDDINGS, Capability.EMBEDDING_SCALE})

    def tiny_config(self):
        from transformers import GemmaConfig

        return GemmaConfig(**GEMMA_TINY)


class Gemma2Adapter(GemmaAdapter):
    name = "gemma2"
    model_types = ("gemma2",)
    architectures = ("Gemma2ForCausalLM",)
    capabilities = GemmaAdapter.capabilities | {Capability.SLIDING_WINDOW, Capability.SOFTCAP}

    def logits(self, lm, hidden):
        logits = getattr(lm, self.head_name)(hidden)
        cap = lm.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def tiny_config(self):
        from transformers import Gemma2Config

        return Gemma2Config(
            **GEMMA_TINY,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )


class Gemma3TextAdapter(Gemma2Adapter):
    """Gemma 3's text model (the multimodal ``gemma3`` is the native adapter's, :mod:`ppzoo.vision`)."""

    name = "gemma3_text"
    model_types = ("gemma3_text",)
    architectures = ("Gemma3ForCausalLM",)
    # NOTE: rope_scaling too: the full-attention layers' RoPE is linearly scaled, as in the released models
    capabilities = Gemma2Adapter.capabilities | {Capability.PER_LAYER_TYPE_ROPE, Capability.ROPE_SCALING}

    def position_embeddings(self, inner, hidden, position_ids, needed):
        rotary = getattr(inner, self.rotary_name)
        return {kind: rotary(hidden, position_ids, kind) for kind in needed}

    def validate(self, config, plan=None):
        problems = super().validate(config, plan)
        if getattr(config, "use_bidirectional_attention", False):
            problems.append(Problem("bidirectional-attention", BIDIRECTIONAL_PROBLEM))
        return problems

    def validation_cases(self):
        bidirectional = self.tiny_config()
        bidirectional.use_bidirectional_attention = True
        return [(bidirectional, "bidirectional-attention")]

    def tiny_config(self):
        from transformers import Gemma3TextConfig

        sliding, full = "sliding_attention", "full_attention"
        return Gemma3TextConfig(
            **GEMMA_TINY,
            sliding_window=4,
            layer_types=[sliding, sliding, full] * 2 + [sliding, sliding],
            rope_parameters={
                sliding: {"rope_type": "default", "rope_theta": 10_000.0},
                full: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            },
            final_logit_softcapping=3.0,
        )


BIDIRECTIONAL_PROBLEM = (
    "use_bidirectional_attention=True makes Gemma 3 an encoder (EmbeddingGemma); ppzoo pipelines causal LMs, "
    "set use_bidirectional_attention=False"
)


@hookimpl
def ppzoo_register_adapters(register):
    register(GemmaAdapter())
    register(Gemma2Adapter())
    register(Gemma3TextAdapter())
