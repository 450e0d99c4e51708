"""Training state (model, optimizer, step) through ``torch.distributed.checkpoint``.

The state is keyed by original FQNs, not by rank or stage, so a run saved with one split resumes
with another (another schedule, stage count or placement). Each rank presents its stages to
``get_state_dict`` / ``set_state_dict`` as one module tree under the original FQNs (see
:func:`rank_module`), with the optimizer state flattened per parameter
(``optimizer.state.<fqn>.exp_avg``, ``optimizer.param_groups.<fqn>.lr``); DTensor parameters
from FSDP or TP are saved as shards and resharded on load by ``torch.distributed.checkpoint``.

**Tied embeddings.** A tied head is saved once, under the embedding's FQN, for the model and the
optimizer alike: under V placement it *is* the embedding parameter, and elsewhere it is a copy the
gradient all-reduce keeps identical to it, with identical optimizer state. On load, a copy is
filled from the embedding's entries, so the state lines up under any split.

**What a state directory is trusted for.** Loading one runs no code from it. ``save_state`` writes
``ppzoo_state.json`` (step, whether the optimizer had stepped, format version) beside torch's files;
:func:`saved_step` reads only that JSON, and :func:`load_state` refuses a directory without it. The
one pickle torch's format holds, ``.metadata``, is unpickled with an allow-list of torch's
checkpoint metadata classes and builtin containers (:class:`_MetadataReader`); tensors and other
values are read by torch with ``weights_only=True``. The values in it are still trusted: a state
directory sets the model's weights and the optimizer's hyperparameters.

The directory is written atomically (:func:`ppzoo.checkpoint.write_atomically`): into a sibling
temporary directory, renamed into place once every rank has finished, so an earlier state there
survives a save that fails midway.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ppzoo.agreement import exchange
from ppzoo.checkpoint.atomic import agree, recover, write_atomically
from ppzoo.checkpoint.errors import CheckpointError

if TYPE_CHECKING:
    from ppzoo.adapter import Adapter

__all__ = ["STATE_FILE", "load_state", "rank_module", "save_state", "saved_step"]

#: the JSON record of a state ppzoo wrote: step, optimizer_stepped, format
STATE_FILE = "ppzoo_state.json"
_FORMAT = 1

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_OPTIMIZER_PREFIXES = ("state.", "param_groups.")


def rank_module(stages: Sequence[nn.Module]) -> nn.Module:
    """One module tree holding ``stages`` under their original FQNs.

    A module that only one stage holds is shared as is; a path several stages hold (``model``,
    ``model.layers``) becomes a fresh container of the union of their children, so the stages
    themselves are not changed. Parameters are the stages' own.
    """
    holders: dict[str, list[nn.Module]] = {}
    for stage in stages:
        for name, module in stage.named_modules(remove_duplicate=False):
            holders.setdefault(name, []).append(module)

    def build(path: str) -> nn.Module:
        modules = list({id(m): m for m in holders[path]}.values())
        if len(modules) == 1:
            return modules[0]
        container = nn.Module()
        for module in modules:
            for name, child in module._modules.items():
                if child is not None and name not in container._modules:
                    container.add_module(name, build(f"{path}.{name}" if path else name))
        return container

    return build("")


def _renames(tied: Mapping[str, str], keys: set[str]) -> dict[str, str]:
    """Tied copies' keys among ``keys`` → the source's key they are stored under."""
    out: dict[str, str] = {}
    for copy, source in tied.items():
        if copy in keys:
            out[copy] = source
        for prefix in _OPTIMIZER_PREFIXES:
            for key in keys:
                if key.startswith(f"{prefix}{copy}."):
                    out[key] = f"{prefix}{source}.{key[len(prefix) + len(copy) + 1 :]}"
    return out


def _stored(state: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """``state`` with tied copies under their source's key (once, where the source is here too)."""
    out = {k: v for k, v in state.items() if k not in renames}
    for key, stored in renames.items():
        if key in state:
            out.setdefault(stored, state[key])
    return out


