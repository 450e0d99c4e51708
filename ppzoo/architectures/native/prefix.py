"""The watched forward of a few layers, for a model whose later layers repeat them.

Watching a forward costs its operators: DeepSeek-V3's 61 layers are ~10k meta operators, seconds
of torch's Python meta kernels. What the trace reads off the layers repeats with them, so
:func:`observe` watches a copy of the model cut to the shortest prefix of layers that holds one
layer of each kind (DeepSeek-V3: its 3 dense layers and one MoE layer) and extends what it saw to
every layer. It does so only where that is checked to be the same, and answers None otherwise
(the caller then watches the whole model). The cut model also serves the checkpoint-key round
trip (:func:`.keys.checkpoint_renames`), whose rules name layers by a pattern, as they do experts.
Where it is used:

- every later layer is *built* like one in the prefix: the same module classes, parameter and
  buffer shapes and dtypes, and plain attributes (numbers, strings, flags: a layer's attention
  type, whether it shares keys and values, whether it uses RoPE), an attribute that counts the
  layer's own index (``layer_idx``) compared as that count;
- the cut model is the full one cut: the same modules outside the layers, each prefix layer built
  as the full model's layer of the same index;
- the cut forward shows the plain chain: its layers called once each, in order, between the
  input and output modules, each given the previous layer's output and nothing else the trace
  tags (no per-layer inputs, no values one layer hands a later one, no layer read from outside,
  no parameter used twice, no rows of the batch mixed). What a layer is given besides (masks,
  RoPE) is computed per layer type by the model's own forward, from the config's per-layer lists,
  which the cut keeps for its layers.

A model that carries anything across its layers, or whose layers differ in a way the prefix does
not show, is watched whole, as before.

NOTE: what the checks cannot see is a forward that treats a layer by its index at run time with
nothing in the layer's build to show it (code between the layers at one index, a branch on
``layer_idx`` against a config value); every zoo row, the real-size configs of the tests
included, finds the same layout both ways (``benchmarks/prefix_layouts.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ppzoo.architectures.native.trace import Observed, layer_tag

__all__ = ["observe"]

#: config attributes that count a model's layers (``num_hidden_layers`` first)
_COUNTS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer", "num_blocks")
_PLAIN = (int, float, str, bool, type(None), torch.dtype)


def observe(
    config: Any,
    model: nn.Module,
    container: str,
    units: list[str],
    *,
    watch: Callable[[nn.Module, str, list[str]], Observed],
    units_of: Callable[[nn.Module, str], list[str]],
) -> tuple[Observed, Any, nn.Module] | None:
    """What watching ``model``'s whole forward would show, read from a cut copy, with the cut
    config and model; None where the cut is not checked to be the same (see the module docstring).

    Args:
        config: the config ``model`` was built from (eager attention, as traced).
        model: the meta model; ``container`` its layer list, ``units`` its modules outside it.
        watch: the watched forward (``model, container, units -> Observed``).
        units_of: the modules outside the layer list of a model (``model, container -> units``).
    """
    try:
        return _observe(config, model, container, units, watch, units_of)
    except Exception:  # noqa: BLE001 - any failure of the cut: the whole model is watched instead
        return None


def _observe(config, model, container, units, watch, units_of) -> tuple[Observed, Any, nn.Module] | None:
    from ppzoo.meta import meta_model

    layers = model.get_submodule(container)
    n = len(layers)
    raw = [_attributes(layer) for layer in layers]
    counting = _counting(raw)
    signatures = [_signature(layer, i, counting) for i, layer in enumerate(layers)]
    first: dict[Any, int] = {}
    for i, sig in enumerate(signatures):
        first.setdefault(sig, i)
    # NOTE: two layers at least, so that the cut shows one layer handing its output to the next
    k = max(2, max(first.values()) + 1)
    if k >= n:
        return None
    cut_config = _cut(config, n, k)
    if cut_config is None:
        return None
    cut = meta_model(cut_config, attn_implementation="eager")
    cut.eval()
    if type(cut) is not type(model) or _outside(cut, container) != _outside(model, container):
        return None
    cut_layers = cut.get_submodule(container)
    if len(cut_layers) != k or units_of(cut, container) != units:
        return None
    if any(_signature(layer, j, counting) != signatures[j] for j, layer in enumerate(cut_layers)):
        return None
    seen = watch(cut, container, units)
    if not _plain_chain(seen, k):
        return None
    return _extended(seen, k, n, [first[sig] for sig in signatures]), cut_config, cut


def _cut(config: Any, n: int, k: int) -> Any | None:
    """A copy of ``config`` whose layer counts of ``n`` are ``k`` and whose per-layer lists (of
    ``n`` entries) keep their first ``k``; None when no layer count of ``n`` is found.

    NOTE: a count that is a multiple of ``n`` (LongCat-Flash's ``num_hidden_layers``, twice its
    ``num_layers`` blocks: it counts sublayers) becomes the same multiple of ``k``.
    """
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    counts = {
        name: value
        for name in _COUNTS
        if isinstance(value := getattr(text, name, None), int) and not isinstance(value, bool) and value > 0
    }
    if n not in counts.values():
        return None
    for name, value in counts.items():
        if value % n == 0:
            setattr(text, name, value // n * k)
    for name, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and not name.startswith("_"):
            setattr(text, name, type(value)(value[:k]))
    return config


def _attributes(layer: nn.Module) -> dict[str, Any]:
    """Every plain attribute of ``layer`` and its submodules, by ``path:name``."""
    found = {}
    for path, module in layer.named_modules():
        for name, value in vars(module).items():
            if not name.startswith("_") and name != "training" and _plain(value):
                found[f"{path}:{name}"] = value
    return found


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _counting(raw: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Attributes that count the layer's index: ``{key: (a, b)}`` where layer ``i`` holds ``a·i + b``
    (``layer_idx``; a block of two sublayers: ``2·i`` and ``2·i + 1``) on every layer holding it
    (an attention layer's ``self_attn.layer_idx`` among Mamba layers)."""
    held: dict[str, list[tuple[int, Any]]] = {}
    for i, attributes in enumerate(raw):
        for key, value in attributes.items():
            held.setdefault(key, []).append((i, value))
    found = {}
    for key, values in held.items():
        if not all(isinstance(v, int) and not isinstance(v, bool) for _, v in values):
            continue
        (i0, v0), (i1, v1) = values[0], values[1] if len(values) > 1 else (values[0][0] + 1, values[0][1] + 1)
        a, rest = divmod(v1 - v0, i1 - i0)
        if a and not rest and all(v == a * (i - i0) + v0 for i, v in values):
            found[key] = (a, v0 - a * i0)
    return found


