"""The cost model: estimated forward FLOPs per token of each module of a layout.

The planner balances stages by these costs (:mod:`ppzoo.split`); they need the module tree on the
meta device only, never weights.
"""

from __future__ import annotations

from typing import Any

import torch

from ppzoo.adapter import Adapter
from ppzoo.layout import SLIDING, Layout

__all__ = ["module_costs"]


def module_costs(
    config: Any, adapter: Adapter, model: torch.nn.Module, layout: Layout, seq_len: int
) -> dict[str, float]:
    """Estimated forward FLOPs per token of each module (backward scales them all alike).

    Matrix multiplies cost 2 FLOPs per weight; attention adds 4·heads·head_dim per attended key
    (a causal query sees seq/2 keys on average, a sliding one at most the window), with
    ``heads·head_dim`` the query width the adapter's :meth:`~ppzoo.Adapter.layer_shape` measures
    (none for a layer without attention); the head adds the softmax of the loss. An embedding is
    a lookup: a row read and written per token.
    """
    cfg = adapter.text_config(config)
    hidden = int(cfg.hidden_size)
    window = getattr(cfg, "sliding_window", None) or seq_len
    kinds = adapter.layer_types(config)
    costs: dict[str, float] = {}
    for fqn in layout.modules:
        module = model.get_submodule(fqn)
        matrix = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
        if fqn in layout.inputs:
            costs[fqn] = 2.0 * hidden * len(list(module.parameters()))
        elif fqn in layout.outputs:
            vocab = getattr(cfg, "vocab_size", 0) if matrix else 0
            costs[fqn] = 2.0 * matrix + 5.0 * vocab + 4.0 * hidden
        else:
            index = int(fqn.rsplit(".", 1)[1])
            keys = min(window, seq_len / 2) if kinds[index] == SLIDING else seq_len / 2
            q_width = adapter.layer_shape(config, module).q_width
            costs[fqn] = 2.0 * adapter.active_matrix_params(cfg, module, matrix) + 4.0 * q_width * keys
    return costs
