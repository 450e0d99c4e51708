"""The native adapter's layout, found from the module tree and one watched meta-device forward.

:func:`discover` builds the CausalLM on the meta device, finds the decoder-layer list (the one
``ModuleList`` of ``num_hidden_layers`` modules, or of another layer count of the config where
those count sublayers), takes every module outside it that holds parameters or persistent buffers
as a *unit*, runs the forward once (:mod:`.trace`; on a copy with constant weights where the
forward reads tensor values) and sorts the units into inputs (run before the first layer) and
outputs (run after the last). It refuses, with
the reason, whatever would not split exactly at a layer boundary: a unit that runs between layers
or on both sides, a layer argument or state that cannot be carried across the boundary
(:mod:`.boundary`), a head that reads the embeddings again, parameters shared between modules,
checkpoint tensors that transformers merges or splits at load.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ppzoo.architectures.native import direct as _direct
from ppzoo.architectures.native import keys as _keys
from ppzoo.architectures.native import prefix as _prefix
from ppzoo.architectures.native import refusals as _refusals
from ppzoo.architectures.native.boundary import Boundary, plan_boundary
from ppzoo.architectures.native.keys import checkpoint_renames, tied_parameters
from ppzoo.architectures.native.refusals import short
from ppzoo.architectures.native.trace import IDS, TRACE_BATCH, TRACE_SEQ, Observed, layer_tag, unit_tag, watch
from ppzoo.layout import Layout
from ppzoo.validation import Problem

__all__ = ["NativeLayout", "StandIn", "discover"]


@dataclass(frozen=True)
class StandIn:
    """How a stand-in for an input unit shapes its output from its first tensor argument.

    ``dims`` gives each output dimension as ``("arg", j)`` (the argument's dimension ``j``: batch,
    sequence) or ``("size", n)`` (a fixed size: hidden, or a broadcast 1); ``dtype`` is
    ``"argument"`` or ``"parameters"`` (the stage's dtype).
    """

    dims: tuple[tuple[str, int], ...]
    dtype: str = "argument"

    def shape(self, arg: torch.Tensor) -> tuple[int, ...]:
        return tuple(arg.shape[n] if source == "arg" else n for source, n in self.dims)


@dataclass(frozen=True)
class NativeLayout:
    """Where a model's pieces live and how its layers are called, as the native adapter needs it.

    Attributes:
        layout: inputs, the layer list, outputs (every parameter in exactly one of them, but the
            ``image_parameters``).
        base: FQN of the base model (``transformer``, ``model``), the prefix of its TP plan.
        hidden_name: the layers' hidden-state parameter.
        layer_output: what a layer returns: ``("tensor", 0)``, or ``("tuple", n)`` / ``("list", n)``
            with the hidden states first.
        standins: per input unit, how its stand-in shapes its output.
        tied: ``{copy: source}`` tied parameters that stages hold apart: the copy in an output and
            the source in an input, or both in layers (a block several layers share, the source in
            the first).
        local_ties: ``{copy: source}`` tied parameters on one stage (both in inputs, both in
            outputs, or both in one layer: a head's bias tied to another of its biases).
        renames: ``{fqn: checkpoint key}`` where transformers saves a parameter under another name.
        boundary: what a stage hands the next one (:mod:`.boundary`).
        reused: layer parameters used again on a value computed with them (``"index.name"``).
        images: a vision-language model's image modules (vision tower, projector): inputs of the
            first stage that a text-only forward never calls (:mod:`ppzoo.vision`).
        image_parameters: parameters the base model holds itself that only its image code reads
            (LLaVA-NeXT's ``image_newline``, :mod:`.direct`): the first stage holds them, outside
            ``layout``.
    """

    layout: Layout
    base: str
    hidden_name: str
    layer_output: tuple[str, int]
    standins: dict[str, StandIn]
    tied: dict[str, str]
    local_ties: dict[str, str]
    renames: dict[str, str]
    boundary: Boundary
    reused: frozenset[str] = frozenset()
    images: tuple[str, ...] = ()
    image_parameters: tuple[str, ...] = ()


#: discovered layouts by config (its class and JSON): the planner, the loader and every stage ask
_CACHE: dict[str, NativeLayout | list[Problem]] = {}
_CACHE_SIZE = 64


def discover(config: Any) -> NativeLayout | list[Problem]:
    """The layout of ``config``'s CausalLM, or the problems that keep it from splitting exactly."""
    try:
        key = type(config).__name__ + config.to_json_string(use_diff=False)
    except Exception:  # noqa: BLE001 - an unserialisable config is traced each time
        return _discover(config)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _discover(config)
    return _CACHE[key]


def _discover(config: Any) -> NativeLayout | list[Problem]:
    from ppzoo.meta import meta_model

    kind = f"model_type {getattr(config, 'model_type', None)!r}"
    changed = _refusals.config_round_trip(config, kind)
    if changed:
        return changed
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"  # NOTE: the plainest mask path; the layout is the same
    # NOTE: routed experts as one gather and batched matmul: no data-dependent shapes, so the
    # meta device runs them (the eager loop asks which experts were hit, grouped_mm checks dtypes)
    config._experts_implementation = "batched_mm"
    try:
        model = meta_model(config, attn_implementation="eager")
    except Exception as exc:  # noqa: BLE001 - any build failure is reported, not raised
        return [Problem("native-build", f"{kind} cannot be built from its config ({type(exc).__name__}: {short(exc)})")]
    model.eval()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    built = getattr(model.config, "model_type", None)
    if built != config.model_type and built not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [
            Problem(
                "native-round-trip",
                f"{kind}: {type(model).__name__} keeps its config as model_type {built!r}, which transformers' AutoModelForCausalLM cannot load back from a checkpoint",
            )
        ]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    language, image_side = _vision_language(model)
    if language and (inside := _vision_inside_layers(model.get_submodule(language))):
        return [
            Problem(
                "vision-in-layers",
                f"{kind}: its language model's forward takes {', '.join(inside)} besides the embeddings, to hand "
                "to its layers (image features, or values computed outside it); ppzoo gives the language model "
                "the embeddings alone, with the image features merged",
            )
        ]
    lists = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and n and len(m) == n and _under(name, language)
    ]
    if not lists:
        n, lists = _sublayer_count(model, text, n, language)
    if len(lists) != 1:
        found = f"several ({', '.join(lists)})" if lists else "none"
        return [
            Problem(
                "native-layers",
                f"{kind}: the decoder layers must be the one ModuleList of num_hidden_layers={n} modules; found {found}",
            )
        ]
    container = lists[0]
    # NOTE: the base model's own parameters (LLaVA-NeXT's image_newline) may belong to the image
    # side; the trace tells whether the text-only forward reads them (:mod:`.direct`)
    top = language.rpartition(".")[0] if language else None
    direct = _direct.direct_parameters(model.get_submodule(top)) if top is not None else ()
    units, problems = _units(model, container, kind, deferred=top)
    problems += _refusals.loss_problems(model, kind)
    problems += _refusals.shared_parameters(model, kind)
    if problems:
        return problems
    try:
        with _direct.reads(model.get_submodule(top) if direct else None, direct) as read:
            # NOTE: a model whose later layers repeat its first ones is watched cut to those
            # (:mod:`.prefix`); a base model's direct parameters are watched on the model itself
            units_of = lambda m, c: _units(m, c, kind, deferred=top)[0]  # noqa: E731
            cut = None if direct else _prefix.observe(config, model, container, units, watch=_watch, units_of=units_of)
            seen = cut[0] if cut else _watch(model, container, units)
    except Exception as exc:  # noqa: BLE001
        return [
            Problem(
                "native-trace",
                f"{kind}'s forward runs neither on the meta device nor on a copy with constant weights, so its "
                f"layout cannot be read ({short(exc)})",
            )
        ]
    layer_calls = [i for i, name in enumerate(seen.order) if name.startswith("layer ")]
    if [seen.order[i] for i in layer_calls] != [f"layer {i}" for i in range(n)]:
        calls = [seen.order[i] for i in layer_calls]
        return [
            Problem(
                "native-layer-order",
                f"{kind}'s forward does not call its {n} decoder layers once each, in order (it called {calls[:8]})",
            )
        ]
    if seen.row_mixing:
        shape, view = seen.row_mixing[0]
        return [
            Problem(
                "native-batch-rows",
                f"{kind}'s forward views a (batch, sequence, ...) tensor {shape} as {view}, which mixes the rows of "
                "the batch: its result on a batch differs from its result on the batch's microbatches, which a "
                "pipeline runs",
            )
        ]
    if seen.layer_reads:
        i, name = min(seen.layer_reads)
        return [
            Problem(
                "native-layer-attribute",
                f"{kind}'s forward reads {name!r} of decoder layer {i} outside that layer, which a stage "
                "without the layer does not hold",
            )
        ]
    start, end = layer_calls[0], layer_calls[-1]
    inputs, outputs = [], []
    images = []
    image_parameters: tuple[str, ...] = ()
    if direct:
        image_parameters, direct_problems = _direct.image_parameters(model.get_submodule(top), top, direct, read, kind)
        problems += direct_problems
    for fqn in units:
        calls = [i for i, name in enumerate(seen.order) if name == fqn]
        if not calls and any(_under(fqn, side) for side in image_side):
            images.append(fqn)  # NOTE: the vision tower and projector: run on images, before the layers
        elif not calls:
            problems.append(
                Problem(
                    "native-unused-module", f"{kind}: module {fqn!r} holds parameters but the forward never calls it"
                )
            )
        elif all(i < start for i in calls):
            inputs.append((calls[0], fqn))
        elif all(i > end for i in calls):
            outputs.append((calls[0], fqn))
        else:
            problems.append(
                Problem(
                    "native-between-layers",
                    f"{kind}: module {fqn!r} runs between or on both sides of the decoder layers, so no stage boundary can leave it out",
                )
            )
    inputs_, outputs_ = [f for _, f in sorted(inputs)], [f for _, f in sorted(outputs)]
    boundary, flow_problems = _flow_problems(seen, inputs_, outputs_, n, kind)
    problems += flow_problems
    standins = {}
    for fqn in inputs_:
        made = _standin(seen.unit_shapes.get(fqn))
        if made is None:
            problems.append(
                Problem(
                    "native-input-module",
                    f"{kind}: input module {fqn!r} maps {seen.unit_shapes.get(fqn)} (argument, result); ppzoo cannot stand in for it on later stages",
                )
            )
        standins[fqn] = made
    formats = set(seen.layer_output.values())
    if len(formats) != 1 or not isinstance(next(iter(formats)), tuple):
        problems.append(
            Problem(
                "native-layer-output",
                f"{kind}'s decoder layers return {sorted(map(str, formats))}; ppzoo needs a tensor, or a tuple or list with the hidden states first",
            )
        )
    tied, local_ties, tie_problems = tied_parameters(model, inputs_, outputs_, kind, layers=container)
    # NOTE: the key round trip runs on fewer experts, and on the cut model's layers where the
    # trace was cut (:mod:`.prefix`); the renames are the whole model's
    check = (_keys.fewer_experts_model(cut[1]) or cut[2]) if cut else _keys.fewer_experts_model(config)
    renames, key_problems = checkpoint_renames(model, kind, check=check)
    problems += tie_problems + key_problems
    if problems:
        return problems
    base = next((name for name, m in model.named_modules() if m is model.base_model), "")
    layout = Layout(inputs=(*images, *inputs_), layers=container, num_layers=n, outputs=tuple(outputs_))
    return NativeLayout(
        layout,
        base,
        seen.hidden_name,
        formats.pop(),
        standins,
        tied,
        local_ties,
        renames,
        boundary,
        seen.reused,
        images=tuple(images),
        image_parameters=image_parameters,
    )


#: config attributes that count a model's layers, under another name than num_hidden_layers
_LAYER_COUNTS = ("num_layers", "n_layers", "n_layer", "num_blocks")


def _sublayer_count(model: nn.Module, text: Any, n: Any, language: str) -> tuple[Any, list[str]]:
    """``(count, [layer list])`` for a model whose layer list has the length of another of its
    config's layer counts than ``num_hidden_layers`` (``n``), or ``(n, [])``.

    NOTE: LongCat-Flash holds ``num_layers`` blocks of two attention and MLP sublayers each, and
    its config derives ``num_hidden_layers`` as ``2 * num_layers`` (the sublayers, which its cache
    counts); its forward loops over ``self.layers[: config.num_layers]``. The list is taken only
    when it is the one ModuleList of that length, and the trace then checks that the forward calls
    each of its modules once, in order.
    """
    counts = {
        value
        for name in _LAYER_COUNTS
        if isinstance(value := getattr(text, name, None), int) and not isinstance(value, bool) and value > 0
    }
    counts.discard(n)
    for count in sorted(counts):
        lists = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) == count and _under(name, language)
        ]
        if len(lists) == 1:
            return count, lists
    return n, []


