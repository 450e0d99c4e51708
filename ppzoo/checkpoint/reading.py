"""Reading safetensors checkpoints: the index, the shard files, whole tensors and parts of them.

A reader opens only the shard files that hold the tensors asked for and reads only those tensors.
On CPU the bytes go from the file into the target tensor's storage with ``pread``; a part of a
tensor (a TP / FSDP shard) reads only its own bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ppzoo.checkpoint.errors import CheckpointError, hub_error
from ppzoo.config import check_local_path

__all__ = ["INDEX_FILE", "SINGLE_FILE", "Checkpoint", "Reader", "resolve"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: the size of the buffer through which a read that changes dtype passes
_BLOCK_BYTES = 16 * 2**20


def resolve(model_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local directory for ``model_id``: the directory itself, or a hub snapshot of its metadata.

    For a hub id only ``config.json``, the index and small side files are fetched here; shard files
    are fetched on demand by :class:`Checkpoint`, so a rank downloads only the shards it reads.

    Raises:
        FileNotFoundError: ``model_id`` is a path (absolute, ``./``, ``~``, a trailing ``/``) that
            does not exist; it is not looked up on the hub.
        CheckpointError: ``model_id`` is a file, not a directory; or a hub id that cannot be
            fetched (offline, unreachable, no such repository or revision), naming it.
    """
    path = Path(os.fspath(model_id)).expanduser()
    from ppzoo.checkpoint.atomic import recover  # here, not at the top: atomic imports this module

    recover(path)  # a save killed mid-swap: finish it or restore the earlier checkpoint
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{str(path)!r} is a file; pass the checkpoint directory that holds it")
    check_local_path(os.fspath(model_id))
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(str(model_id), allow_patterns=["*.json", "*.model", "*.txt", "*.jinja"], **hub_kwargs)
        )
    except Exception as exc:
        error = hub_error(exc, str(model_id))
        if error is exc:
            raise
        raise error from None


