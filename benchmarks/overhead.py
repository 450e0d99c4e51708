"""Overhead: the whole model as one ppzoo stage against plain Hugging Face, forward + backward;
and the pipeline runtime's own cost per microbatch, from 4 to 64 microbatches.

    python -m benchmarks.overhead --out benchmarks/results/overhead.json
    python -m benchmarks.overhead --microbatches 4 8 16 32 64 --out benchmarks/results/overhead-mb.json

One process, one torch thread (``--threads``). The stage is ``build_stage`` with a one-stage plan
(embedding, every layer, norm and head; ppzoo's patched forwards) and ``causal_lm_loss``; the
reference is ``AutoModelForCausalLM.from_pretrained`` called with ``labels=``, its own loss. Both
load the same generated checkpoint in fp32 with SDPA attention. The two alternate call by call
(gradients dropped after each), so a change in the machine's load touches both alike; the ratio
reported is the median of the per-pair ratios, next to the ratio of the medians.

With ``--microbatches``, two gloo ranks (one thread each) run ``Pipeline.step`` (pp=2, 1F1B by
default, the ``tiny`` shape so that the runtime's own work is not lost in the compute) with each
microbatch count in turn, one sequence a microbatch. Per count: the step's median (slowest rank,
the loss read) and its spread; the step the schedule would take with each stage's measured
forward+backward of one microbatch (run alone on its rank, no pipeline) and free communication;
the difference per microbatch (``overhead_per_mb``); each rank's CPU time in the step beyond its
stages' compute, per microbatch (``cpu_overhead_per_mb``, less sensitive to others' load); and,
counted (not timed), the Python calls per microbatch and the collective calls per step (point-to-point
sends and receives not counted). Flat means the per-microbatch figures do not grow with the count.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PressureMonitor,
    command_line,
    float32_checkpoint,
    paired_parser,
    start_single_process,
    table,
    write_json,
)

#: shape name → (sequence length, batch size)
CASES = {"small": (128, 4), "medium": (128, 4)}


def measure(directory: Path, *, seq_len: int, batch_size: int, pairs: int, warmup: int) -> dict:
    """Alternate ppzoo-stage and Hugging Face forward+backward; per-call times of each."""
    import torch
    from transformers import AutoModelForCausalLM

    import ppzoo
    from ppzoo import registry
    from ppzoo.checkpoint import Checkpoint
    from ppzoo.config import load_config
    from ppzoo.loss import causal_lm_loss
    from ppzoo.stage import build_stage

    config = load_config(directory)
    config._attn_implementation = "sdpa"
    plan = ppzoo.plan(config, pp=1, dtype=torch.float32)
    stage = build_stage(
        config,
        registry.adapter_for(config),
        plan,
        0,
        checkpoint=Checkpoint(directory),
        dtype=torch.float32,
        attn_implementation="sdpa",
    )
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    stage.train()
    reference.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=gen)
    labels = ids.clone()

    def ppzoo_step():
        causal_lm_loss(stage(ids), labels).backward()
        stage.zero_grad(set_to_none=True)

    def hf_step():
        reference(input_ids=ids, labels=labels).loss.backward()
        reference.zero_grad(set_to_none=True)

    # NOTE: same loss value first, so the two compute the same thing.
    with torch.no_grad():
        ours, theirs = causal_lm_loss(stage(ids), labels), reference(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for _ in range(warmup):
        ppzoo_step()
        hf_step()
    times = {"ppzoo": [], "hf": []}
    for i in range(pairs):
        # NOTE: alternate which goes first, so neither always runs right after the other's frees.
        order = (("ppzoo", ppzoo_step), ("hf", hf_step)) if i % 2 == 0 else (("hf", hf_step), ("ppzoo", ppzoo_step))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


#: the collective calls a step may make (point-to-point traffic is the schedule's own)
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object", "reduce_scatter_tensor")


def _count_collectives(dist: Any) -> dict[str, int]:
    """Wrap ``dist``'s collective functions so that each call is counted in the returned dict."""
    counts: dict[str, int] = {}
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def _microbatch_rank(
    rank: int,
    world: int,
    directory: str,
    schedule: str,
    counts: list[int],
    seq_len: int,
    steps: int,
    warmup: int,
    baseline: str | None = None,
    stage_forward_baseline: bool = False,
) -> dict:
    """One rank: for every microbatch count, timed steps, its stages' compute alone, calls and collectives.

    With ``baseline`` (another version's ``ppzoo/runtime.py``), a second pipeline built by it runs
    the same steps, alternating step by step with the current one. With ``stage_forward_baseline``,
    also a pipeline whose stage forwards do what they did before masks and RoPE were kept and
    streams left off models without dropout (``benchmarks/stage_forward.py``).
    """
    import cProfile
    import pstats

    import torch
    import torch.distributed as dist

    import ppzoo
    from benchmarks.peers import _load_runtime

    builders = {"ppzoo": ppzoo.pipeline}
    if baseline is not None:
        builders["baseline"] = _load_runtime(baseline).pipeline
    if stage_forward_baseline:
        from benchmarks.stage_forward import _as_before

        def before(*args, **kwargs):
            pipe = ppzoo.pipeline(*args, **kwargs)
            _as_before(pipe)
            return pipe

        builders["stage-forward-before"] = before
    calls = _count_collectives(dist)
    out: dict[str, dict[int, dict]] = {side: {} for side in builders}
    for m in counts:
        pipes = {
            side: build(
                directory,
                pp=world,
                schedule=schedule,
                microbatches=m,
                dtype=torch.float32,
                device="cpu",
                attn_implementation="sdpa",
                seq_len=seq_len,
            )
            for side, build in builders.items()
        }
        gen = torch.Generator().manual_seed(m)
        ids = torch.randint(3, pipes["ppzoo"].config.vocab_size, (m, seq_len), generator=gen)
        wall: dict[str, list[float]] = {side: [] for side in pipes}
        cpu: dict[str, list[float]] = {side: [] for side in pipes}
        for i in range(warmup + steps):
            order = list(pipes) if i % 2 == 0 else list(reversed(pipes))
            for side in order:
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                float(pipes[side].step(ids, labels=ids))
                end, end_cpu = time.perf_counter(), time.process_time()
                for module in pipes[side].stages:
                    module.zero_grad(set_to_none=True)
                if i >= warmup:
                    wall[side].append(end - start)
                    cpu[side].append(end_cpu - start_cpu)
        # each rank alone in turn: its stages' forward+backward of one microbatch, no pipeline
        stage_s: dict[int, tuple[float, float]] = {}
        for turn in range(world):
            dist.barrier()
            if turn == rank:
                stage_s = stage_costs(pipes["ppzoo"], ids[:1], repeats=max(3, steps))
        for side, pipe in pipes.items():
            # NOTE: counted, not timed: the collectives and the Python calls of one step
            dist.barrier()
            calls.clear()
            profile = cProfile.Profile()
            profile.enable()
            float(pipe.step(ids, labels=ids))
            profile.disable()
            for module in pipe.stages:
                module.zero_grad(set_to_none=True)
            out[side][m] = {
                "wall": wall[side],
                "cpu": cpu[side],
                "stage_s": {index: wall_cpu[0] for index, wall_cpu in stage_s.items()},
                "stage_cpu_s": {index: wall_cpu[1] for index, wall_cpu in stage_s.items()},
                "collectives": dict(calls),
                "python_calls": pstats.Stats(profile).total_calls,
            }
        dist.barrier()
        del pipes
    return out