def _watch(model: nn.Module, container: str, units: list[str]) -> Observed:
    """The watched forward (:func:`.trace.watch`) of the meta ``model``, or, where the meta device
    cannot run it, of a copy with constant weights on the CPU.

    NOTE: a forward that reads tensor values (DBRX's and LongCat-Flash's loops over the experts
    hit, ``nonzero`` and ``item``; JetMoE's expert sizes, ``tolist``) cannot run on the meta
    device. The layout does not depend on the values, so it is read from a forward that has them:
    every parameter and persistent buffer zero, broadcast from one element (no memory, however
    large the model; a matmul copies one weight at a time), the non-persistent buffers as the
    constructor computes them. Such a forward costs the compute of 3 x 7 tokens.

    Raises:
        Exception: what the copy's forward raised, from what the meta forward raised.
    """
    try:
        return watch(model, model.get_submodule(container), {fqn: model.get_submodule(fqn) for fqn in units})
    except Exception as exc:  # noqa: BLE001 - the copy below is tried; its failure is reported
        on_meta = exc
    try:
        real = _constant_copy(model)
        return watch(real, real.get_submodule(container), {fqn: real.get_submodule(fqn) for fqn in units}, device="cpu")
    except Exception as exc:
        raise RuntimeError(
            f"on the meta device {type(on_meta).__name__}: {short(on_meta)}; with constant weights "
            f"{type(exc).__name__}: {short(exc)}"
        ) from on_meta


