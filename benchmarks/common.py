"""What the benchmarks share: model shapes, machine facts, tables, JSON.

Checkpoints are generated from a config by :func:`ppzoo.testing.synthetic.generate_checkpoint`,
tensor by tensor, straight into sharded safetensors with an index: at most one shard is ever in
memory, so generating a 1 B model is cheap and the benchmarks never download weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SHAPES",
    "llama_config",
    "float32_checkpoint",
    "machine",
    "peak_rss_bytes",
    "current_rss_bytes",
    "cpu_pressure",
    "PressureMonitor",
    "evict_page_cache",
    "table",
    "write_json",
    "median_time",
    "human_bytes",
    "command_line",
]

#: Llama-style shapes the benchmarks use, by name
SHAPES: dict[str, dict[str, int]] = {
    # ~0.84 B parameters: 1.67 GB in bf16 (TinyLlama-like widths, 16 layers)
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # the step benchmark's small shape: its 32k-vocab head costs as much as several layers
    "small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # a wider shape whose layers, not the head, dominate
    "medium": dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    # end-to-end runs of the GPU check on CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


def llama_config(shape: str | dict[str, int], *, dtype: str = "bfloat16", max_position_embeddings: int = 4096) -> Any:
    """A ``LlamaConfig`` for a shape name in :data:`SHAPES` (or a dict of its fields), untied head."""
    from transformers import LlamaConfig

    fields = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    config = LlamaConfig(
        **fields,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.dtype = dtype
    return config


def evict_page_cache(paths: Iterable[str | os.PathLike]) -> None:
    """Drop the files' clean pages from the page cache (no root needed), so the next read is cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # NOTE: dirty pages cannot be dropped; a freshly written file has some
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``ru_maxrss`` is in KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes() -> dict[str, int]:
    """Current RSS and its parts (anonymous, file-backed) from ``/proc/self/status``, in bytes."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) * 1024
    return out


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and the load average when called."""
    import safetensors
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    pressure = cpu_pressure()
    if pressure is not None:
        info["cpu_pressure_avg10"] = pressure
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            first = f.readline().split()
    except OSError:
        return None
    fields = dict(item.split("=") for item in first[1:])
    return float(fields["avg10"]) / 100


class PressureMonitor:
    """Samples :func:`cpu_pressure` in a thread while a benchmark runs: others' load, as seen here.

    Two busy ranks on two cores make no pressure by themselves; a third runnable task does.
    """

    def __init__(self, interval_s: float = 5.0):
        import threading

        self.samples: list[float] = []
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            value = cpu_pressure()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> PressureMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"mean": None, "max": None}
        return {"mean": round(statistics.mean(self.samples), 3), "max": round(max(self.samples), 3)}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, floats: str = "{:.3f}") -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns, right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return floats.format(value)
        return "-" if value is None else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def command_line(module: str) -> str:
    """How this run was started, as one types it: ``python -m <module> <its arguments>``."""
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` (parents created); nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def median_time(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 1, sync: Callable[[], Any] | None = None
) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones, and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# -- single-process paired benchmarks (overhead, backward_split) ---------------------------------
def paired_parser(description: str, cases: Sequence[str], pairs: str) -> argparse.ArgumentParser:
    """The options of a one-process benchmark that alternates two things call by call."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", nargs="+", default=list(cases), choices=list(cases))
    parser.add_argument("--pairs", type=int, default=20, help=f"timed {pairs} pairs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"), help="where checkpoints are generated")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser


def start_single_process(threads: int) -> dict[str, Any]:
    """Quiet Hugging Face's progress bars, set torch's threads; the machine's description."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    return machine()


def float32_checkpoint(root: Path, shape: str) -> Path:
    """The generated fp32 checkpoint of a named shape under ``root`` (made on first use)."""
    from ppzoo.testing.synthetic import generate_checkpoint

    return generate_checkpoint(root / f"llama-{shape}-f32", llama_config(shape, dtype="float32"), dtype="float32")
