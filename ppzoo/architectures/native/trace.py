"""One forward of the whole model on the meta device, watched: what runs when, and what flows where.

The native adapter runs Hugging Face's own forward on every stage, so whether a split is exact
depends on what that forward does around its decoder layers. :func:`watch` runs the CausalLM once
on the meta device (no memory, no weights; where the forward reads tensor values, on a copy with
constant weights, see :func:`.layout._watch`) and records

- the order in which the parameter-holding modules outside the layers ("units") and the layers run;
- what each layer returns (a tensor, or a tuple with the hidden states first);
- how each input unit's output shape follows from its first tensor argument (for its stand-in);
- where every tensor a layer receives, and the logits, come from. A dispatch mode tags tensors
  with their origin (the token ids, a unit, a layer) and propagates tags through every operation,
  so a layer argument computed from the token ids (per-layer inputs), a value one layer hands to
  a later one (shared state), or logits that read the embeddings again are seen, not guessed;
- what the forward reads from a layer outside that layer's call (a stand-in has not got it), and
  views that mix the rows of the batch (microbatches would give another result).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import UserDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["IDS", "Observed", "layer_tag", "unit_tag", "watch"]

#: the tag of the token ids and of everything computed from them
IDS = "ids"
#: the traced batch: sizes no model dimension has, so that shapes tell batch and sequence apart
#: (NOTE: not 2, which a tiny model's key/value heads often are)
TRACE_BATCH, TRACE_SEQ = 3, 7


def unit_tag(fqn: str) -> str:
    return f"unit:{fqn}"


def layer_tag(index: int) -> str:
    return f"layer:{index}"


@dataclass
class Observed:
    """What one watched forward showed.

    Attributes:
        order: the watched modules (units and layers, by FQN) in the order they were called.
        hidden_name: the name of the layers' hidden-state parameter (the first of ``forward``).
        layer_output: per layer, ``("tensor", 0)``, ``("tuple", n)`` or ``("list", n)`` (the
            hidden states first), or the name of another type.
        hidden_tags: per layer, the origins of its hidden-state argument.
        other_tags: per layer, the origins of each other tensor argument (tagged ones only).
        unit_shapes: per unit, at its first call, ``(first tensor argument, output)``, each a
            ``(shape, dtype)`` pair; the argument is None when there was none, the output the
            name of its type when it is not a tensor.
        logits_tags: the origins of the logits.
        hidden_shape: the shape and dtype of layer 0's hidden-state argument.
        arguments: per layer, each tagged tensor argument other than the hidden states:
            ``(position, shape, dtype, identity)``, the position None for a keyword argument, the
            identity the same for one tensor given to several layers.
        states: per layer, each dict-like argument whose entries hold tensors (transformers'
            ``KVSharingDict``, filled by one layer and read by later ones): ``{key: (tags,
            ((shape, dtype), ...))}`` as it stood when the layer was called.
        state_reads: ``(layer, argument name, key)`` for each entry a layer read from such an argument.
        reused: layer parameters (``"index.name"``) used again on a value computed with them
            (Gemma 3n's AltUp router, in its prediction and then its correction).
        row_mixing: ``(shape, view)`` for each view of a ``(batch, sequence, ...)`` tensor that
            mixes the rows of the batch (see :func:`_mixes_rows`).
        layer_reads: ``(layer, name)`` for each submodule, parameter or buffer of a layer that
            the forward read outside that layer's own call (X-MOD reads layer 0's language
            adapters to pick a default language).
    """

    order: list[str] = field(default_factory=list)
    hidden_name: str = "hidden_states"
    layer_output: dict[int, Any] = field(default_factory=dict)
    hidden_tags: dict[int, frozenset[str]] = field(default_factory=dict)
    other_tags: dict[int, dict[str, frozenset[str]]] = field(default_factory=dict)
    unit_shapes: dict[str, Any] = field(default_factory=dict)
    logits_tags: frozenset[str] = frozenset()
    hidden_shape: tuple[tuple[int, ...], torch.dtype] | None = None
    arguments: dict[int, dict[str, tuple[int | None, tuple[int, ...], torch.dtype, int]]] = field(default_factory=dict)
    states: dict[int, dict[str, dict[Any, tuple[frozenset[str], tuple]]]] = field(default_factory=dict)
    state_reads: set[tuple[int, str, Any]] = field(default_factory=set)
    reused: frozenset[str] = frozenset()
    layer_reads: set[tuple[int, str]] = field(default_factory=set)
    row_mixing: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def _reporting(cls: type, report) -> type:
    """A subclass of the layer class ``cls``, of the same name, whose ``nn.Module.__getattr__``
    (submodules, parameters, buffers) calls ``report(module, name)`` first."""

    def __getattr__(self, name: str) -> Any:
        report(self, name)
        return super(watched, self).__getattr__(name)

    watched = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__})
    watched.__qualname__ = cls.__qualname__
    return watched


class _Reads(dict):
    """A dict that reports each key read (the storage of a watched ``UserDict``)."""

    def __init__(self, data: dict, report) -> None:
        super().__init__(data)
        self.report = report

    def __getitem__(self, key: Any) -> Any:
        self.report(key)
        return super().__getitem__(key)


class _Flow(TorchDispatchMode):
    """Tags tensors with their origins and propagates the tags through every operation."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        #: the layer parameters each tensor was computed with, and the parameters found used
        #: again on a value computed with them (see :attr:`Observed.reused`)
        self.params: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.used: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.reused: set[str] = set()
        #: views of a (batch, sequence, ...) tensor that mix the rows of the batch (see :attr:`Observed.row_mixing`)
        self.row_mixing: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def of(self, tree: Any) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                found |= self.tags.get(leaf, frozenset())
        return found

    def set(self, tree: Any, tags: frozenset[str]) -> None:
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                self.tags[leaf] = tags

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = _tensors((args, kwargs))
        if func in _VIEWS and leaves and isinstance(out, torch.Tensor) and _mixes_rows(leaves[0].shape, out.shape):
            self.row_mixing.append((tuple(leaves[0].shape), tuple(out.shape)))
        tags = frozenset().union(*(self.tags.get(t, _NONE) for t in leaves))
        outs = _tensors(out) if leaves else []
        if tags:
            # NOTE: an in-place op returns its (already tagged) input: the tags are merged.
            for leaf in outs:
                self.tags[leaf] = self.tags.get(leaf, _NONE) | tags
        direct = {self.params[t] for t in leaves if t in self.params}
        upstream = frozenset().union(*(self.used.get(t, _NONE) for t in leaves))
        self.reused |= direct & upstream
        if direct or upstream:
            for leaf in outs:
                self.used[leaf] = self.used.get(leaf, _NONE) | direct | upstream
        return out


