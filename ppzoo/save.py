"""Hugging Face format export from pipeline ranks, written atomically.

Every rank writes its own stages' tensors, in safetensors shards of at most ``max_shard_size``
(a stage never shares a shard with another), under the original checkpoint keys (fused MoE
experts split back into one matrix per expert by the adapter's key map; a tied head left out, as
Hugging Face leaves it out). Rank 0 then names the shards ``model-0000i-of-0000n.safetensors``,
writes ``config.json``, copies the generation config and tokenizer files from the directory the
pipeline was loaded from, and writes ``model.safetensors.index.json`` from the key lists every
rank reports.

A stage sharded inside its sub-mesh (DTensor parameters from FSDP or TP) is gathered one tensor at
a time with ``full_tensor()``, which every rank of that sub-mesh calls in the same order; only the
rank at coordinate 0 of every non-pipeline mesh dimension writes. No rank ever holds more than its
own stages.

**Atomicity.** All ranks write into a sibling directory ``<dir>.tmp-<id>`` (so every rank must see
the same filesystem). Only when every rank reports success does rank 0 move an existing ``<dir>``
aside, rename the new one into place and delete the old one. A save that fails or dies midway
leaves any earlier checkpoint at ``<dir>`` untouched; the collective that would have reported the
dead rank fails after the process group's timeout at the latest, so no rank waits forever.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from ppzoo.weights import INDEX_FILE, CheckpointError, _persistent_state

if TYPE_CHECKING:
    from ppzoo.runtime import Pipeline

__all__ = ["SIDE_FILES", "parse_size", "save_pretrained", "write_atomically"]

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
#: what marks a directory as a checkpoint that a new save may replace
_CHECKPOINT_MARKERS = ("config.json", INDEX_FILE, "model.safetensors", ".metadata")


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
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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


def _is_writer(mesh: Any) -> bool:
    """True on the rank at coordinate 0 of every mesh dimension but ``pp``."""
    coordinate = mesh.get_coordinate()
    return all(c == 0 for name, c in zip(mesh.mesh_dim_names, coordinate) if name != "pp")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # NOTE: full_tensor() is collective over the DTensor's mesh: every rank of the stage's sub-mesh
    # reaches it for the same tensor in the same order, because they hold the same stage modules.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _write_stages(pipe: "Pipeline", directory: Path, max_shard_bytes: int) -> dict[str, tuple[str, int, int]]:
    """Write this rank's stages; ``{checkpoint key: (file, bytes, elements)}`` of what it wrote.

    A stage's tensors go into shards of at most ``max_shard_bytes`` (a larger tensor alone in
    one), each written as soon as it is full, so a rank holds at most one shard's full tensors.
    """
    tied = pipe.adapter.tied_weights(pipe.config)
    key_map = pipe.adapter.key_map(pipe.config)
    writer = _is_writer(pipe.mesh)
    indices = [spec.index for spec in pipe.plan.stages_for_rank(pipe.pp_rank)]
    written: dict[str, tuple[str, int, int]] = {}
    seen: set[int] = set()
    for index, module in zip(indices, pipe.stages):
        tensors: dict[str, torch.Tensor] = {}
        parts = 0

        def flush() -> None:
            nonlocal parts
            if tensors:
                name = _part_name(index, parts)
                _write_shard(directory / name, tensors)
                written.update({k: (name, t.numel() * t.element_size(), t.numel()) for k, t in tensors.items()})
                tensors.clear()
                parts += 1

        for fqn, _owner, _name, tensor in _persistent_state(module):
            # A tied head is the embedding (V placement) or a copy kept equal to it: Hugging Face
            # writes it once, under the embedding's key, which the first stage writes.
            if id(tensor) in seen or fqn in tied:
                continue
            seen.add(id(tensor))
            full = _full(tensor.detach())
            if not writer:
                continue
            for key, value in key_map.split(fqn, full).items():
                value = value.to("cpu").contiguous()
                held = sum(t.numel() * t.element_size() for t in tensors.values())
                if held + value.numel() * value.element_size() > max_shard_bytes:
                    flush()
                tensors[key] = value
        flush()
    return written
def _check_target(target: Path) -> None:
    if target.is_file():
        raise CheckpointError(f"{str(target)!r} is a file; pass a directory to save into")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).exists() for m in _CHECKPOINT_MARKERS):
        raise CheckpointError(
            f"{str(target)!r} exists and does not look like a checkpoint (none of {', '.join(_CHECKPOINT_MARKERS)}); "
            "a save replaces the whole directory, so pass a new or empty directory, or an earlier checkpoint"
        )


def _swap_into_place(new: Path, target: Path, tag: str) -> None:
    if target.exists():
        old = target.with_name(f"{target.name}.old-{tag}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _agree(error: BaseException | None, payload: Any, what: str) -> list[Any]:
    """Every rank's payload, or an error on every rank when one rank failed (collective)."""
    outcomes: list[Any] = [None] * dist.get_world_size()
    message = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(outcomes, (message, payload))
    failed = [(rank, m) for rank, (m, _) in enumerate(outcomes) if m is not None]
    if failed:
        if error is not None:
            raise error
        rank, message = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {message}")
    return [p for _, p in outcomes]


