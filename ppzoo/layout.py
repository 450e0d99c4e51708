"""Where a model's pieces live (by module FQN), the attention kinds a layer can have, and the
widths of a decoder layer, measured from its own parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["FULL", "SLIDING", "LayerShape", "Layout", "measure_layer"]

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


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer that its compute and activation memory follow.

    Attributes:
        hidden: the residual stream's width ``h``.
        heads: attention heads ``a`` (0 for a layer without attention).
        q_width: the queries' width, ``heads × head_dim`` (0 without attention).
        kv_width: the keys' (and values') width, ``kv heads × head_dim``: ``q_width`` for multi-head,
            one head's for multi-query attention.
        mlp_width: the MLP's intermediate width ``I`` (per token: top-k experts' widths for MoE).
        gated: whether the MLP multiplies a gate by an up projection (two ``I``-wide inputs to the
            activation, as Llama's) or activates one up projection (GPT-2, OPT, BLOOM, Falcon).
    """

    hidden: int
    heads: int
    q_width: int
    kv_width: int
    mlp_width: int
    gated: bool


def _matmuls(module: nn.Module) -> list[tuple[str, int, int]]:
    """``(name, in, out)`` of every matrix-multiplying submodule, in registration order.

    ``nn.Linear`` stores its weight as ``[out, in]``; transformers' ``Conv1D`` (GPT-2 and kin)
    as ``[in, out]`` and says which (``nf`` is the output width).
    """
    found = []
    for name, sub in module.named_modules():
        weight = sub._parameters.get("weight")
        if weight is None or weight.dim() != 2 or isinstance(sub, nn.Embedding):
            continue
        if hasattr(sub, "in_features") and hasattr(sub, "out_features"):
            found.append((name, int(sub.in_features), int(sub.out_features)))
        elif hasattr(sub, "nf"):
            found.append((name, int(weight.shape[0]), int(sub.nf)))
        else:
            found.append((name, int(weight.shape[1]), int(weight.shape[0])))
    return found


def _attention_modules(layer: nn.Module) -> list[str]:
    """Names of the outermost submodules of ``layer`` whose class is an attention (by its name)."""
    names: list[str] = []
    for name, sub in layer.named_modules():
        if name and "Attention" in type(sub).__name__ and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _back_to(matmuls: list[tuple[int, int]], hidden: int) -> int:
    """Index of the matrix that writes the residual stream: ``out == hidden``, preferring one that
    reads another width (the others read it); the last such matrix, else the last one.

    NOTE: registration order is the model author's choice (Phi-3 registers ``o_proj`` before
    ``qkv_proj``); where several matrices map ``hidden`` to ``hidden``, any of them gives the
    same widths.
    """
    back = [i for i, (_, fan_out) in enumerate(matmuls) if fan_out == hidden]
    narrow = [i for i in back if matmuls[i][0] != hidden]
    return (narrow or back or [len(matmuls) - 1])[-1]


def measure_layer(layer: nn.Module, *, hidden: int, heads: int) -> LayerShape:
    """A decoder layer's :class:`LayerShape`, read from the shapes of its own (meta) parameters.

    Attention is the layer's outermost submodule(s) whose class name holds ``Attention``; its output
    projection (the matrix back to ``hidden``) reads ``q_width``, and the others project the
    layer's input to queries, keys and values, fused or not: ``q_width + 2·kv_width`` in all, which
    covers multi-head, grouped-query and multi-query attention alike. Every other matrix of the
    layer is the MLP: its down projection (the matrix back to ``hidden``) reads ``I``, and the
    others write ``I`` (one up projection) or ``2·I`` (gate and up, separate or fused). Parameter
    names are never read, so fused and split projections, ``nn.Linear`` and ``Conv1D`` all measure
    alike.

    Args:
        layer: the decoder layer, on any device (the meta device is enough).
        hidden: the residual stream's width.
        heads: the config's attention heads, reported for a layer that has attention.
    """
    attention = _attention_modules(layer)
    inside = tuple(n + "." for n in attention)
    attn, mlp = [], []
    for name, fan_in, fan_out in _matmuls(layer):
        (attn if name.startswith(inside) or name in attention else mlp).append((fan_in, fan_out))
    q_width = kv_width = 0
    if attn:
        out = _back_to(attn, hidden)
        q_width = attn[out][0]
        projected = sum(width for i, (_, width) in enumerate(attn) if i != out)
        kv_width = max(0, (projected - q_width) // 2) if len(attn) > 1 else q_width
    mlp_width, gated = 0, False
    if mlp:
        down = _back_to(mlp, hidden)
        mlp_width = mlp[down][0]
        up = sum(width for i, (_, width) in enumerate(mlp) if i != down)
        gated = up >= 2 * mlp_width > 0
    return LayerShape(
        hidden=hidden,
        heads=heads if attn else 0,
        q_width=q_width,
        kv_width=kv_width,
        mlp_width=mlp_width,
        gated=gated,
    )
