"""Where a model's pieces live (by module FQN), and the attention kinds a layer can have."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FULL", "SLIDING", "Layout"]

#: ``config.layer_types`` values the stage forward builds masks for
FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Layout:
    """Where a model's pieces live, by module FQN.

    Attributes:
        inputs: modules that run before the first layer (``model.embed_tokens``), first stage.
        layers: the repeated layer container (``model.layers``); layer ``i`` is ``f"{layers}.{i}"``.
        num_layers: how many layers the container holds.
        outputs: modules that run after the last layer (``model.norm``, ``lm_head``), last stage.
        shared: parameter-free modules every stage keeps (``model.rotary_emb``).
    """

    inputs: tuple[str, ...]
    layers: str
    num_layers: int
    outputs: tuple[str, ...]
    shared: tuple[str, ...] = ()

    def layer(self, index: int) -> str:
        return f"{self.layers}.{index}"

    @property
    def modules(self) -> tuple[str, ...]:
        """Every parameter-holding module in forward order."""
        return self.inputs + tuple(self.layer(i) for i in range(self.num_layers)) + self.outputs
