"""The cost model: estimated forward FLOPs per token of each module of a layout.

The planner balances stages by these costs (:mod:`ppzoo.split`); they need the module tree on the
meta device only, never weights.

Each layer is priced by what it holds, so layers of different types cost differently:

- its **matrices**, 2 FLOPs per weight a token multiplies; in a mixture of experts only the
  routed experts a token is sent to count (top-k of them; shared experts and the router whole);
- **attention**, if the layer has any: 4·heads·head_dim per attended key (scores and the weighted
  sum of values): a causal query sees ``seq/2`` keys on average, a sliding one at most the window,
  a chunked one (``chunked_attention``) at most half a chunk;
- a **recurrent state**, if the layer has one (Mamba, gated delta-rule linear attention): FLOPs
  per state element per token (:data:`STATE_FLOPS`), independent of the sequence length.

So a Mamba or linear-attention layer pays no quadratic term, and a layer of routed experts pays
for ``top_k`` experts, not all of them.
"""

from __future__ import annotations

from typing import Any

import torch

from ppzoo.adapter import Adapter
from ppzoo.layout import SLIDING, Layout

__all__ = ["CHUNKED", "STATE_FLOPS", "active_matrix_params", "attended_keys", "module_costs", "state_flops"]

#: the layer type of chunked attention (Llama 4): a query attends within its chunk only
CHUNKED = "chunked_attention"

#: FLOPs per element of a recurrent state, per token, by the kind of update. A selective scan
#: (Mamba, Mamba-2) decays each element, adds the input's contribution and reads it into the
#: output: 3 multiply-adds. The gated delta rule (Qwen3-Next's linear attention) decays the state,
#: reads it by the key, writes the correction and reads it by the query: 4 multiply-adds.
STATE_FLOPS: dict[str, float] = {"selective-scan": 6.0, "delta-rule": 8.0}

#: config attributes that name the experts a token is routed to, first match wins
_TOP_K = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_selected_experts")


def attended_keys(kind: str, cfg: Any, seq_len: int) -> float:
    """Average keys a query of a layer of type ``kind`` attends to in a causal sequence of ``seq_len``."""
    if kind == SLIDING:
        window = getattr(cfg, "sliding_window", None) or seq_len
        return min(window, seq_len / 2)
    if kind == CHUNKED:
        chunk = getattr(cfg, "attention_chunk_size", None) or seq_len
        return min(chunk, seq_len) / 2
    return seq_len / 2


def state_flops(layer: torch.nn.Module) -> float:
    """FLOPs per token of the recurrent states ``layer`` updates (0 for a layer without one).

    The state is read off the mixer's own attributes, as transformers' modules name them: a
    selective scan keeps ``intermediate_size × ssm_state_size`` elements, the gated delta rule
    ``num_v_heads × head_k_dim × head_v_dim``.
    """
    total = 0.0
    for module in layer.modules():
        sizes = vars(module)
        if _ints(sizes, "ssm_state_size", "intermediate_size"):
            total += STATE_FLOPS["selective-scan"] * sizes["intermediate_size"] * sizes["ssm_state_size"]
        elif _ints(sizes, "num_v_heads", "head_k_dim", "head_v_dim"):
            total += STATE_FLOPS["delta-rule"] * sizes["num_v_heads"] * sizes["head_k_dim"] * sizes["head_v_dim"]
    return total


def _ints(sizes: dict[str, Any], *names: str) -> bool:
    return all(isinstance(sizes.get(n), int) and not isinstance(sizes.get(n), bool) for n in names)


def active_matrix_params(cfg: Any, layer: torch.nn.Module, matrix_params: int) -> int:
    """Matrix weights one token multiplies in ``layer``: the routed experts count by top-k.

    Routed experts are the matrices under a module named ``experts`` (fused 3-D parameters or one
    module per expert); shared experts (``shared_expert(s)``) and the router count whole. A layer
    without routed experts, or a config that names no expert count, keeps ``matrix_params``.
    """
    from ppzoo.architectures.moe import expert_counts

    counts = expert_counts(cfg)
    top_k = next((getattr(cfg, a) for a in _TOP_K if isinstance(getattr(cfg, a, None), int)), None)
    if not counts or not top_k:
        return matrix_params
    routed = sum(p.numel() for n, p in layer.named_parameters() if ".experts." in f".{n}" and p.dim() >= 2)
    experts = max(counts.values())
    return matrix_params - routed + routed * min(top_k, experts) // experts


def module_costs(
    config: Any, adapter: Adapter, model: torch.nn.Module, layout: Layout, seq_len: int
) -> dict[str, float]:
    """Estimated forward FLOPs per token of each module (backward scales them all alike).

    A layer costs its active matrices, its attention and its recurrent state (see the module
    doc), with ``heads·head_dim`` the query width the adapter's :meth:`~ppzoo.Adapter.layer_shape`
    measures (none for a layer without attention); the adapter's
    :meth:`~ppzoo.Adapter.active_matrix_params` decides the active matrices where it counts fewer
    than all. The head adds the softmax of the loss. An embedding is a lookup: a row read and
    written per token.
    """
    cfg = adapter.text_config(config)
    hidden = int(cfg.hidden_size)
    kinds = adapter.layer_types(config)
    costs: dict[str, float] = {}
    # NOTE: layers of one type and shape cost alike: a 61-layer model measures a few layers, not 61
    priced: dict[tuple, float] = {}
    for fqn in layout.modules:
        module = model.get_submodule(fqn)
        if fqn in layout.inputs:
            costs[fqn] = 2.0 * hidden * len(list(module.parameters()))
            continue
        shapes = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
        matrix = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
        if fqn in layout.outputs:
            vocab = getattr(cfg, "vocab_size", 0) if matrix else 0
            costs[fqn] = 2.0 * matrix + 5.0 * vocab + 4.0 * hidden
            continue
        kind = kinds[int(fqn.rsplit(".", 1)[1])]
        key = (kind, type(module), shapes)
        if key not in priced:
            active = adapter.active_matrix_params(cfg, module, matrix)
            if active == matrix:
                active = active_matrix_params(cfg, module, matrix)
            q_width = adapter.layer_shape(config, module).q_width
            priced[key] = 2.0 * active + 4.0 * q_width * attended_keys(kind, cfg, seq_len) + state_flops(module)
        costs[fqn] = priced[key]
    return costs
