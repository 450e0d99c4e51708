"""Wall time of ``ppzoo plan`` end to end, cold and answered from its cache (docs/benchmarks.md §4).

Each run is a fresh ``python -m ppzoo.cli plan ...`` process, so imports count. *cold* runs with
an empty cache directory (``PPZOO_CACHE_DIR``), *cached* with one the same command has filled.
Runs alternate between the modes and between source trees (``--trees``: directories holding a
``ppzoo`` package, e.g. a copy of an earlier commit; default the repository), round by round, so
that a change in the machine's load touches all alike. Every run's output must equal the first.

    python -m benchmarks.plan_time --dir /tmp/ppzoo-bench/deepseek-v3 --pp 30 --schedule Interleaved1F1B
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tree: Path, argv: list[str], cache: str) -> tuple[float, str]:
    env = dict(os.environ, PPZOO_CACHE_DIR=cache)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ppzoo.cli", "plan", *argv], cwd=tree, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ppzoo plan failed in {tree} ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a directory holding config.json")
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trees", nargs="+", default=[str(ROOT)], help="directories holding a ppzoo package")
    parser.add_argument("--modes", nargs="+", default=["cold", "cached"], choices=["cold", "cached"])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    command = [args.dir, "--pp", str(args.pp), "--schedule", args.schedule]
    trees = [Path(t).resolve() for t in args.trees]
    warm = {t: tempfile.mkdtemp(prefix="ppzoo-plan-cached-") for t in trees}
    reference = None
    for t in trees:  # NOTE: fills each tree's cache; its output is the reference the runs must equal
        _, out = _run(t, command, warm[t])
        reference = out if reference is None else reference
        if out != reference:
            raise SystemExit(f"{t} plans differently from {trees[0]}")
    times: dict[tuple[str, str], list[float]] = {}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for t in trees:
            for mode in args.modes:
                if mode == "cached" and not (t / "ppzoo" / "plan_cache.py").exists():
                    continue  # NOTE: a tree from before the cache has no cached mode
                cache = warm[t] if mode == "cached" else tempfile.mkdtemp(prefix="ppzoo-plan-cold-")
                seconds, out = _run(t, command, cache)
                if out != reference:
                    raise SystemExit(f"{t} ({mode}) printed a different plan")
                times.setdefault((str(t), mode), []).append(seconds)
    load.append(os.getloadavg())
    print(f"ppzoo plan {' '.join(command)}; load average {load[0][0]:.2f} -> {load[1][0]:.2f}")
    print(f"{'tree':<40} {'mode':<7} {'median s':>9} {'spread s':>14}")
    rows = []
    for (tree, mode), ts in times.items():
        print(f"{tree:<40} {mode:<7} {statistics.median(ts):>9.2f} {min(ts):>6.2f}-{max(ts):<6.2f}")
        rows.append({"tree": tree, "mode": mode, "seconds": ts, "median": statistics.median(ts)})
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "load": load, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