_NONE: frozenset[str] = frozenset()
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _mixes_rows(before: torch.Size, after: torch.Size) -> bool:
    """Whether viewing a ``(batch, sequence, ...)`` tensor as ``after`` puts another dimension
    before the batch's rows, so that one slice along the leading dimensions spans several rows.

    NOTE: the rows stay the outermost dimension when the leading dimensions' product reaches a
    multiple of the batch size (every slice then lies in one row: a token, or a token's top-k
    copies) through sizes that only divide it (a leading 1). Doge's router views its logits
    ``(batch, seq, 2 * keys)`` as ``(2, batch * seq, keys)`` and pairs the two halves, so a token
    is routed by another token's logits, of another row too: the model's result on a batch
    differs from its result on the batch's microbatches.
    """
    if tuple(before[:2]) != (TRACE_BATCH, TRACE_SEQ):
        return False
    product = 1
    for size in after:
        product *= size
        if product % TRACE_BATCH == 0:
            return False
        if TRACE_BATCH % product:
            return True
    return False


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in an operator's arguments or results, in order.

    NOTE: what ``tree_flatten`` finds there, without its per-node registry lookups (which cost
    as much as the meta kernels of a watched forward): at the dispatch level arguments and
    results are tensors, scalars, and tuples (named ones too), lists and dicts of them.
    """
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


@contextlib.contextmanager
def _as_if_tracing() -> Iterator[None]:
    """Make transformers' mask code skip its data-dependent shortcuts, as it does under tracing.

    NOTE: checks like "is every position attended?" read tensor values, which the meta device has
    not; the traced path builds the same masks without asking.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "is_tracing", None)
    if original is None:
        yield
        return
    masking_utils.is_tracing = lambda tensor=None: True
    try:
        yield
    finally:
        masking_utils.is_tracing = original


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)


