"""Loading a stage: this stage's tensors from a checkpoint into its parameters and buffers.

Only the stage's own tensors are read, cast straight to the device and dtype of its parameters.
Checkpoint keys become parameter FQNs through transformers' own conversion rules
(:mod:`ppzoo.checkpoint.conversion`: renames such as EXAONE's original names or NeoX's
``embed_out``, the base model's prefix, fused MoE experts built from one tensor per expert), so a
fused parameter reads exactly the tensors it is made of. An adapter's :class:`~ppzoo.KeyMap` is
asked first and decides where it says more than the identity (what transformers does not
describe). A tied copy (a head tied to the embedding) is read from the embedding's tensors when
the checkpoint has none of its own. A quantized checkpoint (FP8 block scales, MXFP4) is dequantized
on the way, each weight read with its scales (:mod:`ppzoo.checkpoint.quantized`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppzoo.adapter import Adapter
from ppzoo.checkpoint.conversion import Group, loading_plan
from ppzoo.checkpoint.errors import CheckpointError
from ppzoo.checkpoint.quantized import dequantizer, packed
from ppzoo.checkpoint.reading import Checkpoint, Reader
from ppzoo.checkpoint.tensors import persistent_tensors
from ppzoo.parallelize import local_slice

__all__ = ["load_stage_weights"]


def load_stage_weights(module: nn.Module, checkpoint: Checkpoint, *, adapter: Adapter, config: Any) -> list[str]:
    """Fill every parameter and persistent buffer of a materialised stage from the checkpoint.

    Only the tensors of this stage are read, each once. A tied copy (``lm_head.weight`` tied to
    the embedding) is read from its own tensors when the checkpoint has them, else from its
    source's.

    Args:
        module: the stage, materialised on its device; a DTensor parameter (FSDP / TP) reads only
            this rank's part of a tensor stored as it is, and only its own experts' tensors when
            it is a block of experts merged along dim 0 (FSDP); another fused parameter reads its
            source tensors whole and keeps its part.
        checkpoint: the checkpoint to read from.
        adapter: supplies ``key_map(config)`` (asked first: checkpoint keys, or other parameters'
            FQNs, of each FQN where it says more than the identity) and ``tied_weights(config)``
            (tied copy → source FQN).
        config: the model config the stage was built from.

    Returns:
        The checkpoint keys read.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape; the message names key and file.
    """
    key_map = adapter.key_map(config)
    tied = adapter.tied_weights(config)
    tensors = list(persistent_tensors(module))
    names = {fqn for fqn, *_ in tensors}
    names |= {tied[fqn] for fqn in names if fqn in tied}
    # NOTE: a quantized checkpoint's weights are dequantized by transformers' own converters, read
    # with their scales (ppzoo.checkpoint.quantized)
    quantizer = dequantizer(config)
    plan = loading_plan(module, checkpoint.weight_map, names, quantizer=quantizer)
    device = next((t.device for _, _, _, t in tensors), torch.device("cpu"))
    reader = checkpoint.open(device)
    loader = _Loader(module, checkpoint, reader, plan)
    loader.quantized = quantizer is not None
    done: set[int] = set()
    try:
        for fqn, _owner, _name, target in tensors:
            if id(target) in done:
                continue  # one tensor under two names (tied on this stage): filled once
            part = local_slice(target)  # this rank's shard of a TP / FSDP parameter (only its bytes are read), or None
            local = target.to_local() if part is not None else target
            available = lambda key: key in plan or checkpoint.has(key)  # noqa: E731
            mapped = key_map.sources(fqn, available)
            if mapped != [fqn]:
                # NOTE: the adapter's key map says more than the identity: its keys are checkpoint
                # keys or parameters transformers' rules convert to (a tied copy's source)
                if len(mapped) == 1 and mapped[0] in plan:
                    loader.fill(fqn, mapped[0], target, local, part)
                elif len(mapped) == 1 and checkpoint.has(mapped[0]):
                    loader.read_key(fqn, mapped[0], target, local, part)
                else:
                    value = key_map.combine(fqn, [loader.value(fqn, key) for key in mapped])
                    loader.copy(fqn, value, mapped, tuple(target.shape), local, part)
            elif fqn in plan:
                loader.fill(fqn, fqn, target, local, part)
            elif fqn in tied and tied[fqn] in plan:
                loader.fill(fqn, tied[fqn], target, local, part)
            else:
                raise loader.missing(fqn, fqn)
            done.add(id(target))
    finally:
        reader.close()
    return loader.read


class _Loader:
    """Reads a stage's tensors through the loading plan, each checkpoint key once."""

    def __init__(self, module: nn.Module, checkpoint: Checkpoint, reader: Reader, plan: dict[str, Group]):
        self.module, self.checkpoint, self.reader, self.plan = module, checkpoint, reader, plan
        #: parameters a group built that no parameter has taken yet (one tensor split into several)
        self.built: dict[str, torch.Tensor] = {}
        self.read: list[str] = []
        #: the checkpoint is quantized: a packed tensor must not be read as it is
        self.quantized = False

    def missing(self, key: str, fqn: str) -> CheckpointError:
        c = self.checkpoint
        return CheckpointError(
            f"tensor {key!r} (needed for {fqn!r}) is not in {c.listing!r} in {str(c.directory)!r}; "
            "is it a checkpoint of this architecture?"
        )

    def fill(self, fqn: str, name: str, target: torch.Tensor, local: torch.Tensor, part) -> None:
        """Fill ``target`` with the parameter ``name`` the plan converts to (``fqn`` or its source)."""
        group = self.plan[name]
        if group.converter is None:
            self.read_key(fqn, group.keys[0], target, local, part)
            return
        rows = group.rows(part[0].start, part[0].stop, target.shape[0]) if part and not group.missing() else None
        if rows is None:
            self.copy(fqn, self._built(fqn, name, group), group.keys, tuple(target.shape), local, part)
        elif part[0].stop > part[0].start:
            # NOTE: this rank's block of a parameter merged over experts reads only those experts
            n = part[0].stop - part[0].start
            value = self._convert(fqn, rows, numbered=False)[name]
            self.copy(fqn, value, rows.keys, (n, *target.shape[1:]), local, (slice(0, n), *part[1:]))

    def read_key(self, fqn: str, key: str, target: torch.Tensor, local: torch.Tensor, part) -> None:
        """Read the checkpoint tensor ``key``, the parameter ``fqn`` as it is (or this rank's ``part``)."""
        self._check_plain(fqn, key)
        if self.reader.shape(key) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {key!r} in {self.checkpoint.file_of(key).name!r} has shape {self.reader.shape(key)}, "
                f"but {fqn!r} expects {tuple(target.shape)}; the config does not match the checkpoint"
            )
        self.reader.read(key, part, into=local)  # straight into its storage where it can
        self.read.append(key)

    def value(self, fqn: str, key: str) -> torch.Tensor:
        """The tensor an adapter's key map names: a converted parameter, or a checkpoint key read whole."""
        if key in self.plan:
            group = self.plan[key]
            if group.converter is not None:
                return self._built(fqn, key, group)
            key = group.keys[0]
        elif not self.checkpoint.has(key):
            raise self.missing(key, fqn)
        self._check_plain(fqn, key)
        self.read.append(key)
        return self.reader.read(key)

    def _check_plain(self, fqn: str, key: str) -> None:
        """Refuse to read a quantized tensor (or a scale) as a plain one: it would load as garbage."""
        if self.quantized and packed(key, self.checkpoint.has):
            raise CheckpointError(
                f"tensor {key!r} (needed for {fqn!r}) is stored quantized, but the adapter's key map reads it "
                "as it is, past transformers' dequantizing converters; load a bf16 checkpoint, or make the key "
                "map leave this parameter to transformers' rules"
            )

    def copy(self, fqn: str, value: torch.Tensor, sources: list[str], shape: tuple, local, part) -> None:
        """Copy the built ``value`` (expected of ``shape``), or its ``part``, into ``local``."""
        if tuple(value.shape) != tuple(shape):
            shown = sources if len(sources) <= 4 else [*sources[:2], "...", sources[-1]]
            raise CheckpointError(
                f"{fqn!r} built from {shown} has shape {tuple(value.shape)}, expected {tuple(shape)}; "
                "the config does not match the checkpoint"
            )
        if part is not None:
            value = value[part]
        with torch.no_grad():
            local.copy_(value)  # casts to the stage's dtype

    def _convert(self, fqn: str, group: Group, *, numbered: bool = True) -> dict[str, torch.Tensor]:
        """Read the group's tensors and convert them; ``numbered``: also name a numbered module
        the group lacks (a block of experts checks the whole merge before it is cut)."""
        absent = [k for k in group.keys if not self.checkpoint.has(k)] + (group.missing() if numbered else [])
        if absent:
            raise self.missing(absent[0], fqn)
        tensors = {key: self.reader.read(key) for key in group.keys}
        self.read.extend(group.keys)
        return group.convert(tensors, model=self.module)

    def _built(self, fqn: str, name: str, group: Group) -> torch.Tensor:
        if name not in self.built:
            self.built.update(self._convert(fqn, group))
            if name not in self.built:
                raise CheckpointError(
                    f"{group.keys[:2]}... convert to {sorted(self.built)}, not to {name!r} (needed for {fqn!r})"
                )
        return self.built.pop(name)
