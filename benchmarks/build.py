"""Build benchmark: time and memory to a ready stage, ppzoo's path against the naive one.

    python -m benchmarks.build --out benchmarks/results/build.json

For pp in {1, 2, 4} and every rank, a fresh process measures its baseline RSS after imports, then
builds its stage and reports the wall time to a ready stage and the rise of peak RSS
(``ru_maxrss``) over the baseline, next to the stage's parameter bytes. Ranks run one after
another, each in its own process, so that on a small machine one measurement never competes with
another (a real launch runs them concurrently, one per device).

Paths:
  ppzoo   ``build_stage`` as it is: meta build, prune, materialise, read only this stage's tensors.
  mmap    the same with the loader ppzoo had before: shards opened with safetensors' default
          ``mmap`` backend and every tensor read whole, then copied (``get_tensor`` + ``copy_``).
          Kept to show what reading through the mapping costs (docs/benchmarks.md).
  naive   ``AutoModelForCausalLM.from_pretrained`` of the whole model, then pruned to the stage.

A sampler thread also records the peak of the anonymous and file-backed parts of RSS, which tells
page-cache pages mapped by safetensors apart from tensors the process allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import (
    command_line,
    current_rss_bytes,
    evict_page_cache,
    human_bytes,
    llama_config,
    machine,
    peak_rss_bytes,
    table,
    write_json,
)
from ppzoo.testing.synthetic import checkpoint_files, generate_checkpoint

PATHS = ("ppzoo", "mmap", "naive")
#: the directory that holds the ``benchmarks`` package
_ROOT = Path(__file__).resolve().parent.parent


class _RssSampler:
    """Peak anonymous and file-backed RSS, sampled every few milliseconds in a thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in current_rss_bytes().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def touch_parameters(model) -> None:
    """Write one element of every page of every parameter, as the first optimizer step would.

    transformers 5's ``from_pretrained`` (in the checkpoint's own dtype, on CPU) leaves parameters
    as private mmaps of the shard files: nothing is resident until read, and a write copies the
    page. Touching makes every path's stage resident and writable, so the paths compare alike.
    """
    import torch

    with torch.no_grad():
        for param in model.parameters():
            flat = param.data.view(-1)
            flat[:: max(1, 4096 // flat.element_size())].add_(0)


def measure_rank(directory: str, path: str, pp: int, rank: int, dtype: str) -> dict:
    """Build rank ``rank``'s stage of a ``pp``-stage 1F1B plan in this process; time and RSS rise.

    ``dtype`` is the stage's parameter dtype; it may differ from the checkpoint's (a cast).
    """
    import torch
    from transformers import AutoModelForCausalLM  # noqa: F401 - imported before the baseline
    from transformers.models.llama import modeling_llama  # noqa: F401

    import ppzoo
    import ppzoo.checkpoint.reading as reading
    from ppzoo import registry
    from ppzoo.checkpoint import Checkpoint
    from ppzoo.config import load_config
    from ppzoo.stage import build_stage, prune

    torch.set_num_threads(1)
    torch_dtype = getattr(torch, dtype)
    if path == "mmap":
        from safetensors import safe_open

        if not hasattr(reading, "_open"):
            raise RuntimeError("ppzoo.checkpoint.reading has no _open: the mmap path needs updating to the new loader")
        read = reading.Reader.read

        def whole_then_copy(reader, key, part=None, *, into=None):
            value = read(reader, key, part)
            if into is None:
                return value
            with torch.no_grad():
                into.copy_(value)
            return into

        # NOTE: the loader before it read through pread, in place: mapped shards, whole-tensor reads.
        reading._open = lambda file, device: safe_open(file, framework="pt", device=device)
        reading.Reader.read = whole_then_copy
    gc.collect()
    baseline = peak_rss_bytes()
    baseline_parts = current_rss_bytes()
    with _RssSampler() as sampler:
        start = time.perf_counter()
        config = load_config(directory)
        adapter = registry.adapter_for(config)
        plan = ppzoo.plan(config, pp=pp, dtype=torch_dtype)
        if path == "naive":
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
            prune(model, plan.layout, plan.stages[rank])
            adapter.patch_inner_forward(model.get_submodule(adapter.inner_name))
            adapter.patch_causal_lm_forward(model)
            gc.collect()
        else:
            model = build_stage(config, adapter, plan, rank, checkpoint=Checkpoint(directory), dtype=torch_dtype)
        built = time.perf_counter() - start
        built_rise = peak_rss_bytes() - baseline
        touch_parameters(model)
        seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    stage_bytes = plan.stages[rank].bytes
    assert held == stage_bytes, f"stage holds {held} bytes of parameters, plan says {stage_bytes}"
    return {
        "path": path,
        "pp": pp,
        "rank": rank,
        "seconds": seconds,
        "built_seconds": built,
        "built_rss_rise": built_rise,
        "stage_bytes": stage_bytes,
        "baseline_rss": baseline,
        "rss_rise": peak - baseline,
        "rise_over_stage": (peak - baseline) / stage_bytes,
        "peak_anon_rise": sampler.peak.get("anon", 0) - baseline_parts.get("anon", 0),
        "peak_file_rise": sampler.peak.get("file", 0) - baseline_parts.get("file", 0),
        "after_rss": current_rss_bytes(),
    }


def _run_child(args: argparse.Namespace, path: str, pp: int, rank: int) -> dict:
    if args.cold:
        evict_page_cache(checkpoint_files(args.dir))
    cmd = [
        sys.executable,
        "-m",
        __spec__.name,
        "--child",
        path,
        str(pp),
        str(rank),
        "--dir",
        str(args.dir),
        "--dtype",
        args.stage_dtype or args.dtype,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    # NOTE: run from the directory that holds the benchmarks package, as ``python -m`` needs
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} pp={pp} rank={rank} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path("/tmp/ppzoo-bench/llama-1b"), help="checkpoint directory (generated if absent)"
    )
    parser.add_argument("--shape", default="1b", help="shape in benchmarks.common.SHAPES")
    parser.add_argument("--dtype", default="bfloat16", help="the checkpoint's dtype")
    parser.add_argument("--stage-dtype", default=None, help="the stages' parameter dtype (default: the checkpoint's)")
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--repeats", type=int, default=1, help="runs per rank; the median time is reported")
    parser.add_argument("--cold", action="store_true", help="drop the shards from the page cache before each rank")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "PP", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        path, pp, rank = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(measure_rank(str(args.dir), path, pp, rank, args.dtype)))
        return 0

    started = time.perf_counter()
    generate_checkpoint(args.dir, llama_config(args.shape, dtype=args.dtype), dtype=args.dtype)
    print(f"checkpoint {args.dir} ready in {time.perf_counter() - started:.1f}s (reused when present)")
    info = machine()
    rows = []
    for path in args.paths:
        for pp in args.pp:
            for rank in range(pp):
                runs = [_run_child(args, path, pp, rank) for _ in range(args.repeats)]
                row = dict(runs[0])
                row["seconds"] = statistics.median(r["seconds"] for r in runs)
                row["all_seconds"] = [r["seconds"] for r in runs]
                rows.append(row)
                print(
                    f"  {path:<6} pp={pp} rank={rank}: ready in {row['seconds']:.2f}s, RSS +{human_bytes(row['rss_rise'])} "
                    f"= {row['rise_over_stage']:.2f} x stage",
                    flush=True,
                )
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    shown = [
        {
            "path": r["path"],
            "pp": r["pp"],
            "rank": r["rank"],
            "built_s": r["built_seconds"],
            "ready_s": r["seconds"],
            "stage": human_bytes(r["stage_bytes"]),
            "rise_built": human_bytes(r["built_rss_rise"]),
            "rss_rise": human_bytes(r["rss_rise"]),
            "rise/stage": r["rise_over_stage"],
            "anon_rise": human_bytes(r["peak_anon_rise"]),
            "file_rise": human_bytes(r["peak_file_rise"]),
        }
        for r in rows
    ]
    print()
    print(
        table(
            shown,
            [
                "path",
                "pp",
                "rank",
                "built_s",
                "ready_s",
                "stage",
                "rise_built",
                "rss_rise",
                "rise/stage",
                "anon_rise",
                "file_rise",
            ],
            floats="{:.2f}",
        )
    )
    summary = []
    for path in args.paths:
        base = [r["seconds"] for r in rows if r["path"] == path and r["pp"] == min(args.pp)]
        for pp in args.pp:
            mine = [r for r in rows if r["path"] == path and r["pp"] == pp]
            summary.append(
                {
                    "path": path,
                    "pp": pp,
                    "max_time_s": max(r["seconds"] for r in mine),
                    "speedup": max(base) / max(r["seconds"] for r in mine),
                    "max_rise/stage": max(r["rise_over_stage"] for r in mine),
                }
            )
    print()
    print(table(summary, ["path", "pp", "max_time_s", "speedup", "max_rise/stage"], floats="{:.2f}"))
    print(f"load average before {info['load_avg']}, after {info['load_avg_after']}")
    write_json(
        args.out,
        {
            "benchmark": "build",
            "machine": info,
            "command": command_line(__spec__.name),
            "checkpoint": str(args.dir),
            "shape": args.shape,
            "dtype": args.dtype,
            "stage_dtype": args.stage_dtype or args.dtype,
            "cold_page_cache": args.cold,
            "ranks_run": "one after another, each in a fresh process",
            "rows": rows,
            "summary": summary,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