def _positional_names(layer: nn.Module) -> list[str]:
    """The names of ``layer.forward``'s positional parameters, in order (``self`` left out)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(type(layer).forward).parameters.values()
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


def watch(
    model: nn.Module,
    layers: nn.ModuleList,
    units: dict[str, nn.Module],
    *,
    batch: int = TRACE_BATCH,
    seq: int = TRACE_SEQ,
    device: str | torch.device = "meta",
) -> Observed:
    """Run ``model`` once with hooks on ``units`` and ``layers``; see :class:`Observed`.

    The token ids are made on ``device``: the meta device, or the CPU for a real-valued copy
    of a model whose forward reads tensor values (see :func:`.layout._watch`).

    Raises:
        Exception: whatever the forward raises; the caller reports it.
    """
    positional = _positional_names(layers[0])
    seen = Observed(hidden_name=positional[0] if positional else "hidden_states")
    flow = _Flow()
    index_of = {id(layer): i for i, layer in enumerate(layers)}
    handles = []

    first_args: dict[str, Any] = {}
    alive: list[torch.Tensor] = []
    current = [0]  # the layer running

    def read(name: str, key: Any) -> None:
        seen.state_reads.add((current[0], name, key))

    def unit_pre(fqn):
        def hook(module, args, kwargs):
            seen.order.append(fqn)
            arg = _first_tensor(args, kwargs)
            first_args.setdefault(fqn, None if arg is None else (tuple(arg.shape), arg.dtype))

        return hook

    def unit_post(fqn):
        def hook(module, args, kwargs, out):
            flow.set(out, flow.of(out) | {unit_tag(fqn)})
            if fqn not in seen.unit_shapes:
                result = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
                seen.unit_shapes[fqn] = (first_args[fqn], result)

        return hook

    inside = [False]  # whether a layer is running

    def outside_read(module: nn.Module, name: str) -> None:
        if not inside[0]:
            seen.layer_reads.add((index_of[id(module)], name))

    def layer_pre(module, args, kwargs):
        i = index_of[id(module)]
        inside[0] = True
        seen.order.append(f"layer {i}")
        bound, positions = dict(kwargs), {}
        if args:
            bound[seen.hidden_name] = args[0]
            for j, value in enumerate(args[1:], 1):
                name = positional[j] if j < len(positional) else f"positional argument {j}"
                bound[name], positions[name] = value, j
        hidden = bound.pop(seen.hidden_name, None)
        if i == 0 and isinstance(hidden, torch.Tensor):
            seen.hidden_shape = (tuple(hidden.shape), hidden.dtype)
        seen.hidden_tags[i] = flow.of(hidden)
        seen.other_tags[i] = {name: tags for name, value in bound.items() if (tags := flow.of(value))}
        seen.arguments[i] = {}
        for name, value in bound.items():
            if isinstance(value, torch.Tensor) and name in seen.other_tags[i]:
                alive.append(value)  # NOTE: kept alive, so that no other tensor reuses its id
                seen.arguments[i][name] = (positions.get(name), tuple(value.shape), value.dtype, id(value))
        # NOTE: pytree does not look into a UserDict (transformers' KVSharingDict): its entries,
        # which earlier layers filled, are read here
        for name, value in bound.items():
            if isinstance(value, UserDict):
                value.data = _Reads(value.data, functools.partial(read, name))
        current[0] = i
        seen.states[i] = {
            name: {
                key: (flow.of(list(entry)), tuple((tuple(t.shape), t.dtype) for t in entry))
                for key, entry in dict.items(value.data)  # NOTE: not a read
            }
            for name, value in bound.items()
            if isinstance(value, UserDict)
        }
        for name, entries in seen.states[i].items():
            tags = frozenset().union(*(tags for tags, _ in entries.values()))
            if tags:
                seen.other_tags[i][name] = tags

    def layer_post(module, args, kwargs, out):
        i = index_of[id(module)]
        inside[0] = False
        if isinstance(out, torch.Tensor):
            seen.layer_output[i] = ("tensor", 0)
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            seen.layer_output[i] = (type(out).__name__, len(out))
        else:
            seen.layer_output[i] = type(out).__name__
        # NOTE: what a layer returns comes from that layer only (its inputs were checked above)
        flow.set(out, frozenset({layer_tag(i)}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                flow.used.pop(leaf, None)

    classes = [type(layer) for layer in layers]
    watched: dict[type, type] = {}
    try:
        # NOTE: a stage stands in for the layers other stages hold; what the forward reads from a
        # layer outside its call (besides plain attributes, which stand-ins copy) they have not
        for layer, cls in zip(layers, classes):
            if cls not in watched:
                watched[cls] = _reporting(cls, outside_read)
            layer.__class__ = watched[cls]
        for fqn, unit in units.items():
            for p in unit.parameters():
                flow.tags[p] = frozenset({unit_tag(fqn)})
            handles.append(unit.register_forward_pre_hook(unit_pre(fqn), with_kwargs=True))
            handles.append(unit.register_forward_hook(unit_post(fqn), with_kwargs=True))
        for i, layer in enumerate(layers):
            for name, p in layer.named_parameters():
                flow.tags[p] = frozenset({layer_tag(i)})
                flow.params[p] = f"{i}.{name}"
            handles.append(layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_post, with_kwargs=True))
        ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        flow.tags[ids] = frozenset({IDS})
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        }
        params = inspect.signature(type(model).forward).parameters
        if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs["use_cache"] = False
        with torch.no_grad(), _as_if_tracing(), flow:
            out = model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        seen.logits_tags = flow.of(logits)
        seen.reused = frozenset(flow.reused)
        seen.row_mixing = list(flow.row_mixing)
    finally:
        for handle in handles:
            handle.remove()
        for layer, cls in zip(layers, classes):
            layer.__class__ = cls
    return seen
