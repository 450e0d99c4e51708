"""The 5D DeviceMesh ``(pp, dp_replicate, dp_shard, cp, tp)`` and process-group set-up: timeout, clean exit."""

from __future__ import annotations

import atexit
import datetime
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = [
    "DEFAULT_TIMEOUT",
    "DIMS",
    "Degrees",
    "build_mesh",
    "default_device",
    "group_timeout",
    "init_distributed",
    "parse_timeout",
]

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
#: the process-group timeout ppzoo sets when it initialises the group and none is given
DEFAULT_TIMEOUT = datetime.timedelta(seconds=600)


@dataclass(frozen=True)
class Degrees:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DIMS)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def parse_timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    """``timeout`` (seconds or a ``timedelta``) as a positive ``timedelta``; None stays None.

    Raises:
        ValueError: ``timeout`` is not a positive number of seconds or ``timedelta``.
    """
    if timeout is None or isinstance(timeout, datetime.timedelta):
        value = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout):
        value = datetime.timedelta(seconds=timeout)
    else:
        value = None
    if timeout is not None and (value is None or value.total_seconds() <= 0):
        raise ValueError(
            f"timeout must be a positive number of seconds or a datetime.timedelta, got {timeout!r}: "
            "it is how long a rank waits for the others before it fails"
        )
    return value


def init_distributed(device: torch.device, *, timeout: datetime.timedelta | None = None) -> None:
    """Initialise the default process group from the torchrun environment when none exists.

    With a group initialised already, a given ``timeout`` replaces that group's timeout.

    Raises:
        RuntimeError: no process group and no torchrun environment (``RANK``, ``WORLD_SIZE``).
    """
    if dist.is_initialized():
        if timeout is not None:
            _set_timeout(None, timeout)
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "ppzoo.pipeline needs a process group: launch with torchrun "
            "(e.g. `torchrun --nproc-per-node 2 train.py`) or call torch.distributed.init_process_group first"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timeout or DEFAULT_TIMEOUT)
    # NOTE: a group still alive when the interpreter shuts down is torn down with it, its C++
    # threads and store connections among modules half gone, which can end a finished run with
    # "terminate called without an active exception"; ppzoo made the group, so ppzoo ends it first.
    atexit.register(_destroy_at_exit)


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the process is ending; nothing to report to
            pass
    # NOTE: stages and schedules hold their groups in reference cycles; collected here, the
    # groups' C++ threads are joined while the interpreter is whole, not during its teardown.
    gc.collect()


def _set_timeout(group: dist.ProcessGroup | None, timeout: datetime.timedelta) -> None:
    # NOTE: torch has no public way to change a group's timeout once made; without this, the
    # mesh's own groups would keep torch's default for new groups (30 minutes on gloo).
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        raise RuntimeError(
            f"this torch cannot change the timeout of a process group once made, so timeout={timeout} cannot "
            "be applied; pass it to torch.distributed.init_process_group instead"
        )
    setter(timeout, group)


def group_timeout(group: dist.ProcessGroup | None = None) -> datetime.timedelta | None:
    """The timeout of ``group`` (default: the default group), or None where torch does not say."""
    group = group or dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def build_mesh(degrees: Degrees, device: torch.device, *, timeout: datetime.timedelta | None = None) -> DeviceMesh:
    """The 5D mesh over all ranks; its groups wait ``timeout`` (default: the default group's timeout).

    Raises:
        ValueError: the degrees' product is not the world size, or a degree is < 1.
    """
    for dim in DIMS:
        value = getattr(degrees, dim)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{dim} must be an integer >= 1, got {value!r}")
    world = dist.get_world_size()
    if degrees.world_size != world:
        detail = " × ".join(f"{d}={getattr(degrees, d)}" for d in DIMS)
        raise ValueError(
            f"{detail} = {degrees.world_size} processes, but the world size is {world}; "
            "launch that many processes or change the degrees"
        )
    mesh = init_device_mesh(device.type, degrees.as_tuple(), mesh_dim_names=DIMS)
    timeout = timeout or group_timeout()
    if timeout is not None:
        for dim in DIMS:
            _set_timeout(mesh[dim].get_group(), timeout)
    return mesh