def _signature(layer: nn.Module, index: int, counting: dict[str, tuple[int, int]]) -> tuple:
    """How ``layer`` is built: module classes, parameter and buffer shapes and dtypes, and plain
    attributes, an attribute that counts the layer's index as ``"index"`` where it does."""
    parts = []
    for path, module in layer.named_modules():
        parts.append(
            (
                path,
                type(module).__module__,
                type(module).__qualname__,
                tuple(
                    (name, tuple(p.shape), p.dtype, p.requires_grad)
                    for name, p in module._parameters.items()
                    if p is not None
                ),
                tuple(
                    (name, tuple(b.shape), b.dtype, name in module._non_persistent_buffers_set)
                    for name, b in module._buffers.items()
                    if b is not None
                ),
            )
        )
    attributes = []
    for key, value in sorted(_attributes(layer).items()):
        step = counting.get(key)
        if step is not None and value == step[0] * index + step[1]:
            value = ("index", *step)
        attributes.append((key, type(value).__name__, repr(value)))
    return tuple(parts), tuple(attributes)


def _outside(model: nn.Module, container: str) -> tuple:
    """The parameters and persistent buffers outside the layer list: names, shapes, dtypes."""
    inside = container + "."
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters() if not n.startswith(inside))
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers() if not n.startswith(inside))
    return params, buffers


def _plain_chain(seen: Observed, k: int) -> bool:
    """Whether the cut forward called its ``k`` layers once each, in order and back to back, each
    given the previous one's output and no other traced value, with nothing else of note."""
    calls = [i for i, name in enumerate(seen.order) if name.startswith("layer ")]
    if [seen.order[i] for i in calls] != [f"layer {i}" for i in range(k)] or calls != list(
        range(calls[0], calls[0] + k)
    ):
        return False
    if any(seen.hidden_tags.get(i) != frozenset({layer_tag(i - 1)}) for i in range(1, k)):
        return False
    if any(seen.other_tags.get(i) for i in range(k)) or any(seen.arguments.get(i) for i in range(k)):
        return False
    if any(seen.states.get(i) for i in range(k)) or seen.state_reads or seen.layer_reads:
        return False
    if seen.reused or seen.row_mixing or set(seen.layer_output) != set(range(k)):
        return False
    layers_in_logits = {t for t in seen.logits_tags if t.startswith("layer:")}
    return layers_in_logits <= {layer_tag(k - 1)}


def _extended(seen: Observed, k: int, n: int, like: list[int]) -> Observed:
    """``seen`` (the cut forward's) for all ``n`` layers, layer ``i`` built like cut layer ``like[i]``."""
    calls = [i for i, name in enumerate(seen.order) if name.startswith("layer ")]
    order = [*seen.order[: calls[0]], *(f"layer {i}" for i in range(n)), *seen.order[calls[-1] + 1 :]]
    hidden_tags = {0: seen.hidden_tags.get(0, frozenset())} | {i: frozenset({layer_tag(i - 1)}) for i in range(1, n)}
    logits = seen.logits_tags
    if layer_tag(k - 1) in logits:
        logits = (logits - {layer_tag(k - 1)}) | {layer_tag(n - 1)}
    return Observed(
        order=order,
        hidden_name=seen.hidden_name,
        layer_output={i: seen.layer_output[like[i]] for i in range(n)},
        hidden_tags=hidden_tags,
        other_tags={i: {} for i in range(n)},
        unit_shapes=dict(seen.unit_shapes),
        logits_tags=logits,
        hidden_shape=seen.hidden_shape,
        arguments={i: {} for i in range(n)},
        states={i: {} for i in range(n)},
    )
