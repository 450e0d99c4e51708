"""Loading a stage: this stage's tensors from a checkpoint into its parameters and buffers.

Only the stage's own tensors are read, cast straight to the device and dtype of its parameters.
Checkpoint keys are converted to parameter FQNs by the adapter's key map (fused MoE experts are
built from one checkpoint tensor per expert), and a tied copy (a head tied to the embedding) is
read from the embedding's key when the checkpoint has none of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppzoo.adapter import Adapter
from ppzoo.checkpoint.errors import CheckpointError
from ppzoo.checkpoint.reading import Checkpoint
from ppzoo.checkpoint.tensors import persistent_tensors
from ppzoo.parallelize import local_slice

__all__ = ["load_stage_weights"]


def load_stage_weights(module: nn.Module, checkpoint: Checkpoint, *, adapter: Adapter, config: Any) -> list[str]:
    """Fill every parameter and persistent buffer of a materialised stage from the checkpoint.

    Only the tensors of this stage are read. A tied copy (``lm_head.weight`` tied to the
    embedding) is read from its own key when the checkpoint has one, else from its source's key.

    Args:
        module: the stage, materialised on its device; a DTensor parameter (FSDP / TP) reads only
            this rank's part.
        checkpoint: the checkpoint to read from.
        adapter: supplies ``key_map(config)`` (checkpoint keys of each FQN) and
            ``tied_weights(config)`` (tied copy → source FQN).
        config: the model config the stage was built from.

    Returns:
        The checkpoint keys read.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape; the message names key and file.
    """
    key_map = adapter.key_map(config)
    tied = adapter.tied_weights(config)
    device = next((t.device for _, _, _, t in persistent_tensors(module)), torch.device("cpu"))
    reader = checkpoint.open(device)
    done: set[int] = set()
    read: list[str] = []
    try:
        for fqn, _owner, _name, target in persistent_tensors(module):
            if id(target) in done:
                continue  # one tensor under two names (tied on this stage): filled once
            sources = key_map.sources(fqn, checkpoint.has)
            if not all(checkpoint.has(k) for k in sources) and fqn in tied and checkpoint.has(tied[fqn]):
                sources = key_map.sources(tied[fqn], checkpoint.has)
            missing = [k for k in sources if not checkpoint.has(k)]
            if missing:
                raise CheckpointError(
                    f"tensor {missing[0]!r} (needed for {fqn!r}) is not in {checkpoint.listing!r} in "
                    f"{str(checkpoint.directory)!r}; is it a checkpoint of this architecture?"
                )
            part = local_slice(target)  # this rank's shard of a TP / FSDP parameter (only its bytes are read), or None
            for key in sources:
                expected = None if len(sources) > 1 else tuple(target.shape)
                if expected is not None and reader.shape(key) != expected:
                    raise CheckpointError(
                        f"tensor {key!r} in {checkpoint.file_of(key).name!r} has shape {reader.shape(key)}, "
                        f"but {fqn!r} expects {expected}; the config does not match the checkpoint"
                    )
            local = target.to_local() if part is not None else target
            if len(sources) == 1:
                reader.read(sources[0], part, into=local)  # straight into its storage where it can
            else:
                value = key_map.combine(fqn, [reader.read(key) for key in sources])
                if part is not None:
                    value = value[part]
                if tuple(value.shape) != tuple(local.shape):
                    raise CheckpointError(
                        f"{fqn!r} built from {sources} has shape {tuple(value.shape)}, expected {tuple(local.shape)}"
                    )
                with torch.no_grad():
                    local.copy_(value)  # casts to the stage's dtype
            read.extend(sources)
            done.add(id(target))
    finally:
        reader.close()
    return read
