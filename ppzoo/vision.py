"""Vision-language models: the language model pipelined, the vision tower on the first stage.

ppzoo splits the language model of an image-text-to-text model (LLaVA, Gemma 3, Qwen2-VL,
Mistral 3, ...) as it splits a text-only one. The vision tower and the projector are input modules
of the first stage (``NativeLayout.images``), and images reach that stage only.

A step with images runs in three parts, all Hugging Face's own code:

1. *Before the schedule*, the rank that holds the first stage runs the model's
   ``get_image_features`` once over the whole batch's images, and places the features (its pooled
   output, or its last hidden state where the forward projects that itself: Llama 4) at the
   image tokens of a ``(batch, sequence, hidden)`` tensor. Every rank computes the model's own
   multimodal positions (Qwen2-VL's M-RoPE, ``compute_3d_position_ids``) on the whole batch.
2. *In the schedule*, those tensors (and per-token inputs such as Gemma 3's ``token_type_ids``)
   are split into microbatches along the batch like the token ids; the first stage hands its
   microbatch's features to the forward as ``mm_encoder_outputs``, which merges them at the image
   tokens exactly as it merges features it computed itself.
3. *After the schedule*, the gradient the microbatches left on the features runs back through
   the vision tower once.

Why not per microbatch: image inputs are not laid out by sample (Qwen2-VL concatenates every
image's patches; a sample may hold several images or none), so only the model's own code knows
which rows belong to which sample. The features it returns are laid out by image token, which is.

Schedules that split the backward into an input pass and a weight pass (zero-bubble) compute
gradients only for the stage's inputs and parameters, so the features' gradient would be lost:
they train a vision-language model on text, or with ``freeze_vision=True``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "FEATURES",
    "TOKEN_IDS",
    "ImageBatch",
    "finish_images",
    "freeze_modules",
    "image_token_id",
    "prepare_images",
    "stage_image_kwargs",
]

#: names under which a batch's per-token inputs reach every stage, split like the token ids
PER_TOKEN = frozenset({"token_type_ids", "mm_token_type_ids"})
#: the keyword under which the first stage gets its microbatch's image features
FEATURES = "image_features"
#: the keyword under which later stages get the token ids (their forward finds the image tokens in them)
TOKEN_IDS = "token_ids"


@dataclass
class ImageBatch:
    """What one step's images add to the schedule's keyword arguments, and the features to finish.

    Attributes:
        kwargs: split into microbatches with the token ids and given to every stage.
        features: the features computed before the schedule (with their graph to the vision tower).
        leaf: what the microbatches read in their place; its gradient runs back through
            ``features`` after the schedule.
    """

    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
    leaf: torch.Tensor | None = None


@dataclass(frozen=True)
class FeaturesForm:
    """How a model's ``get_image_features`` gave its features: the output's field, a list of
    per-image tensors or one tensor, and that tensor's dims."""

    field: str = "pooler_output"
    as_list: bool = True
    dims: int = 2


def image_token_id(config: Any) -> int | None:
    """The token id that marks an image position, or None for a text-only config."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


#: the attribute that holds a vision-language model's language model, by family
LANGUAGE_MODEL = ("language_model", "text_model")


def owner(model: nn.Module) -> nn.Module:
    """The module that holds the vision tower and the language model side by side (the base
    model, or the model itself: Llama 4)."""
    base = model.base_model
    return base if any(isinstance(getattr(base, n, None), nn.Module) for n in LANGUAGE_MODEL) else model


def language_model(model: nn.Module) -> nn.Module | None:
    """``model``'s language model, or None for a text-only model."""
    top = owner(model)
    return next((m for n in LANGUAGE_MODEL if isinstance(m := getattr(top, n, None), nn.Module)), None)


def freeze_modules(model: nn.Module, images: tuple[str, ...]) -> None:
    """``freeze_vision=True``: the image modules (and image parameters) this stage holds get no gradients."""
    held = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    for fqn in images:
        if fqn in held:
            held[fqn].requires_grad_(False)
        elif fqn in parameters:
            parameters[fqn].requires_grad_(False)