def _constant_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of the meta ``model`` with values: see :func:`_watch`."""
    from ppzoo.architectures.native.buffers import reference_buffers

    real = copy.deepcopy(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        computed = reference_buffers(model.config, dtype)
    except Exception:  # noqa: BLE001 - a constructor that does not run off the meta device: zeros
        computed = {}
    made: dict[int, nn.Parameter] = {}  # NOTE: a parameter used in two places stays one
    for name, module in real.named_modules():
        for key, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)
                module._parameters[key] = made[id(p)]
        for key, b in module._buffers.items():
            if b is not None:
                source = computed.get(f"{name}.{key}" if name else key)
                same = source is not None and source.shape == b.shape and source.dtype == b.dtype
                module._buffers[key] = source.clone() if same else torch.zeros(b.shape, dtype=b.dtype)
    return real


#: config attributes that count the routed experts, and that give how many each token picks
def _vision_language(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """The FQN of a vision-language model's language model and of its image-side modules, or
    ``("", ())`` for a text-only model.

    NOTE: transformers' vision-language classes hold the vision tower, the projector and the
    language model side by side (in the base model, or in the model itself: Llama 4), and merge
    the image features into the token embeddings before the language model runs
    (``get_image_features``, then ``masked_scatter`` at the image tokens).
    """
    from ppzoo.vision import language_model, owner

    top, language = owner(model), language_model(model)
    if language is None or not hasattr(top, "get_image_features"):
        return "", ()
    modules = {id(m): name for name, m in model.named_modules()}
    side = tuple(modules[id(child)] for child in top.children() if child is not language)
    return modules[id(language)], side


#: what a language model's forward takes when images reach it only through its embeddings
_TEXT_INPUTS = frozenset(
    {
        "self",
        "input_ids",
        "attention_mask",
        "position_ids",
        "cache",
        "past_key_values",
        "inputs_embeds",
        "use_cache",
        "cache_position",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "token_type_ids",
        "labels",
        "logits_to_keep",
        "args",
        "kwargs",
    }
)


def _vision_inside_layers(language: nn.Module) -> list[str]:
    """The parameters of a language model's forward that carry image features into its layers
    (Qwen3-VL's ``deepstack_visual_embeds``), which no stage boundary could carry."""
    try:
        names = inspect.signature(type(language).forward).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in names if name not in _TEXT_INPUTS]


