"""Build one pipeline stage: meta build, prune to the plan, materialise, load, patch forwards.

A stage is the Hugging Face ``*ForCausalLM`` module itself, pruned: modules other stages hold are
set to ``None`` and the layer container becomes a ``ModuleDict`` keyed by the original layer
index, so every parameter keeps its original FQN (``model.layers.7.mlp.up_proj.weight``) and
checkpoint keys match without renaming.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ppzoo import layer_inputs
from ppzoo.checkpoint import Checkpoint, load_stage_weights
from ppzoo.dropout import draws_at_random, key_dropout
from ppzoo.layout import Layout
from ppzoo.meta import meta_model
from ppzoo.planner import Plan, StagePlan
from ppzoo.vision import TOKEN_IDS

if TYPE_CHECKING:
    from ppzoo.adapter import Adapter

__all__ = [
    "build_mask",
    "build_stage",
    "causal_lm_stage_forward",
    "inner_stage_forward",
    "materialize",
    "prune",
    "run_chain",
]


def _set_module(root: nn.Module, fqn: str, value: nn.Module | None) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


def prune(model: nn.Module, layout: Layout, stage: StagePlan) -> None:
    """Drop every module ``stage`` does not hold; keep layer FQNs (``ModuleDict`` by index)."""
    keep = set(stage.modules)
    for fqn in layout.inputs + layout.outputs:
        if fqn not in keep:
            _set_module(model, fqn, None)
    container = model.get_submodule(layout.layers)
    _set_module(model, layout.layers, nn.ModuleDict({str(i): container[i] for i in stage.layers}))


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give every meta parameter and buffer real (uninitialised) storage on ``device``.

    Unlike ``Module.to_empty``, tensors shared by several modules stay shared (tied weights).
    """
    memo: dict[int, torch.Tensor] = {}
    for owner in model.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
                owner._parameters[name] = memo[id(param)]
        for name, buf in list(owner._buffers.items()):
            if buf is not None:
                if id(buf) not in memo:
                    memo[id(buf)] = torch.empty_like(buf, device=device)
                owner._buffers[name] = memo[id(buf)]


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make the tied parameters the stage holds one parameter: each copy its source's, or where the
    source lives on another stage, the first copy held (two layers of a shared block)."""
    first: dict[str, str] = {}
    for copy, source in sorted(tied.items()):
        try:
            model.get_parameter(copy)
        except AttributeError:
            continue  # the copy lives on another stage
        try:
            model.get_parameter(source)
        except AttributeError:
            source = first.setdefault(source, copy)  # NOTE: the source lives on another stage
        if source == copy:
            continue
        owner, _, name = copy.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, name, model.get_parameter(source))


def build_stage(
    config: Any,
    adapter: Adapter,
    plan: Plan,
    stage_index: int,
    *,
    checkpoint: Checkpoint,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    parallelize: Callable[[nn.Module], None] | None = None,
    dropout_seed: int | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """One ready stage: built on meta, pruned, parallelized, materialised on ``device``, loaded, patched.

    Args:
        config: the model config.
        adapter: the adapter for ``config``.
        plan: the plan the stage belongs to.
        stage_index: which stage of ``plan`` to build.
        checkpoint: where the weights are read from (only this stage's tensors).
        device: target device.
        dtype: parameter dtype.
        parallelize: applies TP / FSDP to the stage while it is still on the meta device, so
            each rank then reads only its own slices of every tensor.
        dropout_seed: the base seed of the stage's dropout streams (:mod:`ppzoo.dropout`); default
            ``torch.initial_seed()`` as each forward starts (seed every rank alike).
        **model_kwargs: passed to ``from_config`` (``attn_implementation``, ...).

    Returns:
        The pruned ``*ForCausalLM`` module; its forward maps the stage input to its output.
    """
    stage = plan.stages[stage_index]
    model = meta_model(config, dtype=dtype, **model_kwargs)
    adapter.prune_to_stage(model, plan.layout, stage, config=config)
    tied = adapter.tied_weights(config)
    _tie(model, tied)
    if parallelize is not None:
        parallelize(model)
        # NOTE: FSDP2 owns its parameters' storage; let it re-create them (ties re-made after).
        model.to_empty(device=device)
        _tie(model, tied)
    else:
        materialize(model, device)
    for owner in model.modules():
        if owner._non_persistent_buffers_set and any(
            owner._buffers.get(n) is not None for n in owner._non_persistent_buffers_set
        ):
            adapter.init_buffers(model, owner)
    load_stage_weights(model, checkpoint, adapter=adapter, config=config)
    adapter.patch_inner_forward(model.get_submodule(adapter.inner_name))
    adapter.patch_causal_lm_forward(model)
    # NOTE: dropout masks keyed by (seed, layer, microbatch), whatever rank runs the layer; a stage
    # that draws nothing at random needs no key, so no hook runs on its microbatches
    if draws_at_random(model, config):
        key_dropout(model, plan.layout, stage.layers, seed=dropout_seed)
    model.ppzoo_stage = stage
    return model


def run_chain(
    stages: Sequence[nn.Module], input_ids: torch.Tensor, *, attention_mask=None, position_ids=None
) -> torch.Tensor:
    """Run stages 0 → last in one process (no process group); returns the last stage's logits."""
    x = input_ids
    for module in stages:
        # NOTE: a vision-language model's later stages read the token ids too (ppzoo.vision)
        ids = {TOKEN_IDS: input_ids} if getattr(module, "ppzoo_reads_token_ids", False) else {}
        x = module(x, attention_mask=attention_mask, position_ids=position_ids, **ids)
    return x


# -- the stage forward ----------------------------------------------------------------------
@functools.cache
def _mask_params(fn: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def build_mask(
    fn: Callable,
    config: Any,
    hidden: torch.Tensor,
    attention_mask,
    position_ids,
    *,
    cache: Any = None,
    layer_idx: int | None = None,
    **extra: Any,
) -> Any:
    """Call a transformers mask function with the argument names the installed version uses.

    ``fn`` is ``transformers.masking_utils.create_causal_mask``, ``create_sliding_window_causal_mask``
    or another function of that family; ``extra`` is passed on as it is (``allow_is_causal_skip=False``
    for ALiBi models, whose attention adds the bias to a mask that must therefore exist;
    ``and_mask_function=...``). The result is what the function returns for one layer type: a
    tensor, a ``BlockMask`` or None (no mask needed).

    ``cache`` (generation, :mod:`ppzoo.generation`) is the stage's KV cache and ``layer_idx`` one
    of the stage's own layers of the mask's type: the mask then spans the cached keys, sized by
    that layer's cache as Hugging Face sizes it by its first layer of the type.

    Raises:
        TypeError: ``fn`` takes no argument of a name in ``extra``.
    """
    params = _mask_params(fn)
    unknown = sorted(set(extra) - params)
    if unknown and not any(inspect.Parameter.VAR_KEYWORD == p.kind for p in inspect.signature(fn).parameters.values()):
        raise TypeError(f"{getattr(fn, '__name__', fn)} takes no argument {unknown[0]!r}; it takes {sorted(params)}")
    kwargs: dict[str, Any] = {"config": config, "attention_mask": attention_mask}
    # NOTE: transformers renamed input_embeds -> inputs_embeds and past_key_values -> cache, and
    # dropped cache_position; only generation gives a stage a cache.
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    if "cache" in params:
        kwargs["cache"] = cache
    elif "past_key_values" in params:
        kwargs["past_key_values"] = cache
    if cache is not None and layer_idx is not None and "layer_idx" in params:
        kwargs["layer_idx"] = layer_idx
    if "cache_position" in params:
        past = cache.get_seq_length(layer_idx or 0) if cache is not None else 0
        kwargs["cache_position"] = torch.arange(past, past + hidden.shape[1], device=hidden.device)
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids
    return fn(**kwargs, **extra)


@functools.cache
def _embed_takes(fn: Callable) -> frozenset[str]:
    """The keywords among ``position_ids`` / ``attention_mask`` an ``embed`` implementation takes."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset({"position_ids", "attention_mask"})
    return frozenset(params) & {"position_ids", "attention_mask"}


def _embed(adapter: Adapter, inner: nn.Module, x: torch.Tensor, position_ids, attention_mask) -> torch.Tensor:
    # NOTE: adapters written before embed took position_ids / attention_mask keep working
    fn = getattr(type(adapter).embed, "__func__", type(adapter).embed)
    given = {"position_ids": position_ids, "attention_mask": attention_mask}
    return adapter.embed(inner, x, **{k: v for k, v in given.items() if k in _embed_takes(fn)})


def inner_stage_forward(inner, x, attention_mask=None, position_ids=None, *, adapter: Adapter, cache=None):
    """The stage's share of the inner model: embed (first stage), its layers, the final norm (last stage).

    ``cache`` (generation only): a transformers ``Cache`` over the whole model's layer indices, in
    which the stage's own layers read and extend theirs; ``position_ids`` must then be given.
    """
    if getattr(inner, adapter.embed_name, None) is not None:
        hidden = _embed(adapter, inner, x, position_ids, attention_mask)
    else:
        hidden = x
    layers = getattr(inner, adapter.layers_name)
    if len(layers):
        if position_ids is None:
            position_ids = layer_inputs.default_positions(inner, hidden)
        kinds = adapter.layer_types(inner.config)
        needed = {kinds[int(i)] for i in layers.keys()}
        # NOTE: the cache is passed only when generating, so adapters written before generation
        # (masks / call_layer without a cache argument) keep working for training
        cached = {} if cache is None else {"cache": cache}
        masks = adapter.masks(inner, hidden, attention_mask, position_ids, needed, **cached)
        ropes = adapter.position_embeddings(inner, hidden, position_ids, needed)
        for key, layer in layers.items():
            kind = kinds[int(key)]
            hidden = adapter.call_layer(
                layer, hidden, mask=masks[kind], position_embeddings=ropes[kind], position_ids=position_ids, **cached
            )
    if getattr(inner, adapter.norm_name, None) is not None:
        hidden = adapter.final_norm(inner, hidden)
    return hidden


def causal_lm_stage_forward(
    lm, x, attention_mask=None, position_ids=None, *, adapter: Adapter, cache=None, logits_to_keep: int = 0
):
    """The stage's forward: its share of the inner model, then the head when it holds it.

    ``cache`` and ``logits_to_keep`` are for generation (:mod:`ppzoo.generation`): the KV cache of
    the stage's layers, and how many last positions get logits (0: all), as in Hugging Face.
    """
    cached = {} if cache is None else {"cache": cache}
    hidden = getattr(lm, adapter.inner_name)(x, attention_mask=attention_mask, position_ids=position_ids, **cached)
    if getattr(lm, adapter.head_name, None) is None:
        return hidden
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    return adapter.logits(lm, hidden)
