"""The whole causal LM on the meta device: structure and shapes, no memory, no initialisation."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

__all__ = ["meta_model", "model_class"]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_class(config: Any) -> type:
    """The auto class whose model ppzoo pipelines for ``config``.

    ``AutoModelForImageTextToText`` for an image-text-to-text type (LLaVA, Qwen2-VL, Mistral 3)
    that the causal-LM mapping lacks, or whose config names that class in ``architectures``
    (Llama 4); its language model is what ppzoo splits, with the vision tower on the first
    stage. ``AutoModelForCausalLM`` otherwise (it maps multimodal Gemma 3 to its vision-language
    class itself).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if name is None:
        return AutoModelForCausalLM
    # NOTE: Llama 4's config maps to the text-only Llama4ForCausalLM too; its released checkpoints
    # name the vision-language class, whose key layout (language_model.*) they use
    if type(config) not in AutoModelForCausalLM._model_mapping or name in (
        getattr(config, "architectures", None) or ()
    ):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def meta_model(config: Any, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """The whole causal LM on the meta device: structure and shapes, no memory, no init."""

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    # NOTE: from_config prefers config.dtype to the default dtype, and writes the dtype it uses
    # back into the config it is given: pass the dtype explicitly, on a copy of the config.
    with torch.device("meta"), no_init_weights(), _default_dtype(dtype):
        return model_class(config).from_config(copy.deepcopy(config), dtype=dtype, **kwargs)
