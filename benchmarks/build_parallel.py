"""Build memory of sharded stages: each rank's peak-RSS rise against the bytes it keeps.

    python -m benchmarks.build_parallel --dir /tmp/ppzoo-bench/llama-1b --out benchmarks/results/build-parallel.json

Two gloo ranks on CPU build the whole model as one stage (pp=1) sharded two ways: FSDP2
(``dp_shard=2``) and tensor parallel (``tp=2``). A rank reads only the slices it keeps
(``ppzoo/checkpoint/reading.py``), so its peak-RSS rise should be close to its own bytes, not the stage's.
One group per case, so each rank's peak is its own build's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

CASES = {"dp_shard=2": {"dp_shard": 2}, "tp=2": {"tp": 2}}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank(rank: int, world_size: int, directory: str, degrees: dict) -> dict:
    import gc
    import time

    import torch
    import torch.distributed.fsdp  # noqa: F401 - imports count in the baseline, not in the build
    import torch.distributed.tensor.parallel  # noqa: F401

    import ppzoo

    ppzoo.plan(directory, pp=1)  # imports the modeling code
    gc.collect()
    baseline = _peak_rss()
    started = time.perf_counter()
    pipe = ppzoo.pipeline(
        directory, pp=1, schedule="GPipe", microbatches=1, device="cpu", dtype=torch.bfloat16, **degrees
    )
    seconds = time.perf_counter() - started
    held = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for _, p in pipe.named_parameters()
    )
    return {"rank": rank, "ready_s": round(seconds, 2), "held_bytes": held, "rss_rise": _peak_rss() - baseline}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import llama_config
    from ppzoo.testing.distributed import run_distributed
    from ppzoo.testing.synthetic import generate_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ppzoo-bench/llama-1b"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.dir / "config.json").is_file():
        generate_checkpoint(args.dir, llama_config("1b"), dtype="bfloat16")
    rows = []
    for label, degrees in CASES.items():
        for result in run_distributed(_rank, 2, str(args.dir), degrees, timeout_s=900):
            rows.append(
                {"case": label, **result, "rise_over_held": round(result["rss_rise"] / result["held_bytes"], 2)}
            )
    print(f"{'case':<11} {'rank':>4} {'ready, s':>8} {'held, MiB':>10} {'RSS rise, MiB':>14} {'rise/held':>9}")
    for r in rows:
        print(
            f"{r['case']:<11} {r['rank']:>4} {r['ready_s']:>8} {r['held_bytes'] / 2**20:>10.0f} "
            f"{r['rss_rise'] / 2**20:>14.0f} {r['rise_over_held']:>9}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "build_parallel", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