class Checkpoint:
    """The safetensors files of one model directory (``model.safetensors`` or an index + shards)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        repo_id: str | None = None,
        hub_kwargs: Mapping[str, Any] | None = None,
    ):
        """Read the index (or the single file's header) of ``directory``; no tensor is read.

        Args:
            directory: the local model directory (for a hub id: its snapshot from :func:`resolve`).
            repo_id: the hub id shards missing from ``directory`` are downloaded from, if any.
            hub_kwargs: ``revision``, ``token``, ``cache_dir`` for those downloads, as given to
                :func:`resolve`, so shards come from the same revision as the metadata.

        Raises:
            CheckpointError: no safetensors checkpoint in ``directory``, a damaged index, or a
                shard name that is not a plain file name inside ``directory``.
        """
        self.directory = Path(directory)
        self.repo_id = repo_id
        self.hub_kwargs: dict[str, Any] = dict(hub_kwargs or {})
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            #: the file that lists the checkpoint's tensors, named in errors
            self.listing = INDEX_FILE
            try:
                with open(index, encoding="utf-8") as f:
                    listing = json.load(f)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointError(
                    f"{str(index)!r} is not valid JSON ({exc}); the index is damaged: download or save it again"
                ) from None
            if not isinstance(listing, dict) or not isinstance(listing.get("weight_map"), dict):
                seen = f"keys {sorted(listing)}" if isinstance(listing, dict) else type(listing).__name__
                raise CheckpointError(
                    f"{str(index)!r} has no 'weight_map' object mapping each tensor to its shard file "
                    f"(found {seen}); the index is damaged or not a safetensors index"
                )
            self.weight_map: dict[str, str] = dict(listing["weight_map"])
            checked: set[str] = set()
            for name in self.weight_map.values():
                if not isinstance(name, str) or name not in checked:
                    self._check_shard_name(name)
                    checked.add(name)
        elif single.is_file():
            self.listing = SINGLE_FILE
            self._check_shard_name(SINGLE_FILE)
            with _safe_open(single, framework="pt") as f:
                self.weight_map = {key: SINGLE_FILE for key in f.keys()}
        else:
            raise CheckpointError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {str(self.directory)!r}; "
                "ppzoo loads safetensors checkpoints (save with save_pretrained(safe_serialization=True))"
            )
        self.files_opened: list[str] = []

    def _check_shard_name(self, name: Any) -> None:
        """Refuse a shard ``name`` that is not a plain file name inside the directory, links resolved.

        NOTE: an index is data from wherever the checkpoint came from; without this, a weight_map
        entry ``../x``, ``/etc/x`` or a symlink out of the directory would make ppzoo read any file.
        A hub snapshot's files are links into the cache's ``blobs`` beside ``snapshots``, allowed.
        """
        where = f"shard {name!r} listed in {str(self.directory / self.listing)!r}"
        fix = "an index lists shard files by their bare names; repair the index or the checkpoint directory"
        if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{where} is not a plain file name inside the directory; {fix}")
        path = self.directory / name
        if not path.is_symlink():
            return
        target = path.resolve()
        inside = [self.directory.resolve()]
        if self.directory.parent.name == "snapshots":
            inside.append((self.directory.parent.parent / "blobs").resolve())
        if target.parent not in inside:
            raise CheckpointError(f"{where} is a link to {str(target)!r}, outside the directory; {fix}")

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def check_layer_count(self, container: str, num_layers: int, *, extra_layers: int | None = None) -> None:
        """Refuse a checkpoint that holds more layers of ``container`` than the config's ``num_layers``.

        Read from the tensor names alone: the keys ``<prefix>.<i>.*`` whose prefix is ``container``,
        or a dotted suffix of it, or ends with it (``h.3.*`` for ``transformer.h``). NOTE: without
        this, the layers past ``num_layers`` would be silently left out of the model.

        ``extra_layers`` more are allowed: multi-token prediction layers, which the model never
        calls (DeepSeek-V3's ``model.layers.61``); default: ``num_nextn_predict_layers`` of the
        directory's ``config.json``.

        Raises:
            CheckpointError: the checkpoint holds more layers, naming both counts and the fix.
        """
        name = container.rsplit(".", 1)[-1]
        counts: dict[str, int] = {}
        for key in self.weight_map:
            parts = key.split(".")
            for j in range(1, len(parts) - 1):
                if parts[j - 1] == name and parts[j].isdigit():
                    prefix = ".".join(parts[:j])
                    counts[prefix] = max(counts.get(prefix, 0), int(parts[j]) + 1)
                    break
        matches = [p for p in counts if p == container or container.endswith(f".{p}") or p.endswith(f".{container}")]
        if extra_layers is None:
            extra_layers = self._mtp_layers()
        if len(matches) != 1 or counts[matches[0]] <= num_layers + extra_layers:
            return
        prefix, count = matches[0], counts[matches[0]]
        raise CheckpointError(
            f"the checkpoint in {str(self.directory)!r} holds {count} layers ({prefix}.0 to {prefix}.{count - 1} in "
            f"{self.listing}), but the config has {num_layers} (num_hidden_layers): the other {count - num_layers} "
            f"would be left out; use the checkpoint's own config.json, or set num_hidden_layers={count}"
        )

    def _mtp_layers(self) -> int:
        """``num_nextn_predict_layers`` of the directory's config (0 without one)."""
        try:
            with open(self.directory / "config.json", encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, ValueError):
            return 0
        cfg = found.get("text_config", found) if isinstance(found, dict) else {}
        count = cfg.get("num_nextn_predict_layers") if isinstance(cfg, dict) else None
        return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0

    def file_of(self, key: str) -> Path:
        try:
            name = self.weight_map[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in {self.listing!r} in {str(self.directory)!r}") from None
        path = self.directory / name
        if not path.is_file():
            if self.repo_id is not None:
                from huggingface_hub import hf_hub_download

                try:
                    return Path(hf_hub_download(self.repo_id, name, **self.hub_kwargs))
                except Exception as exc:
                    error = hub_error(exc, self.repo_id, filename=name)
                    if error is exc:
                        raise
                    raise error from None
            raise CheckpointError(
                f"shard {name!r} (holding {key!r}) is listed in {INDEX_FILE} but missing from {str(self.directory)!r}"
            )
        return path

    def open(self, device: torch.device | str = "cpu") -> Reader:
        """A :class:`Reader` of this checkpoint's tensors for ``device``; close it when done."""
        return Reader(self, device)

    def _get_tensor(self, handle: Any, key: str) -> torch.Tensor:
        # NOTE: every whole-tensor read passes here, and every part read through _get_slice, in
        # place or not, so tests and the conformance kit can record what a stage reads.
        return handle.get_tensor(key)

    def _get_slice(self, handle: Any, key: str, part: tuple[slice, ...]) -> torch.Tensor:
        return handle.get_slice(key)[part]

    def _read_into_storage(self, reader: Reader, key: str, out: torch.Tensor, part: tuple[slice, ...] | None) -> None:
        """Read tensor ``key``, or only its ``part``, into the contiguous CPU tensor ``out``.

        Exactly the bytes of ``part`` are read, with ``pread`` on the reader's descriptor for the
        shard, straight into ``out``'s storage; when the dtypes differ they pass through the
        reader's small buffer and are cast into ``out`` from there.
        """
        file = reader.file(key)
        entry = file.entry(key)
        shape = tuple(entry["shape"])
        part = part if part is not None else tuple(slice(0, n) for n in shape)
        if tuple(s.stop - s.start for s in part) != tuple(out.shape):
            raise ValueError(f"part {part} of {key!r} {shape} does not fit a tensor of shape {tuple(out.shape)}")
        dtype = _dtype_of(entry, key, file.path)
        size = dtype.itemsize
        base = file.data_start + entry["data_offsets"][0]
        flat = out.detach().view(-1)
        if dtype == out.dtype:
            target, done = memoryview(flat.view(torch.uint8).numpy()), 0
            for first, n in _runs(shape, part):
                _pread_into(file.fd, target[done * size : (done + n) * size], base + first * size)
                done += n
            return
        staged = reader.buffer(dtype)
        staged_bytes = memoryview(staged.view(torch.uint8).numpy())
        filled = done = 0
        for first, n in _runs(shape, part):
            while n:
                k = min(n, len(staged) - filled)
                _pread_into(file.fd, staged_bytes[filled * size : (filled + k) * size], base + first * size)
                filled, first, n = filled + k, first + k, n - k
                if filled == len(staged):
                    flat[done : done + filled].copy_(staged)
                    done, filled = done + filled, 0
        flat[done : done + filled].copy_(staged[:filled])


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype_of(entry: dict, key: str, path: Path) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[entry["dtype"]]
    except KeyError:
        raise CheckpointError(
            f"tensor {key!r} in {path.name!r} has dtype {entry['dtype']!r}, which ppzoo cannot read; "
            f"readable: {', '.join(_SAFETENSORS_DTYPES)}"
        ) from None


def _runs(shape: tuple[int, ...], part: tuple[slice, ...]) -> Iterator[tuple[int, int]]:
    """(first element, element count) of each contiguous run of ``part`` in a row-major ``shape``, in order.

    A block of rows with every later dimension whole (an FSDP shard, any part of a 1-D tensor) is
    one run; a block of columns (a row-wise TP shard) is one run per row.
    """
    if not shape:
        yield 0, 1
        return
    cut = max((d for d, (s, n) in enumerate(zip(part, shape, strict=True)) if (s.start, s.stop) != (0, n)), default=0)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    count = (part[cut].stop - part[cut].start) * strides[cut]
    if count == 0:
        return
    for index in itertools.product(*(range(s.start, s.stop) for s in part[:cut])):
        yield (
            sum(i * stride for i, stride in zip(index, strides[:cut], strict=True)) + part[cut].start * strides[cut],
            count,
        )


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
            return _safe_open(path, framework="pt", device=device, backend="pread")
        except TypeError:  # safetensors without a choice of backend
            pass
    return _safe_open(path, framework="pt", device=device)


def _safe_open(path: Path, **kwargs: Any) -> Any:
    """``safe_open``, with a damaged file's error naming the file."""
    try:
        return safe_open(path, **kwargs)
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path.name!r} in {str(path.parent)!r} is not a safetensors file: {exc}; "
            "the file is damaged or truncated: download or save it again"
        ) from None


class _ShardFile:
    """A shard file opened once for ``pread``: its descriptor, header and where its data starts."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            where = f"{path.name!r} in {str(path.parent)!r} is not a safetensors file"
            fix = "the file is damaged or truncated: download or save it again"
            size = os.fstat(self.fd).st_size
            if size < 8:
                raise CheckpointError(f"{where}: it has {size} bytes, fewer than the 8 of a header length; {fix}")
            length = int.from_bytes(os.pread(self.fd, 8, 0), "little")
            # NOTE: checked against the size before reading, so a damaged length never becomes a
            # read (and an allocation) of up to 2**64 bytes.
            if length > size - 8:
                raise CheckpointError(f"{where}: its header says {length} bytes, but only {size - 8} follow; {fix}")
            raw = os.pread(self.fd, length, 8)
            try:
                header = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{where}: its header is not JSON ({exc}); {fix}") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{where}: its header is a JSON {type(header).__name__}, not an object; {fix}")
            self.header: dict[str, Any] = header
        except BaseException:
            os.close(self.fd)
            raise
        self.data_start = 8 + length

    def entry(self, key: str) -> dict[str, Any]:
        try:
            return self.header[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is listed for {self.path.name!r} but is not in it") from None

    def close(self) -> None:
        os.close(self.fd)


class _Into:
    """A handle whose reads land in ``out`` (a contiguous CPU tensor) and return it.

    NOTE: it answers as a safetensors handle does (``get_tensor(key)``, ``get_slice(key)[part]``),
    so an in-place read still passes through ``Checkpoint._get_tensor`` / ``_get_slice``.
    """

    def __init__(self, reader: Reader, out: torch.Tensor):
        self.reader, self.out = reader, out

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._read(key, None)

    def get_slice(self, key: str) -> _Into._Part:
        return _Into._Part(self, key)

    def _read(self, key: str, part: tuple[slice, ...] | None) -> torch.Tensor:
        self.reader.checkpoint._read_into_storage(self.reader, key, self.out, part)
        return self.out

    class _Part:
        def __init__(self, into: _Into, key: str):
            self.into, self.key = into, key

        def __getitem__(self, part: tuple[slice, ...]) -> torch.Tensor:
            return self.into._read(self.key, part)


class Reader:
    """Reads tensors from a checkpoint (see :meth:`Checkpoint.open`), opening each shard at most once."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device | str):
        self.checkpoint = checkpoint
        self.device = str(device)
        self.handles: dict[Path, Any] = {}
        self.files: dict[Path, _ShardFile] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.file(key).entry(key)["shape"])

    def read(
        self, key: str, part: tuple[slice, ...] | None = None, *, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor ``key``, or only its ``part`` (a tuple of slices: a TP / FSDP shard).

        With ``into`` (a tensor of the result's shape), the result lands in it, cast to its dtype,
        and ``into`` is returned.

        NOTE: into a contiguous CPU tensor the bytes are read straight into its storage (through
        one small buffer when the dtype changes), so no temporary of its size exists beside it and
        a stage's load peaks at its own bytes. Any other target (a strided view, GPU memory) is
        read into a temporary and copied.
        """
        if into is not None and not (into.device.type == "cpu" and into.is_contiguous()):
            value = self.read(key, part)
            with torch.no_grad():
                into.copy_(value)
            return into
        handle = self._handle(key) if into is None else _Into(self, into)
        if part is None:
            return self.checkpoint._get_tensor(handle, key)
        return self.checkpoint._get_slice(handle, key, part)

    def file(self, key: str) -> _ShardFile:
        path = self.checkpoint.file_of(key)
        if path not in self.files:
            self.files[path] = _ShardFile(path)
            self._opened(path)
        return self.files[path]

    def buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """The reader's staging buffer for reads that change dtype: about ``_BLOCK_BYTES``, as ``dtype``."""
        n = max(1, _BLOCK_BYTES // dtype.itemsize)
        if len(self._staging) < n * dtype.itemsize:
            self._staging = torch.empty(n * dtype.itemsize, dtype=torch.uint8)
        return self._staging[: n * dtype.itemsize].view(dtype)

    def _handle(self, key: str):
        path = self.checkpoint.file_of(key)
        if path not in self.handles:
            self.handles[path] = _open(path, self.device)
            self._opened(path)
        return self.handles[path]

    def _opened(self, path: Path) -> None:
        if path.name not in self.checkpoint.files_opened:
            self.checkpoint.files_opened.append(path.name)

    def close(self) -> None:
        for handle in self.handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self.handles.clear()
        for file in self.files.values():
            file.close()
        self.files.clear()