def _under(fqn: str, root: str) -> bool:
    return not root or fqn == root or fqn.startswith(root + ".")


def _units(model: nn.Module, container: str, kind: str, deferred: str | None = None) -> tuple[list[str], list[Problem]]:
    """Modules outside the layer list that hold parameters or persistent buffers, in tree order.

    The direct parameters of the module ``deferred`` (a vision-language base model) are left to
    :mod:`.direct`, which tells after the trace whether they belong to the image side.
    """
    units, problems = [], []
    ancestors = {container.rsplit(".", i)[0] for i in range(1, container.count(".") + 1)} | {""}

    def holds(module: nn.Module) -> bool:
        persistent = any(
            n not in m._non_persistent_buffers_set
            for m in module.modules()
            for n, b in m._buffers.items()
            if b is not None
        )
        return persistent or any(True for _ in module.parameters())

    for fqn in sorted(ancestors, key=len):
        module = model.get_submodule(fqn)
        direct = [n for n, p in module._parameters.items() if p is not None and fqn != deferred]
        direct += [
            n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set
        ]
        if direct:
            where = f"{fqn}." if fqn else ""
            problems.append(
                Problem(
                    "native-direct-parameter",
                    f"{kind}: {type(module).__name__} holds {where}{direct[0]} itself, outside any input or output module",
                )
            )
        for name, child in module._modules.items():
            path = f"{fqn}.{name}" if fqn else name
            if child is not None and path != container and path not in ancestors and holds(child):
                units.extend(_called(child, path, holds))
    return units, problems


