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
from collections import UserDict
from typing import Any, NamedTuple

import torch
from torch import nn

from ppzoo.architectures.moe import RouterLoss, router_loss_of, router_modules
from ppzoo.architectures.native.boundary import Boundary
from ppzoo.architectures.native.layout import NativeLayout, StandIn
from ppzoo.vision import image_token_id, stage_image_kwargs

__all__ = ["StageLayers", "patch_forward", "prune", "stage_cache"]


class _StageExit(Exception):
    """Carries a non-last stage's output out of Hugging Face's forward."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("ppzoo stage exit")
        self.hidden = hidden


class _Run:
    """What one stage's forward shares with its stand-ins and hooks."""

    def __init__(
        self,
        *,
        first: bool,
        last: bool,
        dtype: torch.dtype,
        layer_output: tuple[str, int],
        hidden_name: str,
        boundary: Boundary,
        begin: int,
        num_layers: int,
        own: tuple[int, ...] = (),
    ):
        self.first, self.last, self.dtype = first, last, dtype
        self.layer_output, self.hidden_name = layer_output, hidden_name
        self.boundary, self.begin, self.num_layers = boundary, begin, num_layers
        self.own = own
        #: a first stage that is not the last computes the carried values of the later stages'
        #: layers: the stand-ins after its own layers read them from their arguments
        self.collecting = first and not last and any(s.kind == "argument" for s in boundary.slots)
        self.reset()

    def reset(self) -> None:
        self.incoming: torch.Tensor | None = None
        self.carried: list[torch.Tensor] | None = None
        self.values: dict[int, torch.Tensor] = {}
        self.states: dict[str, Any] = {}
        self.exit_hidden: torch.Tensor | None = None

    def see(self, index: int, args: tuple, kwargs: dict) -> None:
        """Note the dict-like state arguments, and on a collecting stage the carried arguments of layer ``index``."""
        for slot in self.boundary.slots:
            if slot.kind == "state" and slot.name in kwargs:
                self.states[slot.name] = kwargs[slot.name]
        if not self.collecting:
            return
        for k, slot in enumerate(self.boundary.slots):
            for layer, name, position in slot.uses:
                if layer == index:
                    value = args[position] if position is not None and position < len(args) else kwargs.get(name)
                    if isinstance(value, torch.Tensor):
                        self.values[k] = value

    def outgoing(self, hidden: torch.Tensor) -> torch.Tensor:
        """What this stage hands the next: ``hidden`` and, when the model carries values, those."""
        if not self.boundary.carries:
            return hidden
        values: list[torch.Tensor | None] = []
        for k, slot in enumerate(self.boundary.slots):
            value = self.values.get(k)
            if slot.kind == "state":
                entry = self.states.get(slot.name, {}).get(slot.key) if slot.name in self.states else None
                value = entry[slot.element] if entry is not None else None
            if value is None and self.carried is not None:
                value = self.carried[k]
            values.append(value)
        return self.boundary.pack(hidden, values)

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
    """Stands in for an output module (or an image module) another stage holds; a stage exits
    before reaching an output module, and only the first stage is given images."""

    def __init__(self, fqn: str):
        super().__init__()
        self.fqn = fqn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"ppzoo: module {self.fqn!r} was reached on a stage that does not hold it")


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
        run = self.run
        if self.role == "before":
            incoming = run.incoming
            return run.as_layer_output(incoming if incoming is not None else run.hidden_of(args, kwargs))
        if self.role == "exit":
            run.see(self.index, args, kwargs)
            if not run.collecting:
                raise _StageExit(run.hidden_of(args, kwargs))
            run.exit_hidden = run.hidden_of(args, kwargs)
        elif not run.collecting:
            raise RuntimeError(f"ppzoo: decoder layer {self.index} was reached on a stage that does not hold it")
        else:
            run.see(self.index, args, kwargs)
        # NOTE: a collecting stage runs on through the stand-ins (passing the hidden states on) to
        # read every later layer's carried arguments, and leaves at the last one
        if self.index == run.num_layers - 1:
            raise _StageExit(run.exit_hidden)
        return run.as_layer_output(run.hidden_of(args, kwargs))


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


class _ListWithStandIns(nn.ModuleList):
    """A ``ModuleList`` of input or output modules (Gemma 3n's AltUp projections) some of which are
    stand-ins: the forward indexes and iterates all of them, ppzoo sees only the registered ones."""

    def _all(self) -> list[nn.Module]:
        standins = self.__dict__["_ppzoo_standins"]
        return [self._modules[k] if k in self._modules else standins[k] for k in self.__dict__["_ppzoo_order"]]

    def __getitem__(self, index: Any) -> Any:
        members = self._all()
        return members[index]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self.__dict__["_ppzoo_order"])


