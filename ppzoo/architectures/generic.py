"""The generic fallback: any causal LM whose config carries the standard ``base_model_pp_plan``.

Transformers marks pipeline-splittable models with ``base_model_pp_plan``; those whose plan is
exactly ``embed_tokens → layers → norm`` and whose CausalLM holds ``model.embed_tokens``,
``model.layers``, ``model.norm``, ``model.rotary_emb`` and ``lm_head`` run Llama's stage forward:
embed, masks per ``config.layer_types``, one RoPE for all layers, the layers, norm, head.

Whatever such a model does *around* its layers beyond that cannot be seen from the module tree, so
the fallback refuses every config that announces such a step (a logit scale, an embedding
multiplier, soft-capped logits, per-layer-type RoPE, experts and their router loss, ...) instead of
running it silently wrong. Those architectures need an adapter of their own. Embedding dropout
(``embedding_dropout``, StarCoder2) is the one such step it applies, in :meth:`GenericAdapter.embed`.
"""

from __future__ import annotations

import inspect

import torch

from ppzoo.adapter import Adapter
from ppzoo.architectures.moe import expert_counts
from ppzoo.hookspecs import hookimpl
from ppzoo.validation import Problem

STANDARD_PP_PLAN = frozenset({"embed_tokens", "layers", "norm"})

#: config attribute → the step it announces, which the generic stage forward would skip
FORWARD_EXTRAS = {
    "logit_scale": "a logit scale in the CausalLM head",
    "logits_scaling": "logit scaling in the CausalLM head",
    "final_logit_softcapping": "final-logit soft-capping in the CausalLM head",
    "embedding_multiplier": "an embedding multiplier in the base model's forward",
    "scale_emb": "an embedding scale in the base model's forward",
    "dim_model_base": "a hidden-state rescale before the CausalLM head",
    "use_bidirectional_attention": "bidirectional attention",
    "output_router_logits": "a router aux loss added in the CausalLM forward",
}


class GenericAdapter(Adapter):
    name = "generic"
    fallback = True

    def embed(self, inner, input_ids, *, position_ids=None, attention_mask=None):
        hidden = super().embed(inner, input_ids)
        # NOTE: StarCoder2's base forward drops out the embeddings (its only step beyond Llama's)
        p = getattr(inner.config, "embedding_dropout", None) or 0.0
        return torch.nn.functional.dropout(hidden, p=p, training=inner.training) if p else hidden

    def tiny_config(self):
        """A tiny config of one architecture the fallback serves (Helium: no adapter of its own)."""
        from transformers import HeliumConfig

        from ppzoo.architectures.llama import TINY

        return HeliumConfig(**TINY, head_dim=8)

    def matches(self, config) -> bool:
        # NOTE: the config's own plan, not its text config's: a vision-language model's text tower
        # carries one too, but the CausalLM around it is laid out differently.
        plan = getattr(config, "base_model_pp_plan", None)
        return bool(plan) and frozenset(plan) == STANDARD_PP_PLAN

    def validate(self, config, plan=None):
        problems = super().validate(config, plan)
        cfg = self.text_config(config)
        kind = f"model_type {config.model_type!r}"
        for attr, step in FORWARD_EXTRAS.items():
            value = getattr(cfg, attr, None)
            if value not in (None, False, 0):
                problems.append(
                    Problem(
                        "generic-forward-step",
                        f"{kind} has {attr}={value!r} ({step}), which the generic adapter does not apply; {_ADVICE}",
                    )
                )
        experts = expert_counts(cfg)
        if experts:
            shown = ", ".join(f"{a}={v}" for a, v in experts.items())
            problems.append(
                Problem(
                    "generic-moe",
                    f"{kind} is a mixture of experts ({shown}): expert checkpoint keys and the router aux loss "
                    f"need a dedicated adapter; {_ADVICE}",
                )
            )
        rope = getattr(cfg, "rope_parameters", None)
        if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
            problems.append(
                Problem(
                    "generic-per-layer-type-rope",
                    f"{kind} has per-layer-type RoPE (rope_parameters keyed by {sorted(rope)}); {_ADVICE}",
                )
            )
        if getattr(cfg, "sliding_window", None) and not getattr(cfg, "layer_types", None):
            problems.append(
                Problem(
                    "generic-sliding-window",
                    f"{kind} sets sliding_window={cfg.sliding_window} without layer_types, so which layers slide "
                    f"is decided in its forward; {_ADVICE}",
                )
            )
        if not problems:
            problems.extend(self._layout_problems(config, kind))
        return problems

    def validation_cases(self):
        scaled, windowed = self.tiny_config(), self.tiny_config()
        scaled.logit_scale = 0.5
        windowed.sliding_window = 4
        return [(scaled, "generic-forward-step"), (windowed, "generic-sliding-window")]

    def _layout_problems(self, config, kind: str) -> list[Problem]:
        from ppzoo.meta import meta_model

        try:
            model = meta_model(config)
        except Exception as exc:  # noqa: BLE001 - any build failure is reported, not raised
            return [Problem("generic-layout", f"{kind} cannot be built from its config ({type(exc).__name__}: {exc})")]
        layout = self.fqn_layout(config)
        wanted = layout.inputs + (layout.layers,) + layout.outputs + layout.shared
        missing = [fqn for fqn in wanted if _find(model, fqn) is None]
        if missing:
            return [
                Problem(
                    "generic-layout",
                    f"{kind} ({type(model).__name__}) has no module {', '.join(map(repr, missing))}; {_ADVICE}",
                )
            ]
        held = layout.inputs + (layout.layers,) + layout.outputs
        depth = lambda name: 2 if name.startswith(f"{self.inner_name}.") else 1  # noqa: E731
        stray = sorted(
            {
                ".".join(n.split(".")[: depth(n)])
                for n, _ in model.named_parameters()
                if not n.startswith(tuple(f"{m}." for m in held))
            }
        )
        if stray:
            shown = ", ".join(map(repr, stray[:3])) + (" ..." if len(stray) > 3 else "")
            return [
                Problem(
                    "generic-layout",
                    f"{kind} has parameters outside embed_tokens/layers/norm/lm_head ({shown}); {_ADVICE}",
                )
            ]
        rotary = inspect.signature(type(_find(model, layout.shared[0])).forward).parameters
        layer = inspect.signature(type(_find(model, layout.layer(0))).forward).parameters
        if "layer_type" in rotary:
            return [
                Problem(
                    "generic-per-layer-type-rope",
                    f"{kind} has per-layer-type RoPE (rotary_emb takes a layer_type); {_ADVICE}",
                )
            ]
        if "position_embeddings" not in layer:
            return [Problem("generic-layout", f"{kind}'s decoder layers do not take position_embeddings; {_ADVICE}")]
        return []


_ADVICE = "write an Adapter subclass for it (see docs/adapters.md)"


def _find(model, fqn: str):
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


@hookimpl
def ppzoo_register_adapters(register):
    register(GenericAdapter())
