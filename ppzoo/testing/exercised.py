"""What a tiny config exercises: one recogniser per capability.

``check_tiny_config`` compares what these find with what the adapter declares: a declared
capability the tiny config does not exercise would let every check pass without testing it, and an
exercised one left undeclared would skip the checks that need it. Every member of
:class:`~ppzoo.capabilities.Capability` has a recogniser here (``tests/test_conformance.py``
checks that none is missing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ppzoo.adapter import Adapter
from ppzoo.architectures.moe import expert_counts
from ppzoo.capabilities import Capability
from ppzoo.layout import SLIDING

__all__ = ["RECOGNISERS", "exercised"]

#: config attributes that count routed experts


def _not_one(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1


def _rope_sets(cfg: Any) -> dict[str, dict]:
    """The RoPE parameter sets of the config: one, or one per layer type."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not isinstance(rope, dict):
        return {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return dict(rope)
    return {"all": rope}


def _experts(cfg: Any) -> int:
    return max(expert_counts(cfg).values(), default=0)


def _tied_embeddings(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    return bool(adapter.tied_weights(config))


def _sliding_window(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    window = getattr(adapter.text_config(config), "sliding_window", None)
    return SLIDING in adapter.layer_types(config) and window is not None and window < seq_len


def _softcap(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    cfg = adapter.text_config(config)
    return any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "attn_logit_softcapping"))


def _embedding_scale(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    return any(hasattr(model.get_submodule(m), "embed_scale") for m in adapter.fqn_layout(config).inputs)


def _embedding_multiplier(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    return _not_one(getattr(adapter.text_config(config), "embedding_multiplier", None))


def _logits_scaling(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    return _not_one(getattr(adapter.text_config(config), "logits_scaling", None))


def _logit_scale(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    return _not_one(getattr(adapter.text_config(config), "logit_scale", None))


def _per_layer_type_rope(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    sets = _rope_sets(adapter.text_config(config))
    used = {repr(sorted(sets[t].items())) for t in set(adapter.layer_types(config)) if t in sets}
    return len(used) > 1


def _rope_scaling(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    sets = _rope_sets(adapter.text_config(config))
    return any(s.get("rope_type", s.get("type")) not in (None, "default") for s in sets.values())


def _moe(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    return _experts(adapter.text_config(config)) > 1


def _router_aux_loss(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    cfg = adapter.text_config(config)
    coef = getattr(cfg, "router_aux_loss_coef", None)
    weighted = isinstance(coef, (int, float)) and not isinstance(coef, bool) and coef > 0
    return bool(getattr(cfg, "output_router_logits", False)) and weighted and _experts(cfg) > 1


def _shared_expert(adapter: Adapter, config: Any, model: nn.Module, seq_len: int) -> bool:
    return any("shared_expert" in name for name, _ in model.named_parameters())


#: capability → ``recognise(adapter, config, meta_model, seq_len)``: whether the config exercises it
RECOGNISERS: dict[Capability, Callable[[Adapter, Any, nn.Module, int], bool]] = {
    Capability.TIED_EMBEDDINGS: _tied_embeddings,
    Capability.SLIDING_WINDOW: _sliding_window,
    Capability.SOFTCAP: _softcap,
    Capability.EMBEDDING_SCALE: _embedding_scale,
    Capability.EMBEDDING_MULTIPLIER: _embedding_multiplier,
    Capability.LOGITS_SCALING: _logits_scaling,
    Capability.LOGIT_SCALE: _logit_scale,
    Capability.PER_LAYER_TYPE_ROPE: _per_layer_type_rope,
    Capability.ROPE_SCALING: _rope_scaling,
    Capability.MOE: _moe,
    Capability.ROUTER_AUX_LOSS: _router_aux_loss,
    Capability.SHARED_EXPERT: _shared_expert,
}


def exercised(adapter: Adapter, config: Any, model: nn.Module, *, seq_len: int) -> dict[Capability, bool]:
    """Whether ``config`` (with ``model``, its meta model) exercises each capability, in declaration order."""
    return {capability: RECOGNISERS[capability](adapter, config, model, seq_len) for capability in Capability}
