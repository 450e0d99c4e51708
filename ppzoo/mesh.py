"""The 5D DeviceMesh ``(pp, dp_replicate, dp_shard, cp, tp)`` and process-group set-up."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["DIMS", "Degrees", "build_mesh", "init_distributed", "default_device"]

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


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


def init_distributed(device: torch.device, *, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from the torchrun environment when none exists.

    Raises:
        RuntimeError: no process group and no torchrun environment (``RANK``, ``WORLD_SIZE``).
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "ppzoo.pipeline needs a process group: launch with torchrun "
            "(e.g. `torchrun --nproc-per-node 2 train.py`) or call torch.distributed.init_process_group first"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def build_mesh(degrees: Degrees, device: torch.device) -> DeviceMesh:
    """The 5D mesh over all ranks.

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
    return init_device_mesh(device.type, degrees.as_tuple(), mesh_dim_names=DIMS)
