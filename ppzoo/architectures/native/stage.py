"""A native stage: the whole CausalLM, Hugging Face's forward, steered to run one stage's share.

The stage keeps the full-length layer list; the layers other stages hold are parameter-free
stand-ins, so ``layer_types[i]``, masks, RoPE, ALiBi and multipliers stay Hugging Face's own code.
Input and output modules this stage does not hold are stand-ins too, set as plain attributes, so
they hold no parameters and ``named_modules`` / ``state_dict`` do not see them.

A stage boundary sits at the hidden-state input of a layer (or after the last layer, before a last
stage that holds only the outputs):

- *entry*: a stage other than the first calls the forward with ``inputs_embeds`` of the right
  shape; a forward pre-hook on its first own layer replaces that layer's hidden-state argument
  with the incoming hidden states. A last stage without layers gets them from the stand-in of
  the last layer, which returns them in the layer's output format.
- *exit*: the stand-in of the first layer after the stage's own (or a forward hook on the last
  layer) raises :class:`_StageExit` with the hidden states, which the stage's forward returns.
  The last stage runs to the end (final norm, head, logit scaling or soft-capping) and returns
  the logits.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
from torch import nn

from ppzoo.architectures.moe import RouterLoss, router_loss_of, router_modules
from ppzoo.architectures.native.layout import NativeLayout, StandIn

__all__ = ["StageLayers", "patch_forward", "prune"]


class _StageExit(Exception):
    """Carries a non-last stage's output out of Hugging Face's forward."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("ppzoo stage exit")
        self.hidden = hidden


class _Run:
    """What one stage's forward shares with its stand-ins and hooks."""

    def __init__(self, *, first: bool, last: bool, dtype: torch.dtype, layer_output: tuple[str, int], hidden_name: str):
        self.first, self.last, self.dtype = first, last, dtype
        self.layer_output, self.hidden_name = layer_output, hidden_name
        self.incoming: torch.Tensor | None = None

    def as_layer_output(self, hidden: torch.Tensor) -> Any:
        kind, n = self.layer_output
        if kind == "tensor":
            return hidden
        rest = [None] * (n - 1)
        return [hidden, *rest] if kind == "list" else (hidden, *rest)

    def hidden_of(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs[self.hidden_name]


class _InputStandIn(nn.Module):
    """Stands in for an input module another stage holds: zeros of the shape it would return.

    NOTE: the values never matter: a later stage's first layer gets the incoming hidden states.
    """

    def __init__(self, fqn: str, shape: StandIn, run: _Run):
        super().__init__()
        self.fqn, self.standin, self.run = fqn, shape, run

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        arg = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if arg is None:
            raise RuntimeError(f"ppzoo: the stand-in for {self.fqn!r} was called without a tensor argument")
        dtype = arg.dtype if self.standin.dtype == "argument" else self.run.dtype
        return torch.zeros(self.standin.shape(arg), dtype=dtype, device=arg.device)


class _OutputStandIn(nn.Module):
    """Stands in for an output module another stage holds; a stage exits before reaching it."""

    def __init__(self, fqn: str):
        super().__init__()
        self.fqn = fqn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"ppzoo: output module {self.fqn!r} was reached on a stage that does not hold it")


class _LayerStandIn(nn.Module):
    """Stands in for a layer another stage holds: before this stage's layers it passes the incoming
    hidden states on, at the exit it ends the forward, after the exit it is never reached."""

    def __init__(self, index: int, role: str, run: _Run, attributes: dict[str, Any], layer_class: type):
        super().__init__()
        self.__dict__.update(attributes)  # NOTE: forwards read e.g. ``layer.attention_type``
        self.index, self.role, self.run, self.layer_class = index, role, run, layer_class

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            owner = self.__dict__.get("layer_class")
            if owner is not None and hasattr(owner, name):
                raise AttributeError(
                    f"ppzoo: the model's forward uses {owner.__name__}.{name} of decoder layer {self.__dict__['index']}, "
                    "which another pipeline stage holds; the native adapter cannot split this model as configured"
                ) from None
            raise

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.role == "exit":
            raise _StageExit(self.run.hidden_of(args, kwargs))
        if self.role == "before":
            incoming = self.run.incoming
            return self.run.as_layer_output(incoming if incoming is not None else self.run.hidden_of(args, kwargs))
        raise RuntimeError(f"ppzoo: decoder layer {self.index} was reached on a stage that does not hold it")


class StageLayers(nn.ModuleDict):
    """The layer list of a stage: a list of all layers to the forward, a dict of its own to ppzoo.

    Indexing by position, slicing, ``len`` and iteration see the full-length list (own layers and
    stand-ins); ``keys``/``values``/``items`` and the registered children are the own layers,
    keyed by their original index, so parameter FQNs stay the checkpoint's.
    """

    def __init__(self, own: dict[int, nn.Module], standins: dict[int, nn.Module], total: int):
        super().__init__({str(i): layer for i, layer in own.items()})
        object.__setattr__(self, "_standins", standins)
        object.__setattr__(self, "_total", total)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):
            return super().__getitem__(index)
        if isinstance(index, slice):
            return [self[i] for i in range(self._total)[index]]
        i = range(self._total)[index]
        return self._modules[str(i)] if str(i) in self._modules else self._standins[i]

    def __iter__(self):
        return iter(self[:])

    def __len__(self) -> int:
        return self._total


def _replace(model: nn.Module, fqn: str, standin: nn.Module) -> None:
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    del parent._modules[name]
    object.__setattr__(parent, name, standin)  # NOTE: unregistered: no parameters, no state