def stage_costs(pipe: Any, ids: Any, *, repeats: int) -> dict[int, tuple[float, float]]:
    """Wall and CPU seconds (medians) of each of this rank's stages' forward+backward on ``ids``, run directly.

    The last stage's backward starts from the loss as the pipeline computes it, the others' from a
    gradient of ones; the stage input of a stage other than the first is random hidden states.
    """
    import torch

    from ppzoo.loss import causal_lm_loss, count_label_tokens

    hidden = int(pipe.adapter.text_config(pipe.config).hidden_size)
    tokens = count_label_tokens(ids)
    out = {}
    for module in pipe.stages:
        index = module.ppzoo_stage.index
        x = ids if index == 0 else torch.randn(*ids.shape, hidden, requires_grad=True)
        walls, cpus = [], []
        for _ in range(repeats + 1):  # NOTE: the first, untimed, allocates the gradients
            start, start_cpu = time.perf_counter(), time.process_time()
            y = module(x)
            if index == pipe.plan.num_stages - 1:
                causal_lm_loss(y, ids, tokens).backward()
            else:
                y.backward(torch.ones_like(y))
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
        module.zero_grad(set_to_none=True)
        out[index] = (statistics.median(walls[1:]), statistics.median(cpus[1:]))
    return out


def microbatch_rows(ranks: list[dict], *, schedule: str, counts: list[int], pp: int = 2) -> list[dict]:
    """The table: one row per microbatch count, from every rank's measurements."""
    from benchmarks.step import measured_ideal_step

    rows = []
    for m in counts:
        per_rank = [r[m] for r in ranks]
        per_step = [max(step) for step in zip(*(r["wall"] for r in per_rank))]
        step_s = statistics.median(per_step)
        stage_s = {int(i): s for r in per_rank for i, s in r["stage_s"].items()}
        ideal = measured_ideal_step(schedule, pp, m, [stage_s[i] for i in sorted(stage_s)])
        # a rank's own compute in a step: its stages' forward+backward, once per microbatch
        own = [m * sum(r["stage_cpu_s"].values()) for r in per_rank]
        cpu_over = [(statistics.median(r["cpu"]) - c) / m for r, c in zip(per_rank, own)]
        rows.append(
            {
                "microbatches": m,
                "step_s": step_s,
                "spread": f"{min(per_step):.3f}-{max(per_step):.3f}",
                "ideal_s": ideal,
                "per_mb_ms": 1000 * step_s / m,
                "overhead_per_mb_ms": 1000 * (step_s - ideal) / m,
                "cpu_overhead_per_mb_ms": 1000 * max(cpu_over),
                "python_calls_per_mb": max(r["python_calls"] for r in per_rank) / m,
                "collectives_per_step": max(sum(r["collectives"].values()) for r in per_rank),
                "steps_s": per_step,
                "stage_s": [stage_s[i] for i in sorted(stage_s)],
                "collectives": [r["collectives"] for r in per_rank],
            }
        )
    return rows


