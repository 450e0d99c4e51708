"""Hugging Face format export from pipeline ranks: sharded safetensors, the index, config and side files.

Every rank writes its own stages' tensors, in safetensors shards of at most ``max_shard_size``
(a stage never shares a shard with another), under the keys Hugging Face's ``save_pretrained``
writes: transformers' own conversion rules, reversed (:mod:`ppzoo.checkpoint.conversion`: fused
MoE experts split back into one matrix per expert, EXAONE's original names, NeoX's ``embed_out``),
or the adapter's key map where it says more than the identity; a tied head left out, as Hugging
Face leaves it out. Rank 0 then names the shards ``model-0000i-of-0000n.safetensors``,
writes ``config.json``, copies the generation config and tokenizer files from the directory the
model was loaded from, and writes ``model.safetensors.index.json`` from the key lists every rank
reports.

A stage sharded inside its sub-mesh (DTensor parameters from FSDP or TP) is gathered one tensor at
a time with ``full_tensor()``, which every rank of that sub-mesh calls in the same order; only the
rank at coordinate 0 of every non-pipeline mesh dimension writes. No rank ever holds more than its
own stages. The whole directory is written atomically (see :mod:`ppzoo.checkpoint.atomic`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ppzoo.checkpoint.atomic import write_atomically
from ppzoo.checkpoint.conversion import saving_groups
from ppzoo.checkpoint.errors import CheckpointError
from ppzoo.checkpoint.quantized import unquantized_config
from ppzoo.checkpoint.reading import INDEX_FILE
from ppzoo.checkpoint.tensors import persistent_tensors

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from ppzoo.adapter import Adapter, KeyMap

__all__ = ["SIDE_FILES", "parse_size", "save_pretrained"]

#: files copied from the source checkpoint when it has them: generation config, tokenizer, chat template
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # NOTE: the single place a shard is written, so tests can make a rank fail or die mid-write.
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _part_name(stage_index: int, part: int) -> str:
    """A shard's name while it is written; rank 0 renames it once every rank has reported."""
    return f"part-{stage_index:05d}-{part:05d}.safetensors"


def _shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


#: size units ``save_pretrained(max_shard_size=...)`` understands, as Hugging Face does
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10⁹ bytes) or ``"500MiB"`` (2²⁰).

    Raises:
        ValueError: not a positive size; the message names the value.
    """
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if match is None:
            raise ValueError(
                f"max_shard_size {size!r} is not a size; use bytes or a string like '5GB', '500MB' or '2GiB'"
            )
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}")
    return value


def _is_writer(mesh: DeviceMesh) -> bool:
    """True on the rank at coordinate 0 of every mesh dimension but ``pp``."""
    coordinate = mesh.get_coordinate()
    return all(c == 0 for name, c in zip(mesh.mesh_dim_names, coordinate, strict=True) if name != "pp")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # NOTE: full_tensor() is collective over the DTensor's mesh: every rank of the stage's sub-mesh
    # reaches it for the same tensor in the same order, because they hold the same stage modules.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _mapped(key_map: KeyMap, fqn: str, tensor: torch.Tensor) -> bool:
    """Whether the adapter's key map writes ``fqn`` under other keys than its own (asked with a meta tensor)."""
    from ppzoo.adapter import KeyMap

    if type(key_map) is KeyMap:
        return False
    try:
        return list(key_map.split(fqn, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))) != [fqn]
    except Exception:  # noqa: BLE001 - a key map that reads values: ask it with the real tensor
        return True


def _units(module: nn.Module, entries: list[tuple[str, torch.Tensor]], key_map: KeyMap) -> list[tuple[list[str], Any]]:
    """The stage's tensors in write order, grouped as they are converted: ``(fqns, how)`` where
    ``how`` is None for the adapter's key map, else transformers' reversed rule (a ``SaveGroup``)."""
    mapped = {fqn for fqn, tensor in entries if _mapped(key_map, fqn, tensor)}
    groups = {id(g): g for g in saving_groups(module, [fqn for fqn, _ in entries if fqn not in mapped])}
    group_of = {fqn: g for g in groups.values() for fqn in g.fqns}
    units, started = [], set()
    for fqn, _ in entries:
        if fqn in mapped:
            units.append(([fqn], None))
        elif id(group_of[fqn]) not in started:
            started.add(id(group_of[fqn]))
            units.append((group_of[fqn].fqns, group_of[fqn]))
    return units


