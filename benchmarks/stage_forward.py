"""The stage forward's own per-microbatch work: with and without the dropout streams and the rebuilt masks and RoPE.

    python -m benchmarks.stage_forward --steps 16 --out benchmarks/results/stage-forward.json

The issue's peer shape (section 12 of docs/benchmarks.md): the ``small`` Llama, sequences of
128, 4 microbatches of 1, pp=2, 1F1B, fp32, AdamW, two gloo ranks of one torch thread each, no
dropout. Two pipelines are built in one process group from the same checkpoint with the same
split: **now**, as ``ppzoo.pipeline`` builds it (no dropout streams on a model without dropout;
masks, RoPE tables and default positions kept from one microbatch to the next,
:mod:`ppzoo.layer_inputs`), and **before**, the same pipeline with the streams installed on
every stage (``key_dropout``) and nothing kept (``LayerInputs.reuse = False``): what every stage
forward did before. Each round is a single-process step of the unsplit model (rank 0 runs it
while rank 1 waits), then one step of each pipeline, their order swapping every round.

A step is forward, backward, ``optimizer.step()`` and ``zero_grad``; a pipeline's is its slower
rank's. **ideal** = median single-process step × (m + pp − 1) / (pp · m) (section 12). ``CPU s``
is each rank's CPU time a step (median). After the timed rounds, one step of each pipeline runs
under cProfile on both ranks: Python calls per microbatch (the busier rank's), and the time in
the dropout hooks and in masks + RoPE (cumulative, so load-dependent: their order of magnitude).

    python -m benchmarks.stage_forward --paired-stage 200 --out benchmarks/results/stage-forward-paired.json

resolves what one microbatch saves where the steps cannot: the first stage of the split alone
(embedding and the 8 layers), in one process with one thread, one microbatch's forward and
backward, the two sides alternating call by call; the median of the paired differences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PressureMonitor, llama_config, machine, write_json
from benchmarks.step import CASES, _batch, _Single, case_pipeline, ideal_efficiency
from ppzoo.testing.synthetic import generate_checkpoint

SIDES = ("now", "before")


def _as_before(pipe: Any) -> None:
    """Make ``pipe``'s stages do what every stage forward did before: streams on, nothing kept."""
    from ppzoo import layer_inputs
    from ppzoo.dropout import key_dropout

    for stage in pipe.stages:
        key_dropout(stage, pipe.plan.layout, stage.ppzoo_stage.layers)
        layer_inputs.of(stage.get_submodule(pipe.adapter.inner_name)).reuse = False