def run_microbatches(args: Any, info: dict) -> int:
    from ppzoo.testing.distributed import run_distributed

    directory = float32_checkpoint(args.root, args.shape)
    with PressureMonitor() as pressure:
        ranks = run_distributed(
            _microbatch_rank,
            2,
            str(directory),
            args.schedule,
            args.microbatches,
            args.seq_len,
            args.steps,
            args.warmup,
            args.baseline_runtime,
            args.stage_forward_baseline,
        )
    rows = []
    for side in ranks[0]:
        for row in microbatch_rows([r[side] for r in ranks], schedule=args.schedule, counts=args.microbatches):
            rows.append({"runtime": side, **row})
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(
        table(
            rows,
            [
                "runtime",
                "microbatches",
                "step_s",
                "spread",
                "ideal_s",
                "per_mb_ms",
                "overhead_per_mb_ms",
                "cpu_overhead_per_mb_ms",
                "python_calls_per_mb",
                "collectives_per_step",
            ],
        )
    )
    print(
        f"shape {args.shape}, seq {args.seq_len}, pp=2, {args.schedule}; load average before {info['load_avg']}, "
        f"after {info['load_avg_after']}; CPU pressure (mean/max) {pressure.summary()}"
    )
    write_json(
        args.out,
        {
            "benchmark": "overhead-microbatches",
            "machine": info,
            "command": command_line(__spec__.name),
            "shape": args.shape,
            "seq_len": args.seq_len,
            "schedule": args.schedule,
            "cpu_pressure": pressure.summary(),
            "rows": rows,
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = paired_parser(__doc__.split("\n\n")[0], CASES, "(ppzoo, Hugging Face)")
    parser.add_argument(
        "--microbatches",
        type=int,
        nargs="+",
        default=None,
        help="instead: the pipeline runtime's cost per microbatch at these microbatch counts (pp=2)",
    )
    parser.add_argument("--schedule", default="1F1B", help="with --microbatches: the schedule")
    parser.add_argument("--shape", default="tiny", help="with --microbatches: the model shape (benchmarks.common)")
    parser.add_argument("--seq-len", type=int, default=64, help="with --microbatches: tokens a sequence")
    parser.add_argument("--steps", type=int, default=8, help="with --microbatches: timed steps a count")
    parser.add_argument(
        "--baseline-runtime",
        default=None,
        help="with --microbatches: also a pipeline built by this ppzoo/runtime.py (git show REV:ppzoo/runtime.py > FILE)",
    )
    parser.add_argument(
        "--stage-forward-baseline",
        action="store_true",
        help="with --microbatches: also a pipeline with dropout streams on and masks / RoPE rebuilt every microbatch",
    )
    args = parser.parse_args(argv)
    info = start_single_process(args.threads)
    if args.microbatches:
        return run_microbatches(args, info)
    rows = []
    for name in args.cases:
        seq_len, batch_size = CASES[name]
        directory = float32_checkpoint(args.root, name)
        with PressureMonitor() as pressure:
            times = measure(directory, seq_len=seq_len, batch_size=batch_size, pairs=args.pairs, warmup=args.warmup)
        ours, theirs = statistics.median(times["ppzoo"]), statistics.median(times["hf"])
        paired = statistics.median(a / b for a, b in zip(times["ppzoo"], times["hf"]))
        rows.append(
            {
                "case": name,
                "seq_len": seq_len,
                "batch_size": batch_size,
                "ppzoo_s": ours,
                "hf_s": theirs,
                "ratio": paired,
                "ratio_of_medians": ours / theirs,
                "cpu_pressure": pressure.summary(),
                "times": times,
            }
        )
        print(f"  {name}: ppzoo {ours:.4f}s, HF {theirs:.4f}s, paired ratio {paired:.3f}", flush=True)
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(
        table(rows, ["case", "seq_len", "batch_size", "ppzoo_s", "hf_s", "ratio", "ratio_of_medians"], floats="{:.4f}")
    )
    print(
        f"threads {args.threads}; load average before {info['load_avg']}, after {info['load_avg_after']}; "
        f"CPU pressure (mean/max): {[r['cpu_pressure'] for r in rows]}"
    )
    write_json(
        args.out,
        {
            "benchmark": "overhead",
            "machine": info,
            "command": command_line(__spec__.name),
            "threads": args.threads,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