def _called(module: nn.Module, path: str, holds) -> list[str]:
    """``path``, or for a list or dict of modules (which a forward never calls) its members."""
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [path]
    return [
        fqn
        for name, child in module._modules.items()
        if child is not None and holds(child)
        for fqn in _called(child, f"{path}.{name}", holds)
    ]


def _flow_problems(
    seen, inputs: list[str], outputs: list[str], n: int, kind: str
) -> tuple[Boundary | None, list[Problem]]:
    """What crosses a layer boundary besides the hidden states (:func:`.boundary.plan_boundary`),
    and what reaches the logits besides the last layer's output."""
    found = plan_boundary(seen, inputs, n, kind)
    problems = found if isinstance(found, list) else []
    stray = sorted(seen.logits_tags - {layer_tag(n - 1)} - {unit_tag(f) for f in outputs})
    if stray:
        problems.append(
            Problem(
                "native-head-input",
                f"{kind}: the logits are computed from {_origins(stray)} besides the last layer's output; "
                "only the hidden states reach the last stage",
            )
        )
    return (None if isinstance(found, list) else found), problems


def _origins(tags: list[str]) -> str:
    def one(tag: str) -> str:
        if tag == IDS:
            return "the token ids"
        what, _, name = tag.partition(":")
        return f"layer {name}" if what == "layer" else f"module {name!r}"

    return ", ".join(one(t) for t in tags)


def _standin(shapes: Any) -> StandIn | None:
    """The stand-in rule for a unit seen mapping ``(argument, output)``, or None when there is none.

    NOTE: the trace's batch (2) and sequence (5) sizes tell which output dimensions follow the
    argument; every other output dimension is a fixed size.
    """
    if not shapes or shapes[0] is None or not isinstance(shapes[1], tuple):
        return None
    (arg_shape, arg_dtype), (out_shape, out_dtype) = shapes
    dims = []
    for size in out_shape:
        sources = [j for j, n in enumerate(arg_shape) if n == size and n in (TRACE_BATCH, TRACE_SEQ)]
        dims.append(("arg", sources[0]) if len(sources) == 1 else ("size", size))
    if not any(source == "arg" for source, _ in dims):
        return None
    return StandIn(tuple(dims), "argument" if out_dtype == arg_dtype else "parameters")
