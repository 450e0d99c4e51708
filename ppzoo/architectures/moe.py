"""What every mixture-of-experts adapter shares: expert key conversion, cost, router aux loss.

**Checkpoint keys.** Transformers holds each layer's experts as fused 3-D parameters
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``), while hub
checkpoints, and ``save_pretrained``, hold one matrix per expert (``mlp.experts.3.gate_proj.weight``;
Mixtral: ``block_sparse_moe.experts.3.w1.weight``). :class:`ExpertKeyMap` reads either layout into
the fused parameters (gate and up stacked over experts, then concatenated along dim 1, as
transformers' own conversion does) and :meth:`ExpertKeyMap.split` is its exact inverse, writing
the hub layout.

**Cost.** A token multiplies only ``top_k`` of the ``E`` routed experts: the plan counts routed
expert weights at ``top_k / E`` and everything else (attention, router, shared expert) in full.

**Router aux loss.** With ``output_router_logits=True`` the CausalLM forward adds
``router_aux_loss_coef * load_balancing_loss(router logits of every MoE layer, attention_mask)``
to the loss. Only hidden states cross a stage boundary, so each stage records the router logits
of its own MoE layers during forward, in layer order, on the side channel
``stage.ppzoo_router_logits`` (a list, replaced at every forward). :meth:`MoEAdapter.aux_loss`
evaluates transformers' own ``load_balancing_loss_func`` over the recorded logits of the stages it
is given, times the coefficient, times the share of the model's MoE layers those stages hold:

- given every stage of the model, run on the same tokens (the single-process stage chain, one
  microbatch), it equals Hugging Face's aux loss exactly, gradients included;
- given some of the stages (one pipeline rank), it is that share's term. Exact equality with
  Hugging Face is impossible there: the loss couples all layers, and all tokens of the batch,
  through products of per-expert sums. The terms of disjoint stage groups add up to the
  whole-model value when every layer routes alike. In a pipeline each stage's term belongs on
  that stage (its gradient reaches only that stage's routers), per microbatch, averaged over
  the microbatches.

The aux loss is None when ``output_router_logits`` is off, as in Hugging Face.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ppzoo.adapter import KeyMap
from ppzoo.architectures.llama import LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.validation import Problem

__all__ = ["EXPERT_COUNTS", "ExpertKeyMap", "MoEAdapter", "expert_counts"]

#: config attributes that count a mixture of experts' experts, across families
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_counts(cfg: Any) -> dict[str, int]:
    """The expert-count attributes ``cfg`` sets to a positive integer, by name."""
    counts = {a: getattr(cfg, a, None) for a in EXPERT_COUNTS}
    return {a: v for a, v in counts.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}


_EXPERTS = re.compile(r"^(?P<block>.+)\.experts\.(?P<param>\w+)$")
_LAYER_BLOCK = re.compile(r"^(?P<layer>.+\.layers\.\d+)\.(?P<block>\w+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class ExpertKeyMap(KeyMap):
    """Fused expert parameters ⇄ per-expert checkpoint keys.

    Attributes:
        num_experts: experts per MoE layer.
        fused: fused parameter name → the per-expert matrices it concatenates along dim 1,
            e.g. ``{"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}``.
        renames: ``(module name, checkpoint name)`` pairs for a layer's MoE block whose hub name
            differs (Mixtral's ``("mlp", "block_sparse_moe")``); :meth:`split` writes the hub name.
    """

    num_experts: int = 0
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()

    def _checkpoint_name(self, fqn: str) -> str:
        m = _LAYER_BLOCK.match(fqn)
        for module_name, checkpoint_name in self.renames:
            if m and m["block"] == module_name:
                return f"{m['layer']}.{checkpoint_name}.{m['rest']}"
        return fqn

    def _per_expert(self, name: str) -> list[str] | None:
        """Per-expert keys of a fused parameter, matrix-major (all gates, then all ups), else None."""
        m = _EXPERTS.match(name)
        if m is None or m["param"] not in self.fused:
            return None
        return [
            f"{m['block']}.experts.{e}.{matrix}.weight"
            for matrix in self.fused[m["param"]]
            for e in range(self.num_experts)
        ]

    def sources(self, fqn, available):
        for name in dict.fromkeys((fqn, self._checkpoint_name(fqn))):
            if available(name):
                return [name]
            experts = self._per_expert(name)
            if experts and any(available(k) for k in experts):
                return experts  # the loader names any expert that is missing
        return [fqn]

    def combine(self, fqn, tensors):
        if self._per_expert(fqn) is None or len(tensors) == 1:
            return super().combine(fqn, tensors)
        e = self.num_experts
        return torch.cat([torch.stack(tensors[i : i + e]) for i in range(0, len(tensors), e)], dim=1)

    def split(self, fqn, tensor):
        name = self._checkpoint_name(fqn)
        keys = self._per_expert(name)
        if keys is None:
            return {name: tensor}
        if tensor.shape[0] != self.num_experts:
            raise ValueError(f"{fqn!r} has {tensor.shape[0]} experts in dim 0, expected {self.num_experts}")
        matrices = tensor.chunk(len(keys) // self.num_experts, dim=1)
        values = [m[e] for m in matrices for e in range(self.num_experts)]
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in zip(keys, values, strict=True)}


class MoEAdapter(LlamaAdapter):
    """A Llama-like layout whose layers' MLPs route tokens to fused experts."""

    capabilities = frozenset({Capability.MOE, Capability.ROUTER_AUX_LOSS})
    #: fused expert parameter → per-expert checkpoint matrices (see :class:`ExpertKeyMap`)
    expert_matrices: dict[str, tuple[str, ...]] = {}
    #: ``(module name, checkpoint name)`` of the MoE block where hub checkpoints differ
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def num_experts(self, config: Any) -> int:
        return int(config.num_experts)

    def moe_layers(self, config: Any) -> list[int]:
        """Indices of the layers with a router (all of them unless a subclass says otherwise)."""
        return list(range(int(config.num_hidden_layers)))

    def key_map(self, config):
        return ExpertKeyMap(
            num_experts=self.num_experts(self.text_config(config)),
            fused=dict(self.expert_matrices),
            renames=self.checkpoint_renames,
        )

    def active_matrix_params(self, config, layer, matrix_params):
        routed = sum(p.numel() for n, p in layer.named_parameters() if ".experts." in f".{n}" and p.dim() >= 2)
        top_k, experts = int(config.num_experts_per_tok), self.num_experts(config)
        return matrix_params - routed + routed * top_k // experts

    def validate(self, config, plan=None):
        problems = super().validate(config, plan)
        cfg = self.text_config(config)
        if not 1 <= int(cfg.num_experts_per_tok) <= self.num_experts(cfg):
            problems.append(
                Problem(
                    "experts-per-token",
                    f"num_experts_per_tok={cfg.num_experts_per_tok} must be between 1 and the "
                    f"{self.num_experts(cfg)} experts per layer",
                )
            )
        return problems

    def validation_cases(self):
        config = self.tiny_config()
        experts = self.num_experts(config)
        config.num_experts_per_tok = experts + 1
        return [(config, "experts-per-token")]

    # -- router logits side channel and aux loss ------------------------------------------------
    def patch_causal_lm_forward(self, lm: nn.Module) -> None:
        super().patch_causal_lm_forward(lm)
        recorder = type(lm)._can_record_outputs["router_logits"]
        lm.ppzoo_router_logits = []

        def record(module, args, output):
            lm.ppzoo_router_logits.append(output[recorder.index])

        for module in lm.modules():
            if isinstance(module, recorder.target_class):
                module.register_forward_hook(record)
        lm.forward = functools.partial(_recording_forward, lm, lm.forward)

    def aux_loss(self, config, stages: Sequence[nn.Module], attention_mask=None):
        cfg = self.text_config(config)
        if not getattr(cfg, "output_router_logits", False):
            return None
        logits = tuple(t for stage in stages for t in stage.ppzoo_router_logits)
        if not logits:
            return torch.zeros((), device=_device(stages))
        hf_loss = _modeling_attribute(stages[0], "load_balancing_loss_func")
        loss = hf_loss(logits, self.num_experts(cfg), int(cfg.num_experts_per_tok), attention_mask)
        share = len(logits) / len(self.moe_layers(cfg))
        return cfg.router_aux_loss_coef * (loss if share == 1 else loss * share)


def _recording_forward(lm: nn.Module, forward, *args, **kwargs):
    lm.ppzoo_router_logits = []
    return forward(*args, **kwargs)


def _modeling_attribute(stage: nn.Module, name: str):
    """``name`` from the transformers modeling module that defines the stage's model class.

    NOTE: the class's MRO, not the class itself: FSDP2's ``fully_shard`` swaps in a class of its
    own (defined in torch) that derives from the Hugging Face one.
    """
    for cls in type(stage).__mro__:
        module = inspect.getmodule(cls)
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"no {name} in the modeling module of {type(stage).__name__}")


def _device(stages: Sequence[nn.Module]) -> torch.device:
    return next((p.device for s in stages for p in s.parameters()), torch.device("cpu"))