def _profiled(pipe: Any, optimizer: Any, ids: Any, labels: Any) -> dict[str, float]:
    """One step under cProfile: Python calls, ms in the dropout hooks, ms in masks + RoPE."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    float(pipe.step(ids, labels=labels))
    profile.disable()
    optimizer.zero_grad(set_to_none=True)
    stats = pstats.Stats(profile)
    dropout = masks = 0.0
    built = 0
    for (filename, _line, name), (_cc, calls, _tt, cumulative, _callers) in stats.stats.items():
        if filename.endswith(os.path.join("ppzoo", "dropout.py")) and name in ("enter", "leave"):
            dropout += cumulative
        if filename.endswith(os.path.join("ppzoo", "adapter.py")):
            if name in ("masks", "position_embeddings"):
                masks += cumulative
            elif name in ("build", "compute"):  # NOTE: the closures that compute masks and RoPE anew
                built += calls
    return {
        "python_calls": stats.total_calls,
        "dropout_ms": 1000 * dropout,
        "masks_rope_ms": 1000 * masks,
        "masks_rope_computed": built,
    }


def _measure(rank: int, world: int, directory: str, case: dict[str, Any], schedule: str, steps: int, warmup: int):
    import torch
    import torch.distributed as dist

    single = _Single(directory, case) if rank == 0 else None
    pipes, optimizers = {}, {}
    for side in SIDES:
        pipes[side] = case_pipeline(directory, world, schedule, case)
        optimizers[side] = torch.optim.AdamW(pipes[side].parameters(), lr=1e-5)
    _as_before(pipes["before"])
    hooks = {side: sum(bool(m._forward_pre_hooks) for s in p.stages for m in s.modules()) for side, p in pipes.items()}
    ids, labels = _batch(pipes["now"].config.vocab_size, case)
    out: dict[str, Any] = {"single": [], "load": [os.getloadavg()], "hooked_modules": hooks}
    for side in SIDES:
        out[side] = {"step": [], "cpu": [], "loss": []}
    for i in range(warmup + steps):
        dist.barrier()
        single_s = single.step(accumulate=False) if single is not None else 0.0
        timed = {}
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = pipes[side].step(ids, labels=labels)
            optimizers[side].step()
            optimizers[side].zero_grad(set_to_none=True)
            timed[side] = (time.perf_counter() - start, time.process_time() - start_cpu, float(loss))
        if i >= warmup:
            out["single"].append(single_s)
            for side in SIDES:
                for key, value in zip(("step", "cpu", "loss"), timed[side]):
                    out[side][key].append(value)
    out["load"].append(os.getloadavg())
    for side in SIDES:
        dist.barrier()
        out[side]["profile"] = _profiled(pipes[side], optimizers[side], ids, labels)
    return out


def paired_stage(directory: str, case: dict[str, Any], *, pairs: int, warmup: int) -> dict[str, Any]:
    """One process, one thread: the first stage of the plan's split, forward + backward of one
    microbatch, ``now`` and ``before`` alternating call by call (the first of each pair swapping).

    Returns per side the wall and CPU seconds of every call, and the paired differences.
    """
    import torch

    import ppzoo
    from ppzoo import registry
    from ppzoo.checkpoint import Checkpoint
    from ppzoo.config import load_config
    from ppzoo.stage import build_stage

    torch.set_num_threads(1)
    config = load_config(directory)
    adapter = registry.adapter_for(config)
    plan = ppzoo.plan(directory, pp=2, seq_len=case["seq_len"], microbatches=case["microbatches"], dtype=torch.float32)
    stages = {}
    for side in SIDES:
        stages[side] = build_stage(
            config, adapter, plan, 0, checkpoint=Checkpoint(directory), dtype=torch.float32, attn_implementation="sdpa"
        )
        stages[side].train()
    pipe = type("Pipe", (), {"stages": [stages["before"]], "plan": plan, "adapter": adapter})()
    _as_before(pipe)
    ids, _ = _batch(config.vocab_size, case)
    ids = ids[: case["microbatch_size"]]
    out: dict[str, Any] = {side: {"wall": [], "cpu": []} for side in SIDES}
    for i in range(warmup + pairs):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            y = stages[side](ids)
            y.backward(torch.ones_like(y))
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            stages[side].zero_grad(set_to_none=True)
            if i >= warmup:
                out[side]["wall"].append(wall)
                out[side]["cpu"].append(cpu)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="small", choices=list(CASES))
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--steps", type=int, default=16, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--paired-stage",
        type=int,
        default=0,
        metavar="PAIRS",
        help="instead: the first stage alone in one process, one microbatch's forward + backward, PAIRS alternating pairs",
    )
    args = parser.parse_args(argv)

    from ppzoo.testing.distributed import run_distributed

    case = CASES[args.case]
    directory = generate_checkpoint(
        args.root / f"llama-{case['shape']}-f32", llama_config(case["shape"], dtype="float32"), dtype="float32"
    )
    pp, m = 2, case["microbatches"]
    if args.paired_stage:
        load = [os.getloadavg()]
        with PressureMonitor() as pressure:
            times = paired_stage(str(directory), case, pairs=args.paired_stage, warmup=args.warmup)
        load.append(os.getloadavg())
        result = {"case": args.case, "machine": machine(), "load": load, "pressure": pressure.summary(), "rows": {}}
        print(f"first stage alone, one microbatch; load average {load[0][0]:.2f} -> {load[1][0]:.2f}")
        for what in ("wall", "cpu"):
            now, before = times["now"][what], times["before"][what]
            saved = [1000 * (b - a) for a, b in zip(now, before)]
            row = {
                "now_ms": 1000 * statistics.median(now),
                "before_ms": 1000 * statistics.median(before),
                "saved_ms_median": statistics.median(saved),
                "saved_ms_quartiles": statistics.quantiles(saved, n=4),
                "paired_ratio": statistics.median(a / b for a, b in zip(now, before)),
                "now_s": now,
                "before_s": before,
            }
            result["rows"][what] = row
            print(
                f"{what}: now {row['now_ms']:.1f} ms, before {row['before_ms']:.1f} ms (medians); saved a microbatch "
                f"{row['saved_ms_median']:.2f} ms (quartiles {[round(q, 2) for q in row['saved_ms_quartiles']]}), "
                f"paired ratio {row['paired_ratio']:.3f}"
            )
        write_json(args.out, result)
        return 0
    with PressureMonitor() as pressure:
        ranks = run_distributed(
            _measure, pp, str(directory), case, args.schedule, args.steps, args.warmup, timeout_s=3600.0
        )
    single = statistics.median(ranks[0]["single"])
    ideal_step = single / (pp * ideal_efficiency(args.schedule, pp, m))
    rows = []
    for side in SIDES:
        per_step = [max(r[side]["step"][i] for r in ranks) for i in range(args.steps)]
        profiles = [r[side]["profile"] for r in ranks]
        rows.append(
            {
                "side": side,
                "step_s": statistics.median(per_step),
                "spread_s": [min(per_step), max(per_step)],
                "of_ideal": ideal_step / statistics.median(per_step),
                "cpu_s": [statistics.median(r[side]["cpu"]) for r in ranks],
                "python_calls_per_mb": [p["python_calls"] / m for p in profiles],
                "dropout_ms": [p["dropout_ms"] for p in profiles],
                "masks_rope_ms": [p["masks_rope_ms"] for p in profiles],
                "masks_rope_computed": [p["masks_rope_computed"] for p in profiles],
                "hooked_modules": [r["hooked_modules"][side] for r in ranks],
                "steps_s": per_step,
                "losses": ranks[0][side]["loss"],
            }
        )
    load = [ranks[0]["load"][0], ranks[0]["load"][-1]]
    now, before = rows
    paired = statistics.median(a / b for a, b in zip(now["steps_s"], before["steps_s"]))
    same_losses = now["losses"] == before["losses"]
    print(
        f"{args.case}, {args.schedule}, pp={pp}, {m} microbatches; load average {load[0][0]:.2f} -> {load[1][0]:.2f}; "
        f"CPU pressure {pressure.summary()}"
    )
    spread = f"{min(ranks[0]['single']):.3f}-{max(ranks[0]['single']):.3f}"
    print(f"single-process step {single:.3f} s (spread {spread}); ideal {ideal_step:.3f} s")
    for row in rows:
        print(
            f"{row['side']:<7} step {row['step_s']:.3f} s ({row['spread_s'][0]:.3f}-{row['spread_s'][1]:.3f})  "
            f"ideal/step {row['of_ideal']:.2f}  CPU s per rank {[round(c, 3) for c in row['cpu_s']]}  "
            f"calls/microbatch {[round(c) for c in row['python_calls_per_mb']]}  "
            f"dropout ms {[round(c, 1) for c in row['dropout_ms']]}  masks+RoPE ms {[round(c, 1) for c in row['masks_rope_ms']]} "
            f"(computed {row['masks_rope_computed']} times)  "
            f"hooked modules {row['hooked_modules']}"
        )
    cpu_ratio = [a / b for a, b in zip(now["cpu_s"], before["cpu_s"])]
    print(
        f"now / before: ratio of medians {now['step_s'] / before['step_s']:.3f}, median of paired ratios {paired:.3f}, "
        f"CPU per rank {[round(c, 3) for c in cpu_ratio]}; losses equal at every step: {same_losses}"
    )
    write_json(
        args.out,
        {
            "case": args.case,
            "schedule": args.schedule,
            "machine": machine(),
            "load": load,
            "pressure": pressure.summary(),
            "single_s": single,
            "single_steps_s": ranks[0]["single"],
            "ideal_step_s": ideal_step,
            "rows": rows,
            "paired_ratio": paired,
            "cpu_ratio": cpu_ratio,
            "losses_equal": same_losses,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
