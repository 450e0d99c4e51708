"""Where a pipeline step's time goes: each rank's compute actions timed inside the schedule.

    python -m benchmarks.timeline --out benchmarks/results/timeline.json

The issue's peer shape (section 12 of docs/benchmarks.md): the ``small`` Llama, sequences of
128, 4 microbatches of 1, pp=2, fp32, AdamW, two gloo ranks of one torch thread each, the plan's
split. Every forward, backward (full, input or weight gradient) and loss the schedule runs is
timed where torch's schedule calls it (the stage's ``forward_one_chunk``, ``backward_one_chunk``,
``backward_weight_one_chunk`` and the schedule's ``_maybe_compute_loss``); a step is
``Pipeline.step``, then ``optimizer.step()`` and ``zero_grad``, timed separately.

Each step is then replayed (:func:`ppzoo.simulate.rank_finish`): the schedule's own action order,
each action taking exactly the time it took in that step (a stage's loss counted with its
forward), communication free, each rank's optimizer step after its last action. That replay is
the step a runtime with no cost of its own would take on these stages, so

    of_ideal = ideal / step = granularity × balance × runtime

with **ideal** = the single-process whole-batch step × the schedule's ideal (section 2),
**granularity** = whole-batch over microbatch-accumulated single-process step (what microbatches
of 1 cost, pipeline or not), **balance** = the accumulated step's ideal over the replay (what the
split's stages, the optimizer after the last backward and the stage boundaries cost), and
**runtime** = replay over measured step (what ppzoo's runtime and torch's schedule add: sends and
receives, waits, the agreement exchange, Python). Rank 0 runs both single-process steps each
round, before the pipeline's, while rank 1 waits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PressureMonitor, command_line, llama_config, machine, table, write_json
from benchmarks.step import CASES, _batch, _Single, _stages_per_rank, case_pipeline, ideal_efficiency
from ppzoo.testing.synthetic import generate_checkpoint

SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble")


def _timed(events: list, owner: Any, method: str, what) -> None:
    """Replace ``owner.method`` (on the instance) by a version appending ``(action, start, end)`` to ``events``."""
    inner = getattr(owner, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        events.append((what(args, kwargs), start, time.perf_counter()))
        return result

    setattr(owner, method, timed)


def _instrument(runtime: Any, events: list) -> None:
    stages = getattr(runtime, "_stages", None) or [runtime._stage]
    for stage in stages:
        s = stage.stage_index
        _timed(events, stage, "forward_one_chunk", lambda a, k, s=s: (s, "F", a[0]))
        _timed(
            events,
            stage,
            "backward_one_chunk",
            lambda a, k, s=s: (s, "B" if k.get("full_backward", True) else "I", a[0]),
        )
        _timed(events, stage, "backward_weight_one_chunk", lambda a, k, s=s: (s, "W", a[0]))
    _timed(events, runtime, "_maybe_compute_loss", lambda a, k: (a[0].stage_index, "L", a[3]))


def _measure(
    rank: int,
    world: int,
    directory: str,
    case: dict[str, Any],
    schedules: list[str],
    steps: int,
    warmup: int,
    fused: bool,
):
    import torch
    import torch.distributed as dist

    fused = fused or None  # NOTE: None is torch's default (a loop of element-wise ops on a CPU)
    single = _Single(directory, case, fused=fused) if rank == 0 else None
    out: dict[str, Any] = {"load": [os.getloadavg()], "schedules": {}}
    for schedule in schedules:
        pipe = case_pipeline(directory, world, schedule, case)
        optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-5, fused=fused)
        ids, labels = _batch(pipe.config.vocab_size, case)
        events: list = []
        _instrument(pipe._runtime(case["microbatch_size"], case["seq_len"], train=True), events)
        record: dict[str, Any] = {
            "split": {s.ppzoo_stage.index: len(s.ppzoo_stage.layers) for s in pipe.stages},
            "whole": [],
            "accumulated": [],
            "steps": [],
        }
        for i in range(warmup + steps):
            dist.barrier()
            whole = single.step(accumulate=False) if single is not None else 0.0
            accumulated = single.step(accumulate=True) if single is not None else 0.0
            events.clear()
            dist.barrier()
            start = time.perf_counter()
            loss = pipe.step(ids, labels=labels)
            called = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            value = float(loss)
            if i >= warmup:
                record["whole"].append(whole)
                record["accumulated"].append(accumulated)
                record["steps"].append(
                    {
                        "step_call": called - start,
                        "optimizer": end - called,
                        "end": end - start,
                        "loss": value,
                        "actions": [(list(action), a - start, b - start) for action, a, b in events],
                    }
                )
        out["schedules"][schedule] = record
        del pipe, optimizer
    out["load"].append(os.getloadavg())
    return out


def _replay(schedule: str, pp: int, m: int, per_rank: list[dict[str, Any]]) -> float:
    """The step a cost-free runtime would take: this step's measured actions in the schedule's order."""
    from ppzoo import simulate

    v = _stages_per_rank(schedule)
    took: dict[tuple, float] = {}
    for step in per_rank:
        for (stage, kind, mb), a, b in step["actions"]:
            key = (stage, "F" if kind == "L" else kind, mb)  # NOTE: a stage's loss counts with its forward
            took[key] = took.get(key, 0.0) + b - a
    order = simulate.schedule_order(schedule, pp=pp, microbatches=m, stages_per_rank=v)
    finish = simulate.rank_finish(order, lambda action: took[action], pp * v)
    return max(finish[r] + per_rank[r]["optimizer"] for r in range(pp))


def summarize(ranks: list[dict[str, Any]], schedule: str, pp: int, m: int) -> dict[str, Any]:
    records = [r["schedules"][schedule] for r in ranks]
    steps = len(records[0]["steps"])
    ideal_share = 1 / (pp * ideal_efficiency(schedule, pp, m))
    whole = statistics.median(records[0]["whole"])
    accumulated = statistics.median(records[0]["accumulated"])
    measured = [max(rec["steps"][i]["end"] for rec in records) for i in range(steps)]
    replayed = [_replay(schedule, pp, m, [rec["steps"][i] for rec in records]) for i in range(steps)]
    step, replay = statistics.median(measured), statistics.median(replayed)
    ideal, ideal_accumulated = whole * ideal_share, accumulated * ideal_share
    per_rank = []
    for rank, rec in enumerate(records):
        kinds: dict[str, list[float]] = {}
        for s in rec["steps"]:
            sums: dict[str, float] = {}
            for (_stage, kind, _mb), a, b in s["actions"]:
                sums[kind] = sums.get(kind, 0.0) + b - a
            sums["optimizer"] = s["optimizer"]
            sums["other"] = s["step_call"] - sum(v for k, v in sums.items() if k != "optimizer")
            for k, v in sums.items():
                kinds.setdefault(k, []).append(v)
        per_rank.append({k: 1000 * statistics.median(v) for k, v in kinds.items()} | {"rank": rank})
    return {
        "schedule": schedule,
        "layers per stage": [n for _, n in sorted((int(i), n) for rec in records for i, n in rec["split"].items())],
        "single whole, s": whole,
        "single accumulated, s": accumulated,
        "ideal, s": ideal,
        "step, s": step,
        "spread, s": f"{min(measured):.3f}-{max(measured):.3f}",
        "replay, s": replay,
        "of ideal": ideal / step,
        "granularity": whole / accumulated,
        "balance": ideal_accumulated / replay,
        "runtime": replay / step,
        "runtime, paired": statistics.median(r / s for r, s in zip(replayed, measured)),
        "per rank, ms": per_rank,
        "losses": [s["loss"] for s in records[0]["steps"]],
        "steps_s": measured,
        "replays_s": replayed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="small", choices=list(CASES))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each schedule (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--fused-adamw", action="store_true", help="AdamW's fused kernel on both sides (as `ppzoo train` uses it)"
    )
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from ppzoo.testing.distributed import run_distributed

    case = CASES[args.case]
    directory = generate_checkpoint(
        args.root / f"llama-{case['shape']}-f32", llama_config(case["shape"], dtype="float32"), dtype="float32"
    )
    pp, m = 2, case["microbatches"]
    with PressureMonitor() as pressure:
        ranks = run_distributed(
            _measure,
            pp,
            str(directory),
            case,
            args.schedules,
            args.steps,
            args.warmup,
            args.fused_adamw,
            timeout_s=3600.0,
        )
    rows = [summarize(ranks, schedule, pp, m) for schedule in args.schedules]
    load = [ranks[0]["load"][0], ranks[0]["load"][-1]]
    print(
        f"{args.case}, pp={pp}, {m} microbatches, AdamW {'fused' if args.fused_adamw else 'for-loop'}; load average {load[0][0]:.2f} -> {load[1][0]:.2f}; "
        f"CPU pressure {pressure.summary()}"
    )
    columns = [
        "schedule",
        "layers per stage",
        "ideal, s",
        "step, s",
        "spread, s",
        "replay, s",
        "of ideal",
        "granularity",
        "balance",
        "runtime",
        "runtime, paired",
    ]
    print(table(rows, columns))
    for row in rows:
        for rank in row["per rank, ms"]:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in rank.items() if k != "rank")
            print(f"{row['schedule']} rank {rank['rank']}, ms a step: {parts}")
    write_json(
        args.out,
        {
            "command": command_line("benchmarks.timeline"),
            "case": args.case,
            "fused_adamw": args.fused_adamw,
            "machine": machine(),
            "load": load,
            "pressure": pressure.summary(),
            "rows": rows,
            "raw": ranks,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
