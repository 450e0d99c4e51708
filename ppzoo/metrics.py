"""Training metrics: throughput, model FLOPs utilisation, peak memory, and where they are written.

MFU is the model FLOPs a step needs (forward + backward = 3 × the plan's forward FLOPs per token,
:mod:`ppzoo.cost`; recomputation by activation checkpointing is not counted) per second, over the
peak of all devices. The peak comes from ``--peak-tflops`` or, on GPUs ppzoo knows, from
:data:`PEAK_TFLOPS`; with neither, MFU is left out.

A :class:`MetricsWriter` writes each record as a JSON line, and to TensorBoard when the
``tensorboard`` package is installed and a directory is given.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PEAK_TFLOPS",
    "MetricsWriter",
    "device_peak_tflops",
    "format_metrics",
    "mfu",
    "peak_memory_bytes",
    "train_flops_per_token",
]

#: dense bf16 tensor-core peak TFLOP/s per device, by a fragment of ``torch.cuda.get_device_name``
#: (first match wins: longer names first)
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
    "MI300X": 1307.0,
}


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of ``device`` from :data:`PEAK_TFLOPS`; None for a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for fragment, tflops in PEAK_TFLOPS.items() if fragment in name), None)


def train_flops_per_token(plan: Any) -> float:
    """Model FLOPs of a training step per token: forward and backward (2 × forward) of every stage."""
    return 3.0 * sum(stage.cost for stage in plan.stages)


def mfu(tokens_per_s: float, flops_per_token: float, *, peak_tflops: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved over the peak of ``devices``; None without a peak."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * devices)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: allocated on its GPU, or its resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # NOTE: Linux reports kilobytes, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _number(value: float, digits: int = 4) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 1e-3 else f"{value:.{digits}f}"


def format_metrics(record: dict[str, Any], *, steps: int) -> str:
    """One progress line of a training record (the keys :class:`MetricsWriter` writes)."""
    parts = [f"step {record['step']:>{len(str(steps))}}/{steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval loss {record['eval_loss']:.4f} ppl {record['eval_perplexity']:.2f}")
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm {record['grad_norm']:.3f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.3g}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if "peak_memory_bytes" in record:
        parts.append(f"peak mem {max(record['peak_memory_bytes']) / 2**30:.2f} GiB")
    if "eta_s" in record:
        parts.append(f"{record['eta_s']:.0f}s left")
    return "  ".join(parts)


class MetricsWriter:
    """Writes metric records as JSON lines, and to TensorBoard when installed.

    Args:
        path: the JSONL file (appended to: a resumed run continues it), or None.
        tensorboard: a TensorBoard log directory, or None; ignored when ``tensorboard`` is not installed.
    """

    def __init__(self, path: str | os.PathLike | None, *, tensorboard: str | os.PathLike | None = None):
        self._file = None
        self._board = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._board = SummaryWriter(str(tensorboard))

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (``step`` plus numbers; a list is written as its maximum to TensorBoard)."""
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._board is not None:
            for key, value in record.items():
                if key == "step" or value is None:
                    continue
                scalar = max(value) if isinstance(value, list) else value
                self._board.add_scalar(key, scalar, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()
