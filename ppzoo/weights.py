"""Safetensors checkpoints: the index, per-stage reads, key conversion and tied weights.

A stage opens only the shard files that hold its own tensors and reads only those tensors, cast
straight to the requested device and dtype. Nothing else of the checkpoint is touched.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import nn

from ppzoo.adapter import Adapter
from ppzoo.parallelize import local_slice

__all__ = ["Checkpoint", "CheckpointError", "load_stage_weights", "resolve"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing a tensor or a file, or holds a tensor of the wrong shape."""


def resolve(model_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local directory for ``model_id``: the directory itself, or a hub snapshot of its metadata.

    For a hub id only ``config.json``, the index and small side files are fetched here; shard files
    are fetched on demand by :class:`Checkpoint`, so a rank downloads only the shards it reads.
    """
    path = Path(os.fspath(model_id)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{str(path)!r} is a file; pass the checkpoint directory that holds it")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(str(model_id), allow_patterns=["*.json", "*.model", "*.txt", "*.jinja"], **hub_kwargs)
    )


class Checkpoint:
    """The safetensors files of one model directory (``model.safetensors`` or an index + shards)."""

    def __init__(self, directory: str | os.PathLike, *, repo_id: str | None = None):
        self.directory = Path(directory)
        self.repo_id = repo_id
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            #: the file that lists the checkpoint's tensors, named in errors
            self.listing = INDEX_FILE
            with open(index) as f:
                self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
        elif single.is_file():
            self.listing = SINGLE_FILE
            with safe_open(single, framework="pt") as f:
                self.weight_map = {key: SINGLE_FILE for key in f.keys()}
        else:
            raise CheckpointError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {str(self.directory)!r}; "
                "ppzoo loads safetensors checkpoints (save with save_pretrained(safe_serialization=True))"
            )
        self.files_opened: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def file_of(self, key: str) -> Path:
        try:
            name = self.weight_map[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in {self.listing!r} in {str(self.directory)!r}") from None
        path = self.directory / name
        if not path.is_file():
            if self.repo_id is not None:
                from huggingface_hub import hf_hub_download

                return Path(hf_hub_download(self.repo_id, name))
            raise CheckpointError(
                f"shard {name!r} (holding {key!r}) is listed in {INDEX_FILE} but missing from {str(self.directory)!r}"
            )
        return path

    def open(self, device: torch.device | str = "cpu") -> "_Reader":
        return _Reader(self, device)

    def _get_tensor(self, handle: Any, key: str) -> torch.Tensor:
        # NOTE: the single place a tensor is read, so tests can record what a stage reads.
        return handle.get_tensor(key)

    def _get_slice(self, handle: Any, key: str, part: tuple[slice, ...]) -> torch.Tensor:
        return handle.get_slice(key)[part]

    def _read_into_storage(self, path: Path, key: str, out: torch.Tensor) -> None:
        """Read tensor ``key`` of shard ``path`` into the contiguous CPU tensor ``out`` (cast to its dtype)."""
        start, header = _header(path)
        entry = header[key]
        begin, _ = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        flat = out.detach().view(-1)
        with open(path, "rb", buffering=0) as f:
            if dtype == out.dtype:
                _pread_into(f.fileno(), memoryview(flat.view(torch.uint8).numpy()), start + begin)
                return
            step = max(1, _BLOCK_BYTES // torch.empty((), dtype=dtype).element_size())
            buffer = torch.empty(min(step, flat.numel()), dtype=dtype)
            for first in range(0, flat.numel(), step):
                n = min(step, flat.numel() - first)
                chunk = buffer[:n]
                _pread_into(f.fileno(), memoryview(chunk.view(torch.uint8).numpy()), start + begin + first * chunk.element_size())
                flat[first:first + n].copy_(chunk)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file."""
    stat = os.stat(path)
    # NOTE: keyed by mtime and size too: a checkpoint saved again in place must not reuse offsets.
    return _read_header(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _read_header(path: str, mtime_ns: int, size: int) -> tuple[int, dict]:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return 8 + length, json.loads(f.read(length))


def _pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"short read at byte {offset + done} of a safetensors file")
        done += n


def _open(path: Path, device: str) -> Any:
    """A safetensors handle; on CPU one that reads with ``pread`` where safetensors offers it.

    NOTE: the default backend maps the file, and every page a stage reads stays mapped (and
    counted in the process's RSS) until the handle closes: a stage's load would peak at twice its
    bytes. Read with ``pread``, a tensor's bytes live only until copied into the parameter.
    """
    if torch.device(device).type == "cpu":
        try:
            return safe_open(path, framework="pt", device=device, backend="pread")
        except TypeError:  # safetensors without a choice of backend
            pass
    return safe_open(path, framework="pt", device=device)


class _Reader:
    """Reads tensors from a checkpoint, opening each shard at most once."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device | str):
        self.checkpoint = checkpoint
        self.device = str(device)
        self.handles: dict[Path, Any] = {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, part: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor ``key``, or only its ``part`` (a tuple of slices: a TP / FSDP shard)."""
        if part is None:
            return self.checkpoint._get_tensor(self._handle(key), key)
        return self.checkpoint._get_slice(self._handle(key), key, part)

    def _handle(self, key: str):
        path = self.checkpoint.file_of(key)
        if path not in self.handles:
            self.handles[path] = _open(path, self.device)
            self.checkpoint.files_opened.append(path.name)
        return self.handles[path]

    def close(self) -> None:
        for handle in self.handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self.handles.clear()


def _persistent_state(module: nn.Module) -> Iterable[tuple[str, nn.Module, str, torch.Tensor]]:
    """(fqn, owner, attribute, tensor) for every parameter and persistent buffer, ties included."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for name, param in owner._parameters.items():
            if param is not None:
                yield (f"{prefix}.{name}" if prefix else name), owner, name, param
        for name, buf in owner._buffers.items():
            if buf is not None and name not in owner._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), owner, name, buf


#: tensors larger than this are read in row blocks of about this size
_BLOCK_BYTES = 16 * 2**20


def _read_into(reader: "_Reader", key: str, local: torch.Tensor, part: tuple[slice, ...] | None) -> None:
    """Copy checkpoint tensor ``key`` (or its ``part``) into ``local``, casting to its dtype.

    NOTE: a large whole tensor bound for CPU memory is read straight into the parameter's
    storage (through one small buffer when the dtype changes), so no temporary the size of the
    tensor (a 128k-vocabulary head, say) exists beside it and a stage's load peaks at its own
    bytes. A shard (TP / FSDP) is read as a slice: the rank never holds the whole tensor.
    """
    if part is None and local.device.type == "cpu" and local.is_contiguous() and (
        local.numel() * local.element_size() > _BLOCK_BYTES
    ):
        reader.checkpoint._read_into_storage(reader.checkpoint.file_of(key), key, local)
        return
    value = reader.read(key, part)
    with torch.no_grad():
        local.copy_(value)


def load_stage_weights(module: nn.Module, checkpoint: Checkpoint, *, adapter: Adapter, config: Any) -> list[str]:
    """Fill every parameter and persistent buffer of a materialised stage from the checkpoint.

    Only the tensors of this stage are read. A tied copy (``lm_head.weight`` tied to the
    embedding) is read from its own key when the checkpoint has one, else from its source's key.

    Returns:
        The checkpoint keys read.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape; the message names key and file.
    """
    key_map = adapter.key_map(config)
    tied = adapter.tied_weights(config)
    device = next((t.device for _, _, _, t in _persistent_state(module)), torch.device("cpu"))
    reader = checkpoint.open(device)
    done: set[int] = set()
    read: list[str] = []
    try:
        for fqn, _owner, _name, target in _persistent_state(module):
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
            part = local_slice(target)  # this rank's shard of a TP / FSDP parameter, or None
            for key in sources:
                expected = None if len(sources) > 1 else tuple(target.shape)
                if expected is not None and reader.shape(key) != expected:
                    raise CheckpointError(
                        f"tensor {key!r} in {checkpoint.file_of(key).name!r} has shape {reader.shape(key)}, "
                        f"but {fqn!r} expects {expected}; the config does not match the checkpoint"
                    )
            local = target.to_local() if part is not None else target
            if len(sources) == 1:
                _read_into(reader, sources[0], local, part)
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
