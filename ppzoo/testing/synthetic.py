"""Synthetic checkpoints of any size: random weights written straight to sharded safetensors.

:func:`generate_checkpoint` draws a config's tensors one at a time and writes them shard by shard
with an index, so at most one shard is ever in memory and a 1 B model costs seconds, not a
download. Tests use it for checkpoints too large for :func:`ppzoo.testing.reference.save_tiny_model`
(which builds the whole Hugging Face model first); the benchmarks use it for every model they time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["STAMP", "checkpoint_files", "generate_checkpoint"]

#: the file that records what a generated directory holds, so a second call reuses it
STAMP = "ppzoo_synthetic.json"


def _parameter_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint key, shape) of every persistent tensor, in forward order, from a meta model."""
    import torch

    from ppzoo.meta import meta_model

    model = meta_model(config, dtype=torch.float32)
    return [(key, tuple(t.shape)) for key, t in model.state_dict(keep_vars=True).items()]


def generate_checkpoint(
    directory: str | os.PathLike,
    config: Any,
    *,
    dtype: str = "bfloat16",
    shard_bytes: int = 512 * 2**20,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write a random checkpoint of ``config`` as sharded safetensors with an index, and its config.

    Tensors are drawn one at a time (normal, std ``initializer_range``, on ``device`` — a GPU
    draws a 1 B model in a second) and written shard by shard with ``save_file``; 1-D tensors
    (norm weights, biases) are ones. A directory that already holds a complete checkpoint of the
    same config, dtype, seed and shard size is reused as it is.

    Args:
        directory: where to write (created if absent).
        config: a Hugging Face config; its ``dtype`` is set to ``dtype``.
        dtype: the tensors' dtype, a torch dtype name.
        shard_bytes: a shard is closed before it would grow past this many bytes.
        seed: the random generator's seed.
        device: where the tensors are drawn.

    Returns:
        The directory.
    """
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    config.dtype = dtype
    stamp = {"config": config.to_dict(), "dtype": dtype, "seed": seed, "shard_bytes": shard_bytes}
    stamp_file = directory / STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    torch_dtype = getattr(torch, dtype)
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(seed)
    element = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in _parameter_shapes(config):
        nbytes = element * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            if len(shape) == 1:
                value = torch.ones(shape, dtype=torch_dtype)
            else:
                draw = torch.float32 if device == "cpu" else torch_dtype
                value = torch.randn(shape, generator=gen, device=device, dtype=draw)
                value = value.mul_(std).to(device="cpu", dtype=torch_dtype)
            tensors[key] = value
            weight_map[key] = name
            total += value.numel() * value.element_size()
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    # NOTE: written last: a run interrupted before this point is regenerated, never reused
    stamp_file.write_text(json.dumps(stamp))
    return directory


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The shard files of a sharded checkpoint, as its index names them."""
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
    return [Path(directory) / name for name in sorted(set(index["weight_map"].values()))]