def _attributes(layer: nn.Module) -> dict[str, Any]:
    simple = (bool, int, float, str, type(None))
    return {k: v for k, v in vars(layer).items() if not k.startswith("_") and k != "training" and isinstance(v, simple)}


def prune(model: nn.Module, found: NativeLayout, modules: tuple[str, ...], own: tuple[int, ...]) -> None:
    """Turn ``model`` into the stage holding ``modules`` (layers ``own``): stand-ins, entry, exit."""
    layout, held = found.layout, set(modules)
    # NOTE: the router aux term of a stage is weighted by its share of the whole model's routers,
    # which only the model before pruning shows
    object.__setattr__(model, "_ppzoo_routers", len(router_modules(model)))
    first, last = set(layout.inputs) <= held, set(layout.outputs) <= held
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    run = _Run(first=first, last=last, dtype=dtype, layer_output=found.layer_output, hidden_name=found.hidden_name)
    for copy_, source in found.local_ties.items():
        owner = next((m for m in modules if source.startswith(m + ".")), None)
        if owner is not None:
            # NOTE: one parameter, as in Hugging Face's model (the meta build leaves ties undone)
            parent, _, name = copy_.rpartition(".")
            setattr(model.get_submodule(parent), name, model.get_parameter(source))
    for fqn in layout.inputs:
        if fqn not in held:
            _replace(model, fqn, _InputStandIn(fqn, found.standins[fqn], run))
    for fqn in layout.outputs:
        if fqn not in held:
            _replace(model, fqn, _OutputStandIn(fqn))
    container = model.get_submodule(layout.layers)
    n = layout.num_layers
    begin = own[0] if own else (n if last else 0)
    stop = own[-1] + 1 if own else begin  # the first layer after the stage's own
    standins = {}
    for i in sorted(set(range(n)) - set(own)):
        role = "before" if i < begin else ("exit" if i == stop and not last else "after")
        standins[i] = _LayerStandIn(i, role, run, _attributes(container[i]), type(container[i]))
    layers = StageLayers({i: container[i] for i in own}, standins, n)
    parent_name, _, name = layout.layers.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, layers)
    if own and not first:
        layers[own[0]].register_forward_pre_hook(functools.partial(_enter, run=run), with_kwargs=True)
    if own and not last and stop == n:
        layers[own[-1]].register_forward_hook(_leave)
    base = model.base_model
    if base is not model and not any(True for _ in base.parameters()):
        # NOTE: some forwards read the base model's dtype from ``next(self.parameters())``; a last
        # stage that holds only a head outside it would find none. An empty tensor of the stage's
        # dtype and device answers them; the stage's own parameters() never asks the base model.
        object.__setattr__(base, "parameters", functools.partial(_dtype_probe, model))
    object.__setattr__(model, "_ppzoo_run", run)


def _dtype_probe(model: nn.Module, recurse: bool = True):
    held = next(model.parameters())
    yield torch.empty(0, dtype=held.dtype, device=held.device)


def _enter(module: nn.Module, args: tuple, kwargs: dict, *, run: _Run):
    if run.incoming is None:
        return None
    if args:
        return (run.incoming, *args[1:]), kwargs
    return args, {**kwargs, run.hidden_name: run.incoming}


def _leave(module: nn.Module, args: tuple, out: Any):
    raise _StageExit(out if isinstance(out, torch.Tensor) else out[0])


def patch_forward(lm: nn.Module) -> None:
    """Make ``lm(x, attention_mask=None, position_ids=None)`` run this stage's share of the forward."""
    run: _Run = lm._ppzoo_run
    params = inspect.signature(type(lm).forward).parameters
    takes = set(params) if not any(p.kind is p.VAR_KEYWORD for p in params.values()) else None
    extra = {"use_cache": False} if takes is None or "use_cache" in takes else {}
    recipe = router_loss_of(type(lm))
    if isinstance(recipe, RouterLoss) and recipe.switch in params:
        # NOTE: each stage records its own router logits (``ppzoo.architectures.moe``); the
        # forward's own aux loss would see only this stage's share, or none
        extra[recipe.switch] = False
    lm.forward = types.MethodType(functools.partial(_stage_forward, run=run, extra=extra, takes=takes), lm)


def _stage_forward(
    lm: nn.Module, x: torch.Tensor, attention_mask=None, position_ids=None, *, run: _Run, extra: dict, takes: set | None
):
    kwargs = dict(extra)
    for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if takes is None or name in takes:
            kwargs[name] = value
        elif value is not None:
            raise ValueError(f"{type(lm).__name__}.forward takes no {name}; run this model without passing one")
    if run.first:
        kwargs["input_ids"] = x
    else:
        # NOTE: only shape, dtype and device of inputs_embeds matter here (the first own layer
        # gets ``x``); zeros, so that no in-place op of the forward can touch the incoming tensor.
        kwargs["inputs_embeds"] = torch.zeros_like(x)
        run.incoming = x
    try:
        out = type(lm).forward(lm, **kwargs)
    except _StageExit as stop:
        return _owned(stop.hidden)
    finally:
        run.incoming = None
    if not run.last:
        raise RuntimeError("ppzoo: a stage that does not hold the head ran past its last layer")
    return _owned(out.logits if hasattr(out, "logits") else out[0])


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    # NOTE: the zero-bubble schedules detach a stage's output in place, which a view (a layer
    # that returns ``x.view(...)``) does not allow
    return tensor.clone() if tensor._is_view() else tensor