def write_atomically(
    directory: str | os.PathLike,
    write: Callable[[Path], Any],
    *,
    finish: Callable[[Path, list[Any]], None] | None = None,
    what: str = "save",
) -> Path:
    """Run ``write(tmp)`` on every rank, ``finish(tmp, results)`` on rank 0, then rename into place.

    Collective over the default process group. ``tmp`` is a fresh sibling of ``directory``; it
    replaces ``directory`` only after every rank's ``write`` and rank 0's ``finish`` succeeded.

    Args:
        directory: where the result ends up.
        write: called on every rank with the temporary directory; returns a picklable result.
        finish: called on rank 0 with the temporary directory and every rank's result, in rank order.
        what: names the operation in errors.

    Returns:
        ``directory`` as an absolute path.

    Raises:
        CheckpointError: ``directory`` is a file or a non-empty directory that is no checkpoint,
            or a rank failed (the error names it); ``directory`` is then left as it was.
    """
    target = Path(directory).expanduser().absolute()
    setup: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            _check_target(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tag = uuid.uuid4().hex[:12]
            tmp = target.with_name(f"{target.name}.tmp-{tag}")
            tmp.mkdir()
            setup = [(None, str(tmp), tag)]
        except Exception as exc:  # noqa: BLE001 - sent to every rank, raised everywhere
            setup = [(exc, None, None)]
    dist.broadcast_object_list(setup, src=0)
    error, tmp_name, tag = setup[0]
    if error is not None:
        raise error
    tmp = Path(tmp_name)
    try:
        result, error = write(tmp), None
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it before anyone renames
        result, error = None, exc
    try:
        results = _agree(error, result, what)
        done: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                if finish is not None:
                    finish(tmp, results)
                _swap_into_place(tmp, target, tag)
            except Exception as exc:  # noqa: BLE001 - sent to every rank
                done = [exc]
        dist.broadcast_object_list(done, src=0)
        if done[0] is not None:
            raise CheckpointError(f"{what} failed on rank 0 while finishing {str(target)!r}: {done[0]}")
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _finish_pretrained(pipe: "Pipeline", tmp: Path, results: list[dict[str, tuple[str, int, int]]]) -> None:
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
    config = copy.deepcopy(pipe.config)
    config.dtype = pipe.dtype  # the dtype the tensors were written in
    config.save_pretrained(tmp)
    source = getattr(pipe, "source", None)
    if source is not None and Path(source).is_dir():
        for entry in sorted(Path(source).iterdir()):
            if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in SIDE_FILES):
                shutil.copy2(entry, tmp / entry.name)


def save_pretrained(pipe: "Pipeline", directory: str | os.PathLike, *, max_shard_size: int | str = "50GB") -> Path:
    """Write ``pipe``'s weights as a Hugging Face checkpoint that ``from_pretrained`` loads.

    Collective: call it on every rank. See the module docstring for the layout and atomicity.

    Args:
        pipe: the pipeline whose current weights are saved.
        directory: the checkpoint directory; an earlier checkpoint there is replaced.
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
    return write_atomically(
        directory,
        lambda tmp: _write_stages(pipe, tmp, max_shard_bytes),
        finish=lambda tmp, results: _finish_pretrained(pipe, tmp, results),
        what="save_pretrained",
    )