def _replace(model: nn.Module, fqn: str, standin: nn.Module) -> None:
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if type(parent) in (nn.ModuleList, _ListWithStandIns):
        if not isinstance(parent, _ListWithStandIns):
            parent.__dict__["_ppzoo_order"] = list(parent._modules)
            parent.__dict__["_ppzoo_standins"] = {}
            parent.__class__ = _ListWithStandIns
        parent.__dict__["_ppzoo_standins"][name] = standin
        del parent._modules[name]
        return
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
    n = layout.num_layers
    begin = own[0] if own else (n if last else 0)
    stop = own[-1] + 1 if own else begin  # the first layer after the stage's own
    run = _Run(
        first=first,
        last=last,
        dtype=dtype,
        layer_output=found.layer_output,
        hidden_name=found.hidden_name,
        boundary=found.boundary,
        begin=begin,
        num_layers=n,
        own=tuple(own),
    )
    for copy_, source in found.local_ties.items():
        owner = next((m for m in modules if source.startswith(m + ".")), None)
        if owner is not None:
            # NOTE: one parameter, as in Hugging Face's model (the meta build leaves ties undone)
            parent, _, name = copy_.rpartition(".")
            setattr(model.get_submodule(parent), name, model.get_parameter(source))
    for fqn in layout.inputs:
        if fqn in found.images and fqn not in held:
            _replace(model, fqn, _OutputStandIn(fqn))  # NOTE: images reach the first stage only
        elif fqn not in held:
            _replace(model, fqn, _InputStandIn(fqn, found.standins[fqn], run))
    for fqn in layout.outputs:
        if fqn not in held:
            _replace(model, fqn, _OutputStandIn(fqn))
    for fqn in () if first else found.image_parameters:
        # NOTE: read by the image code only, which runs on the first stage (ppzoo.vision)
        parent, _, name = fqn.rpartition(".")
        del (model.get_submodule(parent) if parent else model)._parameters[name]
    container = model.get_submodule(layout.layers)
    standins = {}
    for i in sorted(set(range(n)) - set(own)):
        role = "before" if i < begin else ("exit" if i == stop and not last else "after")
        standins[i] = _LayerStandIn(i, role, run, _attributes(container[i]), type(container[i]))
    layers = StageLayers({i: container[i] for i in own}, standins, n)
    parent_name, _, name = layout.layers.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, layers)
    if own and not first:
        layers[own[0]].register_forward_pre_hook(functools.partial(_enter, run=run), with_kwargs=True)
        for i in own:
            uses = [
                (k, name, position)
                for k, s in enumerate(found.boundary.slots)
                for layer, name, position in s.uses
                if layer == i
            ]
            if uses:
                layers[i].register_forward_pre_hook(functools.partial(_give, run=run, uses=uses), with_kwargs=True)
    elif own and found.boundary.slots:
        layers[own[0]].register_forward_pre_hook(functools.partial(_note_states, run=run), with_kwargs=True)
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
    if run.carried is not None:
        # NOTE: state entries (keys and values to reuse) stored by layers before this stage
        for k, slot in enumerate(run.boundary.slots):
            if slot.kind == "state" and slot.since <= run.begin and isinstance(kwargs.get(slot.name), UserDict):
                entry = list(kwargs[slot.name].get(slot.key, ()))
                entry += [None] * (slot.element + 1 - len(entry))
                entry[slot.element] = run.carried[k]
                kwargs[slot.name][slot.key] = tuple(entry)
        _note_states(module, args, kwargs, run=run)
    if args:
        return (run.incoming, *args[1:]), kwargs
    return args, {**kwargs, run.hidden_name: run.incoming}


def _note_states(module: nn.Module, args: tuple, kwargs: dict, *, run: _Run):
    for slot in run.boundary.slots:
        if slot.kind == "state" and slot.name in kwargs:
            run.states[slot.name] = kwargs[slot.name]


def _give(module: nn.Module, args: tuple, kwargs: dict, *, run: _Run, uses: list):
    """Give a layer of a later stage the carried arguments the first stage computed."""
    if run.carried is None:
        return None
    args, kwargs = list(args), dict(kwargs)
    for k, name, position in uses:
        if position is not None and position < len(args):
            args[position] = run.carried[k]
        else:
            kwargs[name] = run.carried[k]
    return tuple(args), kwargs


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
    # NOTE: transformers renamed past_key_values -> cache; a forward taking **kwargs gets the new name
    cache_name = next((n for n in ("cache", "past_key_values") if n in params), "cache" if takes is None else None)
    generation = _Generation(cache_name, "logits_to_keep" in params, takes is None or "use_cache" in takes)
    lm.forward = types.MethodType(
        functools.partial(_stage_forward, run=run, extra=extra, takes=takes, generation=generation), lm
    )


class _Generation(NamedTuple):
    """How the CausalLM forward takes what generation gives a stage."""

    cache_name: str | None  # the cache keyword, None when the forward takes none
    logits_to_keep: bool
    use_cache: bool