def _state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """``get_state_dict`` of ``module`` and ``optimizer``, with the optimizer state always present.

    ``get_state_dict`` creates a missing optimizer state by a zero-grad step, but skips that when
    gradients exist, which would leave the state out; the gradients are set aside meanwhile.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params] if not optimizer.state else None
    if grads is not None:
        for p in params:
            p.grad = None
    try:
        return get_state_dict(module, optimizer, options=_OPTIONS)
    finally:
        if grads is not None:
            for p, g in zip(params, grads, strict=True):
                p.grad = g


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int (optimizer steps taken so far), got {step!r}")
    return step


def save_state(
    stages: Sequence[nn.Module],
    directory: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    adapter: Adapter,
    config: Any,
) -> Path:
    """Save model, optimizer and step so that :func:`load_state` resumes the run exactly.

    Collective: call it on every rank, each with its own stages.

    Args:
        stages: this rank's stage modules (under their original FQNs).
        directory: where the state goes; an earlier state there is replaced.
        optimizer: the optimizer over the stages' parameters.
        step: optimizer steps taken so far, returned by :func:`load_state`.
        adapter: supplies ``tied_weights(config)``: tied copies, saved once under their source.
        config: the model config the stages were built from.

    Returns:
        ``directory`` as an absolute path.

    Raises:
        ValueError: ``step`` is not a non-negative int.
        CheckpointError: ``directory`` cannot take the state, or a rank failed while writing.
    """
    try:
        step, error = _check_step(step), None
    except ValueError as exc:
        error = exc
    exchange("save_state", error)  # every rank is here and none failed, before get_state_dict's collectives
    tied = adapter.tied_weights(config)
    # NOTE: get_state_dict gives a fresh optimizer state by stepping it with zero grads and lr 0;
    # that state must not leak into the run (Adam's bias correction counts steps), so it is dropped
    # again here and the checkpoint records that the optimizer had not stepped.
    stepped = bool(optimizer.state)
    model_state, optimizer_state = _state_dicts(rank_module(stages), optimizer)
    if not stepped:
        optimizer.state.clear()
    state = {
        "model": _stored(model_state, _renames(tied, set(model_state))),
        "optimizer": _stored(optimizer_state, _renames(tied, set(optimizer_state))),
    }

    def write(tmp: Path) -> None:
        dcp.save(state, checkpoint_id=tmp)

    def finish(tmp: Path, results: list[Any]) -> None:
        record = {"format": _FORMAT, "step": step, "optimizer_stepped": stepped}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    return write_atomically(directory, write, finish=finish, what="save_state")


#: torch's checkpoint metadata classes, by module: all a ``.metadata`` pickle may name besides builtins
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        name
        for name, value in vars(dcp_metadata).items()
        if isinstance(value, type) and value.__module__ == dcp_metadata.__name__
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"} | {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "slice",
        "complex",
        "bytearray",
        "int",
        "float",
        "str",
        "bool",
        "bytes",
    },
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that loads only :data:`_METADATA_CLASSES`; anything else is refused, not called."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{str(self.path)!r} names {module}.{name}, which is not part of torch's checkpoint metadata; "
            "refused, since unpickling it could run code: load only training states written by save_state"
        )


class _MetadataReader(FileSystemReader):
    """torch's ``FileSystemReader`` with ``.metadata`` unpickled through :class:`_MetadataUnpickler`.

    NOTE: mirrors ``FileSystemReader.read_metadata`` of torch 2.x, which calls ``pickle.load`` on
    the file; everything else (tensor data, read with ``weights_only=True``) is torch's own.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        with self.fs.create_stream(path, "rb") as file:
            raw = file.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(raw), path).load()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any damage to the pickle is reported with its file
            raise CheckpointError(
                f"{str(path)!r} is not readable checkpoint metadata ({exc!r}); save the state again"
            ) from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(
                f"{str(path)!r} holds a {type(metadata).__name__}, not checkpoint metadata; save the state again"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_files(directory: Path, metadata: dcp_metadata.Metadata) -> None:
    """Refuse a state whose data files are missing, shorter than its metadata says, or outside it."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(
                f"{str(directory / '.metadata')!r} places data in {name!r}, not a file of {str(directory)!r}; "
                "refused: load only training states written by save_state"
            )
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(
                f"the training state in {str(directory)!r} is incomplete: {name!r} is missing; "
                "copy the whole directory, or save the state again"
            )
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(
                f"the training state in {str(directory)!r} is damaged: {name!r} has {size} bytes, but its "
                f".metadata places data up to byte {end} (the file is truncated); copy it again, or save the state again"
            )


def _load_failure(exc: CheckpointException, directory: Path) -> CheckpointError:
    """torch's multi-rank failure report as one line: the first failing rank and its error."""
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return CheckpointError(f"cannot load the training state in {str(directory)!r}: {exc}")
    rank = min(failures)
    error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return CheckpointError(
        f"cannot load the training state in {str(directory)!r} (rank {rank}: {type(error).__name__}: {first[:300]}); "
        "the state is damaged or incomplete: save it again, or resume from another"
    )


def _check_keys(directory: Path, state: dict[str, dict[str, Any]]) -> None:
    metadata = _MetadataReader(directory).read_metadata()
    _check_files(directory, metadata)
    saved = set(metadata.state_dict_metadata)
    for part, entries in state.items():
        missing = sorted(f"{part}.{k}" for k in entries if f"{part}.{k}" not in saved)
        if missing:
            raise CheckpointError(
                f"the training state in {str(directory)!r} has no {missing[0]!r}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; it was saved from another "
                "model or with another kind of optimizer"
            )
        for key, value in entries.items():
            size = getattr(metadata.state_dict_metadata[f"{part}.{key}"], "size", None)
            if isinstance(value, torch.Tensor) and size is not None and tuple(size) != tuple(value.shape):
                raise CheckpointError(
                    f"the training state in {str(directory)!r} holds {part}.{key} of shape {tuple(size)}, but this "
                    f"model's is {tuple(value.shape)}; it was saved from another model (or another config)"
                )


def _state_directory(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``directory`` as an absolute path, and its :data:`STATE_FILE` record, checked."""
    directory = Path(directory).expanduser().absolute()
    recover(directory)  # a save killed mid-swap: finish it or restore the earlier state
    if not (directory / ".metadata").is_file():
        raise CheckpointError(
            f"{str(directory)!r} holds no training state (no .metadata); pass a directory written by save_state"
        )
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} has no {STATE_FILE}, so it was not written by ppzoo's save_state (or by a ppzoo "
            "from before that record); ppzoo loads only training states it wrote, since torch's .metadata is a "
            "pickle: save the state again with Pipeline.save_state"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); save the state again") from None
    expected = f"an object with format {_FORMAT}, a non-negative int step and a bool optimizer_stepped"
    step = record.get("step") if isinstance(record, dict) else None
    if (
        not isinstance(record, dict)
        or record.get("format") != _FORMAT
        or isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or not isinstance(record.get("optimizer_stepped"), bool)
    ):
        raise CheckpointError(f"{str(path)!r} holds {record!r}, expected {expected}; save the state again")
    return directory, record


def saved_step(directory: str | os.PathLike) -> int:
    """The step a training state was saved at, read from its :data:`STATE_FILE` alone (no pickle, no process group).

    Raises:
        CheckpointError: ``directory`` holds no training state written by :func:`save_state`.
    """
    return int(_state_directory(directory)[1]["step"])


def load_state(
    stages: Sequence[nn.Module],
    directory: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    *,
    adapter: Adapter,
    config: Any,
) -> int:
    """Restore model, optimizer and step saved by :func:`save_state`, under any split.

    Collective: call it on every rank, each with its own stages. The optimizer's hyperparameters
    (``lr``, ``betas``, ...) are restored too.

    Args:
        stages: this rank's stage modules, built from the same model (any schedule and split).
        directory: a directory written by :func:`save_state`.
        optimizer: the optimizer over the stages' parameters, of the kind that was saved.
        adapter: supplies ``tied_weights(config)``: tied copies are filled from their source's entries.
        config: the model config the stages were built from.

    Returns:
        The step given to :func:`save_state`.

    Raises:
        CheckpointError: ``directory`` holds no training state, or not one of this model and optimizer.
    """
    try:
        (directory, record), error = _state_directory(directory), None
    except CheckpointError as exc:
        error = exc
    exchange("load_state", error)  # every rank is here and found the state, before any collective
    module = rank_module(stages)
    model_state, optimizer_state = _state_dicts(module, optimizer)
    tied = adapter.tied_weights(config)
    renames = {**_renames(tied, set(model_state)), **_renames(tied, set(optimizer_state))}
    state = {
        "model": _stored(model_state, renames),
        "optimizer": _stored(optimizer_state, renames),
    }
    problem: Exception | None = None
    try:
        _check_keys(directory, state)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it before the collective load
        problem = exc
    agree(problem, what="load_state")
    # NOTE: tensors are loaded in place; other values (step, hyperparameters) replace the entries.
    try:
        dcp.load(state, storage_reader=_MetadataReader(directory))
    except CheckpointException as exc:  # NOTE: a BaseException, holding every rank's traceback
        raise _load_failure(exc, directory) from None
    for loaded, original in ((state["model"], model_state), (state["optimizer"], optimizer_state)):
        for key in original:
            original[key] = loaded[renames.get(key, key)]
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=_OPTIONS)
    if not record["optimizer_stepped"]:
        optimizer.state.clear()
    return int(record["step"])
