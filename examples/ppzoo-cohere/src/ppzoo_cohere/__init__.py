"""ppzoo adapter for Cohere (``CohereForCausalLM``, the Command-R family).

Cohere differs from Llama in four ways; only one needs the adapter:

- LayerNorm with mean subtraction (no bias), and optional q/k norms: inside the modules, no change.
- A parallel block (attention and MLP both read one ``input_layernorm`` output and are added to
  the residual together): inside the decoder layer, which the stage calls as it is.
- Interleaved rotary embeddings: inside ``rotary_emb`` and attention, no change.
- ``CohereForCausalLM.forward`` multiplies the logits by ``config.logit_scale``. ppzoo replaces that
  forward with the stage forward, so :meth:`CohereAdapter.logits` applies the scale, once, on the
  last stage.

Embeddings are tied by default (``lm_head.weight`` is ``model.embed_tokens.weight``); the base
class's ``tied_weights`` reads ``tie_word_embeddings`` and ppzoo keeps the two in sync.
"""

from __future__ import annotations

import numbers

import ppzoo
from ppzoo.capabilities import Capability
from ppzoo.validation import Problem

__all__ = ["CohereAdapter"]
__version__ = "0.1.0"


class CohereAdapter(ppzoo.Adapter):
    name = "cohere"
    model_types = ("cohere",)
    architectures = ("CohereForCausalLM",)
    capabilities = frozenset({Capability.TIED_EMBEDDINGS, Capability.LOGIT_SCALE})

    def logits(self, lm, hidden):
        return super().logits(lm, hidden) * lm.logit_scale

    def validate(self, config, plan=None):
        problems = super().validate(config, plan)
        scale = getattr(config, "logit_scale", None)
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            # NOTE: a plugin's own codes start with its name, so they never clash with ppzoo's
            problems.append(
                Problem(
                    "cohere-logit-scale",
                    f"logit_scale must be a number, got {scale!r}; Cohere multiplies the logits by it "
                    "(released checkpoints use 0.0625 or 0.125)",
                )
            )
        return problems

    def validation_cases(self):
        config = self.tiny_config()
        config.logit_scale = None
        return [(config, "cohere-logit-scale")]

    def tiny_config(self):
        from transformers import CohereConfig

        # NOTE: logit_scale far from 1 and q/k norms on, so the conformance kit exercises both.
        return CohereConfig(
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
            logit_scale=0.25,
            use_qk_norm=True,
            tie_word_embeddings=True,
        )


@ppzoo.hookimpl
def ppzoo_register_adapters(register):
    register(CohereAdapter())
