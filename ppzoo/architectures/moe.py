"""What every mixture-of-experts adapter shares: expert key conversion, cost, router aux loss.

**Checkpoint keys.** Transformers holds each layer's experts as fused 3-D parameters
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``), while hub
checkpoints, and ``save_pretrained``, hold one matrix per expert (``mlp.experts.3.gate_proj.weight``;
Mixtral: ``block_sparse_moe.experts.3.w1.weight``). ppzoo's loader and ``save_pretrained`` convert
between the two with transformers' own conversion rules (``ppzoo.checkpoint.conversion``), for
every adapter. :class:`ExpertKeyMap` remains for an adapter whose checkpoints use a per-expert
layout those rules do not cover: it reads either layout into the fused parameters (gate and up
stacked over experts, then concatenated along dim 1) and :meth:`ExpertKeyMap.split` is its exact
inverse.

**Cost.** A token multiplies only ``top_k`` of the ``E`` routed experts: the plan counts routed
expert weights at ``top_k / E`` and everything else (attention, router, shared expert) in full.

**Router aux loss.** With the family's switch on (``output_router_logits=True``) a Hugging Face
CausalLM forward adds ``coefficient * load_balancing_loss(router logits of every MoE layer,
attention_mask)`` to the loss; each family has its own ``load_balancing_loss_func``, arguments
and coefficient. ppzoo reproduces it from transformers' own code, for any family:

- *what is recorded*: the router logits transformers' output recorders capture
  (``_can_record_outputs["router_logits"]``, an ``OutputRecorder``: a module class, or a class
  name, an optional layer name and the output index), matched as transformers matches them
  (:func:`router_modules`). Only hidden states cross a stage boundary, so each stage records the
  router logits of its own layers during its forward, in call order, on the side channel
  ``stage.ppzoo_router_logits`` (:func:`record_router_logits`; a list, emptied at every forward).
- *how it is combined*: read from the CausalLM's ``forward`` source (:func:`router_loss_of`): the
  statement ``aux_loss = <fn>(outputs.router_logits, ...)`` under ``if <switch>:`` and the term
  ``loss += <weight>`` that uses it. ppzoo evaluates those two expressions, as written, with the
  stage as ``self`` and the recorded logits as ``outputs.router_logits``. A forward whose aux
  term reads anything else (the logits, the labels, other outputs) is refused by the adapters
  that use it, with that reason.

:func:`router_aux_loss` evaluates the term over the recorded logits of the stages it is given,
times the share of the model's routers those stages hold:

- given every stage of the model, run on the same tokens (the single-process stage chain, one
  microbatch), it equals Hugging Face's aux loss exactly, gradients included;
- given some of the stages (one pipeline rank), it is that share's term. Exact equality with
  Hugging Face is impossible there: the loss couples all layers, and all tokens of the batch,
  through products of per-expert sums. The terms of disjoint stage groups add up to the
  whole-model value when every layer routes alike. In a pipeline each stage's term belongs on
  that stage (its gradient reaches only that stage's routers), per microbatch, averaged over
  the microbatches (``ppzoo.aux_loss``).

The aux loss is None when the switch is off, as in Hugging Face.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import re
import textwrap
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ppzoo.adapter import KeyMap
from ppzoo.architectures.llama import LlamaAdapter
from ppzoo.capabilities import Capability
from ppzoo.validation import Problem

__all__ = [
    "EXPERT_COUNTS",
    "ExpertKeyMap",
    "MoEAdapter",
    "RouterLoss",
    "expert_counts",
    "record_router_logits",
    "router_aux_loss",
    "router_loss_of",
    "router_modules",
]

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
    #: fused expert parameter → per-expert checkpoint matrices, where transformers' conversion rules
    #: do not cover the checkpoints (see :class:`ExpertKeyMap`); empty: the rules decide
    expert_matrices: dict[str, tuple[str, ...]] = {}
    #: ``(module name, checkpoint name)`` of the MoE block where hub checkpoints differ
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def num_experts(self, config: Any) -> int:
        return int(config.num_experts)

    def moe_layers(self, config: Any) -> list[int]:
        """Indices of the layers with a router (all of them unless a subclass says otherwise)."""
        return list(range(int(config.num_hidden_layers)))

    def key_map(self, config):
        if not self.expert_matrices and not self.checkpoint_renames:
            return KeyMap()
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
        record_router_logits(lm)

    def aux_loss(self, config, stages: Sequence[nn.Module], attention_mask=None):
        return router_aux_loss(config, stages, attention_mask, routers=len(self.moe_layers(self.text_config(config))))


# -- the router aux loss, read from transformers' own code -------------------------------------------
#: the names the aux term's expressions may read besides the modeling module's globals
_CALL_NAMES = frozenset({"self", "outputs", "attention_mask"})


@dataclass(frozen=True)
class RouterLoss:
    """How a CausalLM forward adds its router aux loss, as its source says.

    Attributes:
        switch: the forward argument (and config attribute) that turns it on.
        call: ``<fn>(outputs.router_logits, ...)``, the expression whose value is the aux loss.
        weight: the expression added to the loss, reading the aux loss as ``aux``.
        aux: the name the forward gives the aux loss (``aux_loss``).
        source: the two statements, for messages.
    """

    switch: str
    call: Any
    weight: Any
    aux: str
    source: str

    def term(self, lm: nn.Module, logits: tuple[torch.Tensor, ...], attention_mask) -> torch.Tensor:
        """The term the forward of ``lm`` adds for router logits ``logits``, evaluated as written."""
        namespace = vars(_modeling_module(lm))
        outputs = types.SimpleNamespace(router_logits=logits)
        aux = eval(self.call, dict(namespace), {"self": lm, "outputs": outputs, "attention_mask": attention_mask})  # noqa: S307
        zero = torch.zeros((), dtype=logits[0].dtype, device=logits[0].device)
        return eval(self.weight, dict(namespace), {"self": lm, self.aux: aux, "loss": zero})  # noqa: S307


@functools.cache
def router_loss_of(lm_class: type) -> RouterLoss | str | None:
    """How ``lm_class.forward`` adds a router aux loss: a :class:`RouterLoss`, None when it adds
    none, or the reason ppzoo cannot reproduce it per stage (a string)."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(lm_class.forward)))
        tree = ast.parse(source)
    except (AttributeError, OSError, TypeError, SyntaxError):
        return None
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Call)
        and any(_is_router_logits(arg) for arg in ast.walk(node.value))
    ]
    if not calls:
        mentioned = any(isinstance(n, ast.Attribute) and n.attr == "router_logits" for n in ast.walk(tree))
        adds = any(_adds_to_loss(n) for n in ast.walk(tree))
        if mentioned and adds and "aux" in source:
            return f"{lm_class.__name__}.forward adds a router loss in a form ppzoo does not read"
        return None
    if len(calls) > 1:
        return f"{lm_class.__name__}.forward computes {len(calls)} router losses"
    (assign,) = calls
    aux = assign.targets[0].id
    adds = [
        n
        for n in ast.walk(tree)
        if _adds_to_loss(n) and any(isinstance(x, ast.Name) and x.id == aux for x in ast.walk(n.value))
    ]
    guard = parents.get(assign)
    while guard is not None and not isinstance(guard, ast.If):
        guard = parents.get(guard)
    if len(adds) != 1 or guard is None or not isinstance(guard.test, ast.Name):
        return f"{lm_class.__name__}.forward computes a router loss ({aux}) that ppzoo cannot follow to the loss"
    weight = adds[0].value
    if isinstance(adds[0], ast.Assign):  # loss = loss + <weight>
        weight = weight.right
    module = inspect.getmodule(lm_class)
    known = set(vars(module)) | set(vars(builtins))
    strays = sorted(
        {n.id for n in ast.walk(assign.value) if isinstance(n, ast.Name)} - _CALL_NAMES - known
        | {n.id for n in ast.walk(weight) if isinstance(n, ast.Name)} - {"self", aux, "loss"} - known
    )
    others = sorted(
        {n.attr for n in ast.walk(assign.value) if isinstance(n, ast.Attribute) and _is_name(n.value, "outputs")}
        - {"router_logits"}
    )
    if strays or others:
        what = ", ".join([*strays, *(f"outputs.{a}" for a in others)])
        return f"{lm_class.__name__}.forward's router loss reads {what}, which a stage does not have"
    return RouterLoss(
        switch=guard.test.id,
        call=compile(ast.Expression(assign.value), f"<{lm_class.__name__} router loss>", "eval"),
        weight=compile(ast.Expression(weight), f"<{lm_class.__name__} router loss weight>", "eval"),
        aux=aux,
        source=f"{ast.unparse(assign)}; loss += {ast.unparse(weight)}",
    )


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _is_router_logits(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "router_logits" and _is_name(node.value, "outputs")


def _adds_to_loss(node: ast.AST) -> bool:
    if isinstance(node, ast.AugAssign):
        return _is_name(node.target, "loss") and isinstance(node.op, ast.Add)
    return (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and _is_name(node.targets[0], "loss")
        and isinstance(node.value, ast.BinOp)
        and isinstance(node.value.op, ast.Add)
        and _is_name(node.value.left, "loss")
    )


def _recorders(model: nn.Module) -> list[Any]:
    """``model``'s ``OutputRecorder`` specs for router logits, normalised as transformers does."""
    specs = (getattr(type(model), "_can_record_outputs", None) or {}).get("router_logits")
    if specs is None:
        return []
    from transformers.utils.output_capturing import OutputRecorder

    specs = specs if isinstance(specs, list) else [specs]
    return [
        s
        if isinstance(s, OutputRecorder)
        else OutputRecorder(
            target_class=None if isinstance(s, str) else s, index=1, class_name=s if isinstance(s, str) else None
        )
        for s in specs
    ]


def router_modules(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """The modules whose outputs transformers records as router logits: ``(fqn, module, index)``.

    NOTE: matched as transformers' ``recursively_install_hooks`` matches them: the specs of the
    nearest enclosing ``PreTrainedModel``, by class or class-name suffix, then by layer name.
    """
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module, int]] = []

    def visit(module: nn.Module, fqn: str, specs: list[Any]) -> None:
        if isinstance(module, PreTrainedModel):
            specs = _recorders(module) or (specs if fqn == "" else [])
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name, specs)
        for spec in specs:
            by_class = spec.target_class is not None and isinstance(module, spec.target_class)
            by_name = spec.class_name is not None and f".{fqn}".endswith(spec.class_name)
            if not (by_class or by_name):
                continue
            if spec.layer_name is not None and f".{spec.layer_name.strip('.')}." not in f".{fqn}.":
                continue
            found.append((fqn, module, spec.index))
            break

    visit(model, "", [])
    return found