def _shards(
    module: nn.Module,
    max_shard_bytes: int,
    *,
    key_map: KeyMap,
    tied: Mapping[str, str],
    seen: set[int],
    writer: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """One stage's tensors under their checkpoint keys, on CPU, in shards of at most ``max_shard_bytes``.

    A tensor larger than that gets a shard of its own. ``seen`` holds the tensors already written
    (a tensor two stages of this rank share is written once); only the writer gets shards.
    """
    entries = []
    for fqn, _owner, _name, tensor in persistent_tensors(module):
        # A tied head is the embedding (V placement) or a copy kept equal to it: Hugging Face
        # writes it once, under the embedding's key, which the first stage writes.
        if id(tensor) in seen or fqn in tied:
            continue
        seen.add(id(tensor))
        entries.append((fqn, tensor))
    by_fqn = dict(entries)
    tensors: dict[str, torch.Tensor] = {}
    for fqns, how in _units(module, entries, key_map):
        full = {fqn: _full(by_fqn[fqn].detach()) for fqn in fqns}
        if not writer:
            continue
        if how is None:
            (fqn,) = fqns
            out = key_map.split(fqn, full[fqn])
        else:
            out = how.convert(full, model=module)
        for key, value in out.items():
            value = value.to("cpu")
            # NOTE: a converted tensor may be a view of a fused parameter (one expert of many);
            # safetensors writes no tensors that share storage, so such pieces are copied
            value = (
                value.contiguous()
                if how is None or how.converter is None
                else value.clone(memory_format=torch.contiguous_format)
            )
            held = sum(t.numel() * t.element_size() for t in tensors.values())
            if tensors and held + value.numel() * value.element_size() > max_shard_bytes:
                yield tensors
                tensors = {}
            tensors[key] = value
    if tensors:
        yield tensors


def _write_stages(
    stages: Mapping[int, nn.Module],
    directory: Path,
    max_shard_bytes: int,
    *,
    key_map: KeyMap,
    tied: Mapping[str, str],
    writer: bool,
) -> dict[str, tuple[str, int, int]]:
    """Write this rank's stages; ``{checkpoint key: (file, bytes, elements)}`` of what it wrote."""
    written: dict[str, tuple[str, int, int]] = {}
    seen: set[int] = set()
    for index, module in stages.items():
        shards = _shards(module, max_shard_bytes, key_map=key_map, tied=tied, seen=seen, writer=writer)
        for part, tensors in enumerate(shards):
            name = _part_name(index, part)
            _write_shard(directory / name, tensors)
            written.update({k: (name, t.numel() * t.element_size(), t.numel()) for k, t in tensors.items()})
            # NOTE: each shard is written as soon as it is full and dropped before the next one
            # fills, so a rank holds at most one shard's full tensors in CPU memory.
            tensors.clear()
    return written


def _finish(
    tmp: Path,
    results: list[dict[str, tuple[str, int, int]]],
    *,
    config: Any,
    dtype: torch.dtype,
    source: Path | None,
) -> None:
    """On rank 0: name the shards, write the index and ``config.json``, copy the source's side files."""
    weight_map: dict[str, str] = {}
    total_size = total_parameters = 0
    for rank, written in enumerate(results):
        for key, (name, size, numel) in written.items():
            if key in weight_map:
                raise CheckpointError(
                    f"tensor {key!r} was written twice: {weight_map[key]!r} and {name!r} (rank {rank})"
                )
            weight_map[key] = name
            total_size += size
            total_parameters += numel
    # NOTE: only now is the number of shards known; part names sort in stage order, then part order
    parts = sorted(set(weight_map.values()))
    names = {part: _shard_name(i + 1, len(parts)) for i, part in enumerate(parts)}
    for part, name in names.items():
        os.replace(tmp / part, tmp / name)
    weight_map = {key: names[part] for key, part in weight_map.items()}
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    # NOTE: a checkpoint loaded dequantized is written plain: no quantization_config
    config = unquantized_config(config)
    config.dtype = dtype  # the dtype the tensors were written in
    config.save_pretrained(tmp)
    if source is not None and source.is_dir():
        for entry in sorted(source.iterdir()):
            if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in SIDE_FILES):
                shutil.copy2(entry, tmp / entry.name)


def save_pretrained(
    stages: Mapping[int, nn.Module],
    directory: str | os.PathLike,
    *,
    adapter: Adapter,
    config: Any,
    mesh: DeviceMesh,
    dtype: torch.dtype,
    source: str | os.PathLike | None = None,
    max_shard_size: int | str = "50GB",
) -> Path:
    """Write the stages' weights as a Hugging Face checkpoint that ``from_pretrained`` loads.

    Collective: call it on every rank, each with its own stages. See the module docstring for the
    layout, and :func:`ppzoo.checkpoint.write_atomically` for what a failed save leaves behind.

    Args:
        stages: this rank's stage modules by stage index (under their original FQNs).
        directory: the checkpoint directory; an earlier checkpoint there is replaced.
        adapter: supplies ``key_map(config)`` (FQN → checkpoint keys, where it says more than the
            identity; every other tensor is written under transformers' reversed conversion rules)
            and ``tied_weights(config)`` (tied copies, left out as Hugging Face leaves them out).
        config: the model config, written as ``config.json``.
        mesh: the whole device mesh, with a ``pp`` dimension; only the rank at coordinate 0 of
            every other dimension writes.
        dtype: the dtype of the stages' parameters, recorded in ``config.json``.
        source: the local directory the model was loaded from, whose generation config and
            tokenizer files (:data:`SIDE_FILES`) are copied; None copies nothing.
        max_shard_size: the largest shard file, in bytes or as ``"5GB"`` / ``"500MiB"`` (Hugging
            Face's default, 50GB); a tensor larger than it gets a shard of its own. Each rank
            holds at most one shard's tensors in CPU memory while writing.

    Returns:
        ``directory`` as an absolute path.

    Raises:
        ValueError: ``max_shard_size`` is not a size (raised on every rank, before any writing).
        CheckpointError: ``directory`` cannot take a checkpoint, or a rank failed while writing;
            whatever was at ``directory`` before is left as it was.
    """
    max_shard_bytes = parse_size(max_shard_size)
    key_map, tied, writer = adapter.key_map(config), adapter.tied_weights(config), _is_writer(mesh)
    source = Path(source) if source is not None else None
    return write_atomically(
        directory,
        lambda tmp: _write_stages(stages, tmp, max_shard_bytes, key_map=key_map, tied=tied, writer=writer),
        finish=lambda tmp, results: _finish(tmp, results, config=config, dtype=dtype, source=source),
        what="save_pretrained",
    )