def prepare_images(
    *,
    config: Any,
    first: nn.Module | None,
    model: nn.Module,
    images: tuple[str, ...],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    inputs: dict[str, Any],
    train: bool,
    split_backward: bool,
    frozen: bool = False,
    positions: bool = True,
    device: torch.device,
) -> ImageBatch:
    """Check a step's image inputs and turn them into per-token tensors (see the module docstring).

    Args:
        first: this rank's first-stage module (it holds the vision tower), or None.
        model: any stage module of this rank (every one runs the whole model's forward code).
        images: the FQNs of the vision tower and projector.
        inputs: the image keyword arguments given to ``step`` / ``eval``.
        split_backward: whether the schedule splits the backward (zero-bubble).
        frozen: whether the pipeline was built with ``freeze_vision=True``.
        positions: whether to compute the model's multimodal positions (False: the caller gave positions).

    Raises:
        ValueError: an input the model does not take, one ppzoo cannot split into microbatches, a
            text-only model given images, image tokens that do not match the images, or a
            zero-bubble schedule asked to train the vision tower.
    """
    batch, seq = input_ids.shape
    kind = f"model_type {getattr(config, 'model_type', None)!r}"
    if not images:
        raise ValueError(
            f"{kind} is a text-only model; step and eval take no {', '.join(sorted(inputs))} (vision-language "
            "models only)"
        )
    top = owner(model)
    takes = _parameters(type(top).forward)
    features_takes = _parameters(type(top).get_image_features)
    position_fn = getattr(type(top), "compute_3d_position_ids", None)
    positions_take = _parameters(position_fn) if position_fn is not None else frozenset()
    result = ImageBatch()
    image_inputs: dict[str, Any] = {}
    for name, value in inputs.items():
        if value is None:
            continue
        if name not in takes:
            raise ValueError(
                f"{kind}: {type(top).__name__}.forward takes no {name!r}; the image inputs it takes are "
                f"{', '.join(sorted(takes & (features_takes | positions_take | PER_TOKEN)))}"
            )
        if name in PER_TOKEN:
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch, seq):
                raise ValueError(f"{name} must be a (batch, sequence) tensor like input_ids {(batch, seq)}")
            result.kwargs[name] = value.to(device)
        elif name in features_takes or name in positions_take:
            image_inputs[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        else:
            raise ValueError(
                f"{kind}: ppzoo cannot split {name!r} into microbatches (it is neither a per-token input nor an "
                "input of the model's get_image_features); leave it out"
            )
    if positions and position_fn is not None and any(n in image_inputs for n in positions_take):
        given = {**image_inputs, **result.kwargs}
        # NOTE: some families' signatures have no defaults (Qwen2.5-VL's video_grid_thw, cache)
        args = {n: None for n in positions_take - {"self", "kwargs", "args"}}
        args.update({n: v for n, v in given.items() if n in positions_take})
        args.update(input_ids=input_ids.to(device), inputs_embeds=None)
        mask = attention_mask.to(device) if attention_mask is not None else None
        # NOTE: the model keeps the positions' offsets for generation (``rope_deltas``); a training
        # step must leave none behind, or a later text-only forward given no ids would use them
        kept = getattr(top, "rope_deltas", None)
        with torch.no_grad():
            found = position_fn(top, **{**args, "attention_mask": mask})
        if hasattr(top, "rope_deltas"):
            top.rope_deltas = kept
        if found is not None:
            # NOTE: (components, batch, seq): the batch goes first to be split into microbatches
            result.kwargs["position_ids"] = found.transpose(0, 1).contiguous()
    pixels = {n: v for n, v in image_inputs.items() if n in features_takes}
    if not any(n.startswith("pixel_values") for n in pixels):
        return result
    token = image_token_id(config)
    if token is None:
        raise ValueError(f"{kind}: its config names no image token id, so ppzoo cannot place image features")
    ids = input_ids.to(device)
    mask = ids == token
    trainable = train and not frozen
    if trainable and split_backward:
        raise ValueError(
            "a zero-bubble schedule (split backward) cannot train the vision tower: its weight pass computes "
            "gradients for stage inputs and parameters only. Pipeline with freeze_vision=True, or use a schedule "
            "without a split backward (1F1B, GPipe, Interleaved1F1B, LoopedBFS)"
        )
    if first is None:
        return result  # NOTE: only the first stage's rank computes features; the others check the ids
    top_first = owner(first)
    with torch.set_grad_enabled(trainable):
        out = top_first.get_image_features(**pixels)
    pooled = getattr(out, "pooler_output", out)
    named = "pooler_output"
    if pooled is None and getattr(out, "last_hidden_state", None) is not None:
        # NOTE: Llama 4's get_image_features is the vision model alone: its forward reads the last
        # hidden state and applies the projector (a first-stage module) itself
        pooled, named = out.last_hidden_state, "last_hidden_state"
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled]) if isinstance(pooled, (list, tuple)) else pooled
    flat = flat.reshape(-1, flat.shape[-1])
    if flat.shape[0] != int(mask.sum()):
        raise ValueError(
            f"the images give {flat.shape[0]} feature vectors but input_ids hold {int(mask.sum())} image tokens "
            f"(id {token}); expand each image to its tokens as the model's processor does"
        )
    # NOTE: each microbatch's features go back to the forward in the form the model gave them: the
    # output field, a list or a tensor, and the tensor's dims (Video-LLaVA's check reads 3)
    as_list = isinstance(pooled, (list, tuple))
    object.__setattr__(first, "_ppzoo_features_form", FeaturesForm(named, as_list, 2 if as_list else pooled.dim()))
    dense = torch.zeros(batch, seq, flat.shape[-1], dtype=flat.dtype, device=device)
    dense = dense.masked_scatter(mask.unsqueeze(-1), flat)
    result.features = dense if trainable else None
    result.leaf = dense.detach().requires_grad_(trainable)
    result.kwargs[FEATURES] = result.leaf
    return result


def finish_images(batch: ImageBatch) -> None:
    """Run the gradient the microbatches left on the image features back through the vision tower."""
    if batch.features is not None and batch.leaf is not None and batch.leaf.grad is not None:
        batch.features.backward(batch.leaf.grad)
        batch.features = batch.leaf = None


def stage_image_kwargs(
    model: nn.Module, x: torch.Tensor, first: bool, inputs: dict[str, Any], token: int | None
) -> dict[str, Any]:
    """The forward's keyword arguments for one stage and microbatch (see the module docstring).

    NOTE: later stages run the forward on the token ids, as the unsplit model does: their input
    modules are stand-ins (zeros, replaced by the incoming hidden states at their first layer),
    and the forward finds the image tokens in the ids where it needs them (masks that let an
    image attend to itself, Gemma 4's placeholder masks).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    kwargs = dict(inputs)
    features = kwargs.pop(FEATURES, None)
    token_ids = kwargs.pop(TOKEN_IDS, None)
    if not first and token_ids is not None:
        kwargs["input_ids"] = token_ids
    if first and features is not None and token is not None:
        picked = features[x == token]
        if picked.shape[0]:
            form = getattr(model, "_ppzoo_features_form", FeaturesForm())
            pooled = (picked,) if form.as_list else picked.reshape((1,) * (form.dims - 2) + tuple(picked.shape))
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(**{form.field: pooled})}
    return kwargs


def _parameters(fn: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()
