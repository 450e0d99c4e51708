"""The split by FLOP weights against the split by measured weights (``cost="measured"``), same run.

    python -m benchmarks.measured_cost --steps 10 --out benchmarks/results/measured-cost.json

The issue's peer shape: the ``small`` Llama (hidden 256, 8 layers, intermediate 1024, vocab
32000), sequences of 128, 4 microbatches of 1, pp=2, 1F1B, fp32, AdamW, two gloo ranks of one
torch thread each. Both pipelines are built in one process group from the same checkpoint and
stepped in turn, each step after a single-process step of the unsplit model (rank 0 runs it while
rank 1 waits), so that a drift in the machine's load touches all three alike:

    round = single-process step, then a ``flops`` pipeline step, then a ``measured`` one
            (the order of the two pipelines swaps every round)

A step is forward, backward, ``optimizer.step()`` and ``zero_grad``; a pipeline's is its slower
rank's. The **ideal** is the schedule's with free communication and equal stages: the median
single-process step / (pp × ideal efficiency), i.e. × (m + pp − 1) / (pp · m) for 1F1B. The
measured weights are rank 0's (what ``pipeline(cost="measured")`` measures at start-up) and are
printed as the head's and the embedding's cost in layers.
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
from benchmarks.step import CASES, _batch, _Single, ideal_efficiency
from ppzoo.testing.synthetic import generate_checkpoint

COSTS = ("flops", "measured")


def _measure(rank: int, world: int, directory: str, case: dict[str, Any], schedule: str, steps: int, warmup: int):
    import torch
    import torch.distributed as dist

    import ppzoo
    from ppzoo import calibration

    single = _Single(directory, case) if rank == 0 else None
    pipes, optimizers, built = {}, {}, {}
    for cost in COSTS:
        start = time.perf_counter()
        pipes[cost] = ppzoo.pipeline(
            directory,
            pp=world,
            schedule=schedule,
            microbatches=case["microbatches"],
            dtype=torch.float32,
            device="cpu",
            attn_implementation="sdpa",
            seq_len=case["seq_len"],
            cost=cost,
        )
        built[cost] = time.perf_counter() - start
        optimizers[cost] = torch.optim.AdamW(pipes[cost].parameters(), lr=1e-5)
    ids, labels = _batch(pipes["flops"].config.vocab_size, case)
    out: dict[str, Any] = {"single": [], "single_cpu": [], "build_s": built, "load": [os.getloadavg()]}
    for cost in COSTS:
        out[cost] = {
            "step": [],
            "cpu": [],
            "loss": [],
            "stages": {s.ppzoo_stage.index: list(s.ppzoo_stage.modules) for s in pipes[cost].stages},
        }
    for i in range(warmup + steps):
        dist.barrier()
        start_cpu = time.process_time()
        single_s = single.step(accumulate=False) if single is not None else 0.0
        single_cpu = time.process_time() - start_cpu
        order = COSTS if i % 2 == 0 else COSTS[::-1]
        timed = {}
        for cost in order:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = pipes[cost].step(ids, labels=labels)
            optimizers[cost].step()
            optimizers[cost].zero_grad(set_to_none=True)
            timed[cost] = time.perf_counter() - start
            timed[cost, "cpu"] = time.process_time() - start_cpu
            timed[cost, "loss"] = float(loss)
        if i >= warmup:
            out["single"].append(single_s)
            out["single_cpu"].append(single_cpu)
            for cost in COSTS:
                out[cost]["step"].append(timed[cost])
                out[cost]["cpu"].append(timed[cost, "cpu"])
                out[cost]["loss"].append(timed[cost, "loss"])
    out["load"].append(os.getloadavg())
    measured = list(calibration._MEMORY.values())
    if measured:
        m = measured[0]
        out["measured"]["head_layers"] = m.layers_per(("model.norm", "lm_head"), "model.layers.0")
        out["measured"]["embedding_layers"] = m.layers_per(("model.embed_tokens",), "model.layers.0")
        out["measured"]["optimizer_ns_per_param"] = m.optimizer_per_param * 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="small", choices=list(CASES))
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from ppzoo.testing.distributed import run_distributed

    case = CASES[args.case]
    directory = generate_checkpoint(
        args.root / f"llama-{case['shape']}-f32", llama_config(case["shape"], dtype="float32"), dtype="float32"
    )
    pp = 2
    # NOTE: a fresh measurement each run, not one cached by an earlier run
    os.environ["PPZOO_CACHE_DIR"] = str(args.root / f"costs-{os.getpid()}")
    with PressureMonitor() as pressure:
        ranks = run_distributed(_measure, pp, str(directory), case, args.schedule, args.steps, args.warmup)
    single = statistics.median(ranks[0]["single"])
    single_cpu = statistics.median(ranks[0]["single_cpu"])
    ideal_step = single / (pp * ideal_efficiency(args.schedule, pp, case["microbatches"]))
    rows = []
    for cost in COSTS:
        per_step = [max(r[cost]["step"][i] for r in ranks) for i in range(args.steps)]
        step = statistics.median(per_step)
        # NOTE: the busier rank's CPU seconds a step: its compute, which a loaded machine stretches
        # less than wall time (a rank waiting for its peer uses none)
        cpu = [statistics.median(r[cost]["cpu"]) for r in ranks]
        layers = [
            len([m for m in ranks[r][cost]["stages"][s] if ".layers." in m])
            for r in range(pp)
            for s in ranks[r][cost]["stages"]
        ]
        rows.append(
            {
                "cost": cost,
                "layers_per_stage": layers,
                "stages": [ranks[r][cost]["stages"] for r in range(pp)],
                "step_s": step,
                "spread_s": [min(per_step), max(per_step)],
                "of_ideal": ideal_step / step,
                "cpu_s": cpu,
                "steps_s": per_step,
                "losses": ranks[0][cost]["loss"],
            }
        )
    load = [ranks[0]["load"][0], ranks[0]["load"][-1]]
    print(
        f"{args.case}, {args.schedule}, pp={pp}, {case['microbatches']} microbatches; load average "
        f"{load[0][0]:.2f} -> {load[1][0]:.2f}; CPU pressure {pressure.summary()}"
    )
    print(
        f"single-process step {single:.3f} s (spread {min(ranks[0]['single']):.3f}-{max(ranks[0]['single']):.3f}); ideal {ideal_step:.3f} s"
    )
    print(
        f"single-process CPU s a step {single_cpu:.3f}: the pipeline's busier rank does "
        + ", ".join(f"{r['cost']} {max(r['cpu_s']) / (single_cpu / pp):.2f}" for r in rows)
        + " x its share (single CPU / pp)"
    )
    extra = {k: ranks[0]["measured"].get(k) for k in ("head_layers", "embedding_layers", "optimizer_ns_per_param")}
    print(f"measured on rank 0: {extra}")
    for row in rows:
        print(
            f"{row['cost']:<9} layers/stage {row['layers_per_stage']}  step {row['step_s']:.3f} s "
            f"({row['spread_s'][0]:.3f}-{row['spread_s'][1]:.3f})  ideal/step {row['of_ideal']:.2f}  "
            f"CPU s per rank {[round(c, 3) for c in row['cpu_s']]}  "
            f"first losses {row['losses'][:2]}"
        )
    flops, measured = rows
    paired = statistics.median(m / f for m, f in zip(measured["steps_s"], flops["steps_s"]))
    print(
        f"measured / flops: ratio of medians {measured['step_s'] / flops['step_s']:.3f}, median of paired ratios {paired:.3f}"
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
            "single_cpu_s": single_cpu,
            "ideal_step_s": ideal_step,
            "measured_weights": extra,
            "build_s": [r["build_s"] for r in ranks],
            "rows": rows,
            "paired_ratio": paired,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