def record_router_logits(lm: nn.Module) -> None:
    """Record the router logits of ``lm``'s own layers on ``lm.ppzoo_router_logits`` at each forward.

    The list is emptied when ``lm`` is called and filled in call order, as transformers' own
    output recorders fill ``router_logits``.
    """
    lm.ppzoo_router_logits = []

    def record(index: int, module: nn.Module, args: tuple, output: Any) -> None:
        value = output[index] if isinstance(output, tuple) else output
        if value is not None:
            lm.ppzoo_router_logits.append(value)

    def reset(module: nn.Module, args: tuple, kwargs: dict) -> None:
        lm.ppzoo_router_logits = []

    for _, module, index in router_modules(lm):
        module.register_forward_hook(functools.partial(record, index))
    lm.register_forward_pre_hook(reset, with_kwargs=True)


def router_aux_loss(
    config: Any, stages: Sequence[nn.Module], attention_mask=None, *, routers: int
) -> torch.Tensor | None:
    """The router aux term of ``stages``' last forward, as the CausalLM forward adds it.

    Args:
        config: the model config (its switch decides whether there is a term).
        stages: stage modules whose router logits were recorded (:func:`record_router_logits`).
        attention_mask: the 2-D mask the stages ran with, as the forward passes it.
        routers: how many routers the whole model records per forward: the term is scaled by the
            share of them the stages hold.

    Returns:
        The term (a 0-d tensor; zero when the stages hold no router), or None when the model adds
        none (no router loss in its forward, or the switch off).

    Raises:
        ValueError: the forward adds a router loss ppzoo cannot reproduce (validation refuses
            such models first).
    """
    recipe = router_loss_of(_hf_class(stages[0]))
    if recipe is None:
        return None
    if isinstance(recipe, str):
        raise ValueError(recipe)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(cfg, recipe.switch, getattr(config, recipe.switch, False)):
        return None
    logits = tuple(t for stage in stages for t in stage.ppzoo_router_logits)
    if not logits:
        return torch.zeros((), device=_device(stages))
    term = recipe.term(stages[0], logits, attention_mask)
    share = len(logits) / routers
    return term if share == 1 else term * share


def _hf_class(stage: nn.Module) -> type:
    """The model class of ``stage`` (FSDP2's ``fully_shard`` swaps in a subclass defined in torch)."""
    return next(c for c in type(stage).__mro__ if not c.__module__.startswith("torch."))


def _modeling_module(stage: nn.Module) -> types.ModuleType:
    return inspect.getmodule(_hf_class(stage))


def _device(stages: Sequence[nn.Module]) -> torch.device:
    return next((p.device for s in stages for p in s.parameters()), torch.device("cpu"))
