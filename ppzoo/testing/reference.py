"""Tiny reference models and batches the checks and tests share.

Models are built from an adapter's ``tiny_config()`` with random weights, saved as (optionally
sharded) safetensors, and loaded back through the real paths, never fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ppzoo.adapter import Adapter

__all__ = ["save_tiny_model", "load_reference", "batch", "grad_mismatches", "tiny"]


def save_tiny_model(
    adapter: Adapter,
    directory: str | os.PathLike,
    *,
    config: Any = None,
    seed: int = 0,
    max_shard_size: str | None = "20KB",
    attn_implementation: str = "eager",
) -> Path:
    """Save a randomly initialised tiny model for ``adapter`` (sharded unless ``max_shard_size`` is None)."""
    from ppzoo.meta import model_class

    config = config if config is not None else adapter.tiny_config()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config).from_config(config, dtype=torch.float32)
    perturb_zero_init(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {"max_shard_size": "100GB"}
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


def perturb_zero_init(model: torch.nn.Module, seed: int) -> None:
    # NOTE: norms start at one (or zero, for 1 + w norms) and biases at zero; random values make a
    # mix-up between two such tensors visible to an equality check.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def load_reference(directory: str | os.PathLike, *, attn_implementation: str = "eager") -> torch.nn.Module:
    """The unsplit Hugging Face model, loaded with ``from_pretrained`` in fp32."""
    from transformers import AutoConfig

    from ppzoo.meta import model_class

    auto = model_class(AutoConfig.from_pretrained(directory))
    return auto.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn_implementation)


def batch(vocab_size: int, *, batch_size: int = 4, seq_len: int = 12, seed: int = 0, left_pad: bool = True):
    """``(input_ids, attention_mask, labels)``: left padding of uneven length, some ``-100`` labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    if left_pad:
        for row in range(batch_size):
            pad = (row * 3) % (seq_len // 2)
            mask[row, :pad] = 0
            ids[row, :pad] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, seq_len // 2] = -100  # a hole in the middle, so counts differ per row
    return ids, mask, labels


def grad_mismatches(
    named_params,
    reference: torch.nn.Module,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    tied: dict[str, str] | None = None,
) -> list[str]:
    """Names whose gradient differs from the reference's (or is missing); empty when all match.

    ``tied`` (``adapter.tied_weights(config)``) names copies held apart from their source on
    another stage: the reference's one tied parameter gets the sum of both gradients, so the
    copy's gradient is added to the source's before comparing.
    """
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for name, p in named_params}
    for copy, source in (tied or {}).items():
        if copy in grads and source in grads and grads[copy] is not None and grads[source] is not None:
            grads[source] = grads[source] + grads.pop(copy)
    bad = []
    for name, grad in grads.items():
        ref = reference.get_parameter(name).grad
        if grad is None or ref is None:
            if not (grad is None and ref is None):
                bad.append(f"{name}: grad is {'missing' if grad is None else 'present'}, reference's is not")
            continue
        if not torch.allclose(grad, ref, rtol=rtol, atol=atol):
            bad.append(f"{name}: max |diff| {(grad - ref).abs().max().item():.3e}")
    return bad


def tiny(name: str, **overrides: Any) -> tuple[Adapter, Any]:
    """The registered adapter ``name`` and its tiny config with ``overrides`` applied."""
    from ppzoo import registry

    adapter = registry.adapters()[name]
    config = adapter.tiny_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return adapter, config
