"""The features an adapter can declare, each tied to what the conformance kit checks for it.

The list is closed: an adapter declares members of :class:`Capability` (or their string values)
in ``Adapter.capabilities``, and a name that is not a member fails when the class is defined.
Every member says which of the kit's checks test it; ``check_tiny_config`` proves that the
adapter's tiny config exercises each declared capability (and declares each one it exercises),
so a passing check has really tested the feature.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["Capability", "parse_capabilities"]


class Capability(str, enum.Enum):
    """A feature of an architecture that the conformance kit checks.

    Each member's value is the name adapters write (``"tied_embeddings"``); ``description`` says
    what the tiny config must do to exercise it, and ``checks`` names the kit checks that test it.
    """

    description: str
    checks: tuple[str, ...]

    def __new__(cls, value: str, description: str, checks: tuple[str, ...]) -> Capability:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        member.checks = checks
        return member

    def __str__(self) -> str:
        return self.value

    TIED_EMBEDDINGS = (
        "tied_embeddings",
        "lm_head is tied to the input embedding (tied_weights() is not empty)",
        ("tied_weights", "stage_chain", "distributed_step"),
    )
    SLIDING_WINDOW = (
        "sliding_window",
        "some layers attend through a sliding window shorter than the kit's sequences",
        ("stage_chain", "distributed_step"),
    )
    SOFTCAP = (
        "softcap",
        "final or attention logits are soft-capped (final_logit_softcapping / attn_logit_softcapping)",
        ("stage_chain", "distributed_step"),
    )
    EMBEDDING_SCALE = (
        "embedding_scale",
        "the embedding module scales its output by a non-persistent buffer (Gemma's embed_scale)",
        ("buffers", "stage_chain", "distributed_step"),
    )
    EMBEDDING_MULTIPLIER = (
        "embedding_multiplier",
        "the base model's forward multiplies the embeddings (embedding_multiplier, not 1)",
        ("stage_chain", "distributed_step"),
    )
    LOGITS_SCALING = (
        "logits_scaling",
        "the CausalLM head divides the logits (logits_scaling, not 1)",
        ("stage_chain", "distributed_step"),
    )
    LOGIT_SCALE = (
        "logit_scale",
        "the CausalLM head multiplies the logits (logit_scale, not 1)",
        ("stage_chain", "distributed_step"),
    )
    PER_LAYER_TYPE_ROPE = (
        "per_layer_type_rope",
        "layer types use different rotary embeddings (rope_parameters keyed by layer type)",
        ("buffers", "stage_chain", "distributed_step"),
    )
    ROPE_SCALING = (
        "rope_scaling",
        "the rotary embedding is scaled (a rope_type other than 'default')",
        ("buffers", "stage_chain", "distributed_step"),
    )
    MOE = (
        "moe",
        "layers route tokens to more than one expert, whose checkpoint keys differ from the fused parameters",
        ("stage_reads", "stage_chain", "distributed_step"),
    )
    ROUTER_AUX_LOSS = (
        "router_aux_loss",
        "the loss adds the router load-balancing term (output_router_logits and a non-zero router_aux_loss_coef)",
        ("stage_chain", "distributed_step"),
    )
    SHARED_EXPERT = (
        "shared_expert",
        "MoE blocks add a shared expert every token passes through (shared_expert_intermediate_size > 0)",
        ("stage_reads", "stage_chain", "distributed_step"),
    )


_BY_VALUE = {member.value: member for member in Capability}


def parse_capabilities(values: Iterable[Capability | str], *, owner: str) -> frozenset[Capability]:
    """``values`` as :class:`Capability` members.

    Args:
        values: members, or their string values.
        owner: who declares them, for the error (``"GemmaAdapter.capabilities"``).

    Raises:
        TypeError: ``values`` is a single string, or holds something other than a string.
        ValueError: a name is not a member; the message lists the known names.
    """
    if isinstance(values, str):
        raise TypeError(
            f"{owner} must be a set of capabilities, got the string {values!r}; write frozenset({{{values!r}}})"
        )
    parsed = set()
    for value in values:
        if isinstance(value, Capability):
            parsed.add(value)
        elif isinstance(value, str) and value in _BY_VALUE:
            parsed.add(_BY_VALUE[value])
        elif isinstance(value, str):
            raise ValueError(
                f"{owner} names unknown capability {value!r}; the known capabilities are "
                f"{', '.join(_BY_VALUE)} (ppzoo.capabilities.Capability) — see docs/adapters.md"
            )
        else:
            raise TypeError(f"{owner} holds {value!r}; declare ppzoo.capabilities.Capability members")
    return frozenset(parsed)