def _stage_forward(
    lm: nn.Module,
    x: torch.Tensor,
    attention_mask=None,
    position_ids=None,
    cache=None,
    logits_to_keep: int = 0,
    *,
    run: _Run,
    extra: dict,
    takes: set | None,
    generation: _Generation,
    **inputs: Any,
):
    """The stage's share of Hugging Face's forward; with ``cache`` (generation, :mod:`ppzoo.generation`)
    its own layers read and extend their KV cache, and a last stage keeps ``logits_to_keep`` positions."""
    kwargs = dict(extra)
    if position_ids is not None and position_ids.dim() == 3:
        position_ids = position_ids.transpose(0, 1)  # NOTE: multimodal positions travel batch first
    if inputs:  # NOTE: a vision-language model's per-token inputs and image features (ppzoo.vision)
        kwargs.update(stage_image_kwargs(lm, x, run.first, inputs, image_token_id(lm.config)))
    for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if takes is None or name in takes:
            kwargs[name] = value
        elif value is not None:
            raise ValueError(f"{type(lm).__name__}.forward takes no {name}; run this model without passing one")
    if cache is not None and run.own:
        # NOTE: a stage without layers has nothing to cache; its forward runs as in training
        if generation.cache_name is None:
            raise ValueError(f"{type(lm).__name__}.forward takes no cache, so its stages cannot generate")
        kwargs[generation.cache_name] = stage_cache(cache, run.own, run.num_layers)
        if generation.use_cache:
            kwargs["use_cache"] = True
    if logits_to_keep and run.last and generation.logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    run.reset()
    if run.first:
        kwargs["input_ids"] = x
    elif run.boundary.carries:
        # NOTE: token ids of zeros: every input module is a stand-in here, and a forward that
        # computes per-layer inputs from the ids (Gemma 4) cannot compute them from embeddings
        run.incoming, run.carried = run.boundary.unpack(x)
        kwargs.setdefault("input_ids", torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))
    else:
        # NOTE: only shape, dtype and device of inputs_embeds matter here (the first own layer
        # gets ``x``); zeros, so that no in-place op of the forward can touch the incoming tensor.
        if "input_ids" not in kwargs:  # NOTE: a vision-language model's later stages get the ids
            kwargs["inputs_embeds"] = torch.zeros_like(x)
        run.incoming = x
    try:
        out = type(lm).forward(lm, **kwargs)
    except _StageExit as stop:
        return _owned(run.outgoing(stop.hidden))
    finally:
        run.reset()
        if generation.cache_name in kwargs:
            _advance(kwargs[generation.cache_name], x.shape[1])
    if not run.last:
        raise RuntimeError("ppzoo: a stage that does not hold the head ran past its last layer")
    return _owned(out.logits if hasattr(out, "logits") else out[0])


def stage_cache(cache: Any, own: tuple[int, ...], num_layers: int) -> Any:
    """``cache`` (a transformers ``Cache`` over the whole model's layers) with the layers other
    stages hold made ``DummyLayer``s, once: transformers then sizes every mask, and counts the
    tokens seen, from the first of this stage's own layers of each type.

    NOTE: transformers' mask functions and ``get_seq_length`` pick the first full (or sliding, or
    attention) layer of the cache that is not a dummy; the unsplit model's first layer of a type
    has seen the same tokens as every other, so the sizes agree.
    """
    from transformers.cache_utils import CacheLayerMixin, DummyLayer

    if getattr(cache, "_ppzoo_stage_layers", None) == own:
        return cache
    layers = cache.layers
    while len(layers) < num_layers and cache.layer_class_to_replicate is not None:
        layers.append(cache.layer_class_to_replicate())
    held = set(own)
    others = [i for i in range(len(layers)) if i not in held]
    for i in others:
        layers[i] = DummyLayer()
    if others and not any(isinstance(layers[i], CacheLayerMixin) for i in own):
        # NOTE: a stage of only linear-attention (Mamba, gated delta net) layers: transformers
        # still asks an attention layer how many tokens were seen, for masks and positions
        layers[others[0]] = _seen_tokens_class()()
    cache._ppzoo_stage_layers = own
    return cache


@functools.cache
def _seen_tokens_class() -> type:
    # NOTE: made on first use: transformers is imported lazily
    from transformers.cache_utils import DynamicLayer

    class SeenTokens(DynamicLayer):
        """In a stage without attention layers, another stage's attention layer: stores nothing and
        counts the tokens the stage has seen (:func:`_advance`), which is what transformers asks it."""

        def __init__(self):
            super().__init__()
            self.seen = 0

        def get_seq_length(self) -> int:
            return self.seen

        def update(self, *args, **kwargs):
            raise RuntimeError("ppzoo: another stage's attention layer was given keys and values on this stage")

        def batch_select_indices(self, indices) -> None:
            pass

        def reorder_cache(self, beam_idx) -> None:
            pass

    return SeenTokens


def _advance(cache: Any, tokens: int) -> None:
    for layer in cache.layers:
        if hasattr(layer, "seen"):
            layer.seen += tokens


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    # NOTE: the zero-bubble schedules detach a stage's output in place, which a view (a layer
    # that returns ``x.view(...)``) does not allow
    return tensor.clone() if tensor._is_view() else tensor
