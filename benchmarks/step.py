"""Step efficiency: ``Pipeline.step`` with pp=2 against the unsplit model, same batch and optimizer.

    python -m benchmarks.step --out benchmarks/results/step.json

Each pipeline rank is a process with one torch thread (``run_distributed``, gloo); the baseline
is the unsplit Hugging Face model in one process with one thread, stepping the same global batch
with the same loss (``causal_lm_loss``) and AdamW. A timed step is forward, backward, optimizer
step and ``zero_grad``; the pipeline's step time is the slowest rank's, between barriers.

    efficiency = pipeline tokens/s / (pp × single-process tokens/s)

is reported next to the schedule's ideal efficiency: the share of a step a rank computes when
every stage costs the same and communication is free, found by running the schedule's own
action order (torch's for the multi-stage schedules) through :mod:`ppzoo.simulate` with a
forward costing 1, a full backward 2 and, where the backward is split, input and weight
gradients 1 each (the zero-bubble papers' assumption). It equals ``1 − bubble_fraction`` of
:mod:`ppzoo.estimate`: m/(m+pp−1) for GPipe and 1F1B, v·m/(v·m+pp−1) for Interleaved1F1B with v
stages per rank, 6m/(6m+pp−1) for ZBVZeroBubble.

``of_ideal`` (efficiency / ideal) is split into three factors whose product it is:
``granularity`` (the single process's whole-batch step time over its time with the batch in
microbatches, gradients accumulated: what small matrix multiplies cost, pipeline or not),
``balance`` (what the measured per-stage forward+backward times and optimizer steps allow, from
the same simulation with those costs) and ``runtime`` (that simulated step over the measured
one: the pipeline runtime's own cost, communication included).

``--layer-balanced`` also runs every schedule on the split ppzoo's planner made before it let
the first and last stages hold no layer and simulated the schedule (``split`` = ``layers``;
the current plan is ``plan``).

Each timed pipeline step follows a timed single-process step of each kind, whole batch and
accumulated microbatches (rank 0 runs them while rank 1 waits), so a change in the machine's
load touches all three alike. The baseline of every row is the median of all the case's
single-process steps (the same model and batch each time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import PressureMonitor, command_line, llama_config, machine, table, write_json
from ppzoo.testing.synthetic import generate_checkpoint

#: the benchmark's shapes: model shape, sequence length, microbatches, microbatch size
CASES: dict[str, dict[str, Any]] = {
    "small": dict(shape="small", seq_len=128, microbatches=4, microbatch_size=1),
    "medium": dict(shape="medium", seq_len=128, microbatches=4, microbatch_size=1),
}
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble")


# -- the ideal --------------------------------------------------------------------------------
def _stages_per_rank(schedule: str) -> int:
    return 1 if schedule in ("GPipe", "1F1B") else 2


def ideal_efficiency(schedule: str, pp: int, microbatches: int, stages_per_rank: int | None = None) -> float:
    """Share of a step each rank computes, for balanced stages and free communication."""
    from ppzoo import simulate

    v = _stages_per_rank(schedule) if stages_per_rank is None else stages_per_rank
    return simulate.ideal_efficiency(schedule, pp=pp, microbatches=microbatches, stages_per_rank=v)


def measured_ideal_step(schedule: str, pp: int, microbatches: int, stage_seconds: Sequence[float]) -> float:
    """Step time the schedule would take with the measured per-microbatch forward+backward of each stage.

    Each stage's time is split 1:2 between forward and backward (1:1:1 for F, I, W).
    """
    from ppzoo import simulate

    order = simulate.schedule_order(
        schedule, pp=pp, microbatches=microbatches, stages_per_rank=max(1, len(stage_seconds) // pp)
    )
    forward_share = simulate.COSTS["F"] + simulate.COSTS["B"]
    return simulate.makespan(order, [t / forward_share for t in stage_seconds])


def layer_balanced_split(config: Any, *, pp: int, schedule: str, seq_len: int) -> list[list[str]]:
    """The split ppzoo's planner made before stages could hold no layer and before it simulated
    schedules: every stage at least one layer, the costliest stage as cheap as possible."""
    from ppzoo import registry
    from ppzoo.cost import module_costs
    from ppzoo.meta import meta_model
    from ppzoo.split import min_max_bounds  # NOTE: the planner's own cost model

    adapter = registry.adapter_for(config)
    layout = adapter.fqn_layout(config)
    costs = module_costs(config, adapter, meta_model(config), layout, seq_len)
    layers = [[layout.layer(i)] for i in range(layout.num_layers)]
    layers[0] = list(layout.inputs) + layers[0]
    layers[-1] = layers[-1] + list(layout.outputs)
    bounds = min_max_bounds([sum(costs[m] for m in unit) for unit in layers], pp * _stages_per_rank(schedule))
    return [[m for unit in layers[a:b] for m in unit] for a, b in zip(bounds, bounds[1:])]


# -- the measurement ----------------------------------------------------------------------------
def _batch(vocab: int, case: dict[str, Any], seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = case["microbatches"] * case["microbatch_size"]
    ids = torch.randint(3, vocab, (rows, case["seq_len"]), generator=gen)
    return ids, ids.clone()


def case_pipeline(directory: str, world: int, schedule: str, case: dict[str, Any], **options: Any) -> Any:
    """``ppzoo.pipeline`` as every step benchmark builds it for ``case``: fp32 on the CPU, SDPA attention."""
    import torch

    import ppzoo

    return ppzoo.pipeline(
        directory,
        pp=world,
        schedule=schedule,
        microbatches=case["microbatches"],
        dtype=torch.float32,
        device="cpu",
        attn_implementation="sdpa",
        seq_len=case["seq_len"],
        **options,
    )


class _Single:
    """The unsplit model with its own AdamW: whole-batch steps and microbatch-accumulated steps."""

    def __init__(self, directory: str, case: dict[str, Any], *, fused: bool | None = None):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from ppzoo.loss import count_label_tokens

        hf_logging.disable_progress_bar()

        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=fused)
        self.ids, self.labels = _batch(self.model.config.vocab_size, case)
        self.tokens = count_label_tokens(self.labels)
        self.microbatches = case["microbatches"]

    def step(self, *, accumulate: bool) -> float:
        from ppzoo.loss import causal_lm_loss

        start = time.perf_counter()
        if accumulate:
            for ids, labels in zip(self.ids.chunk(self.microbatches), self.labels.chunk(self.microbatches)):
                causal_lm_loss(self.model(input_ids=ids).logits, labels, self.tokens).backward()
        else:
            causal_lm_loss(self.model(input_ids=self.ids).logits, self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _stage_seconds(pipe: Any, ids: Any, labels: Any, microbatches: int) -> dict[int, float]:
    """Forward+backward of each of this rank's stages on one microbatch, run directly (no pipeline)."""
    import torch

    from ppzoo.loss import causal_lm_loss

    hidden = int(pipe.adapter.text_config(pipe.config).hidden_size)
    rows = ids.shape[0] // microbatches
    out = {}
    for module in pipe.stages:
        spec = module.ppzoo_stage
        x = ids[:rows] if spec.index == 0 else torch.randn(rows, ids.shape[1], hidden, requires_grad=True)
        start = time.perf_counter()
        y = module(x)
        if spec.index == pipe.plan.num_stages - 1:
            causal_lm_loss(y, labels[:rows]).backward()
        else:
            y.backward(torch.ones_like(y))
        out[spec.index] = time.perf_counter() - start
        module.zero_grad(set_to_none=True)
    return out


def _measure(
    rank: int,
    world: int,
    directory: str,
    case: dict[str, Any],
    variants: list[tuple[str, str]],
    steps: int,
    warmup: int,
) -> dict:
    """Every (schedule, split) in turn; each timed pipeline step follows a timed single-process step.

    The single-process steps (whole batch, then accumulated microbatches) run on rank 0 while
    rank 1 waits at a barrier (one core busy), then both ranks run a pipeline step (two cores busy). Alternating the two in time keeps a
    drift in the machine's load from favouring either. After each step every rank, alone in
    turn, also times its stages' forward+backward on one microbatch without the pipeline.
    """
    import torch
    import torch.distributed as dist

    from ppzoo.config import load_config

    single = _Single(directory, case) if rank == 0 else None
    out: dict[str, Any] = {"variants": {}}
    for schedule, split in variants:
        extra = {}
        if split == "layers":
            extra["stage_modules"] = layer_balanced_split(
                load_config(directory), pp=world, schedule=schedule, seq_len=case["seq_len"]
            )
        pipe = case_pipeline(directory, world, schedule, case, **extra)
        optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-5)
        ids, labels = _batch(pipe.config.vocab_size, case)
        record: dict[str, Any] = {
            "single": [],
            "single_accumulated": [],
            "step": [],
            "pipe_step": [],
            "cpu": [],
            "stage_seconds": [],
        }
        for i in range(warmup + steps):
            dist.barrier()
            single_s = single.step(accumulate=False) if single is not None else 0.0
            accumulated_s = single.step(accumulate=True) if single is not None else 0.0
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            pipe.step(ids, labels=labels)
            middle = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end, end_cpu = time.perf_counter(), time.process_time()
            stage_s = {}
            for turn in range(world):
                dist.barrier()
                if turn == rank:
                    stage_s = _stage_seconds(pipe, ids, labels, case["microbatches"])
            if i >= warmup:
                for key, value in (
                    ("single", single_s),
                    ("single_accumulated", accumulated_s),
                    ("step", end - start),
                    ("pipe_step", middle - start),
                    ("cpu", end_cpu - start_cpu),
                    ("stage_seconds", stage_s),
                ):
                    record[key].append(value)
        record["stages"] = {s.ppzoo_stage.index: list(s.ppzoo_stage.modules) for s in pipe.stages}
        out["variants"][f"{schedule}/{split}"] = record
        del pipe, optimizer
    return out


def _variants(schedules: Sequence[str], layer_balanced: bool) -> list[tuple[str, str]]:
    out = []
    for schedule in schedules:
        out.append((schedule, "plan"))
        if layer_balanced:
            out.append((schedule, "layers"))
    return out


def run_case(
    name: str,
    case: dict[str, Any],
    *,
    schedules: list[str],
    steps: int,
    warmup: int,
    root: Path,
    layer_balanced: bool = False,
) -> dict:
    from ppzoo.testing.distributed import run_distributed

    directory = generate_checkpoint(
        root / f"llama-{case['shape']}-f32", llama_config(case["shape"], dtype="float32"), dtype="float32"
    )
    tokens = case["seq_len"] * case["microbatches"] * case["microbatch_size"]
    pp = 2
    variants = _variants(schedules, layer_balanced)
    ranks = run_distributed(_measure, pp, str(directory), case, variants, steps, warmup)
    rows = []
    # NOTE: every variant steps the same single-process model on the same batch, so the baseline
    # is the median over all of them; a variant's own few single steps move by ±15 % on this
    # VM and would move its efficiency with them (kept in the JSON as single_paired_s).
    single = statistics.median(t for r in ranks[0]["variants"].values() for t in r["single"])
    single_accumulated = statistics.median(t for r in ranks[0]["variants"].values() for t in r["single_accumulated"])
    for schedule, split in variants:
        records = [r["variants"][f"{schedule}/{split}"] for r in ranks]
        # NOTE: a step ends when its slowest rank is done (the next barrier waits for it).
        per_step = [max(rec["step"][i] for rec in records) for i in range(steps)]
        step_s = statistics.median(per_step)
        ideal = ideal_efficiency(schedule, pp, case["microbatches"])
        efficiency = single / (pp * step_s)
        stage_s = {}
        for rec in records:
            for index in rec["stages"]:
                stage_s[int(index)] = statistics.median(d[index] for d in rec["stage_seconds"])
        stage_list = [stage_s[i] for i in sorted(stage_s)]
        measured = measured_ideal_step(schedule, pp, case["microbatches"], stage_list)
        # NOTE: the step the schedule would take with the measured stage costs and free
        # communication, plus the slowest rank's optimizer step.
        optimizer_s = [statistics.median(a - b for a, b in zip(rec["step"], rec["pipe_step"])) for rec in records]
        simulated = measured + max(optimizer_s)
        rows.append(
            {
                "case": name,
                "schedule": schedule,
                "split": split,
                "step_s": step_s,
                "single_s": single,
                "tokens_per_s": tokens / step_s,
                "single_tokens_per_s": tokens / single,
                "efficiency": efficiency,
                "ideal": ideal,
                "of_ideal": efficiency / ideal,
                "of_ideal_vs_accumulated": single_accumulated / (pp * step_s) / ideal,
                # NOTE: of_ideal = granularity × balance × runtime: what microbatches cost the single
                # process, what the measured stage (and optimizer) imbalance allows, and the pipeline
                # runtime's own cost against a simulation of the measured stages.
                "granularity": single / single_accumulated,
                "balance": single_accumulated / (pp * simulated) / ideal,
                "runtime": simulated / step_s,
                "stage_fwd_bwd_s": stage_list,
                "simulated_step_s": simulated,
                "pipe_step_s": [statistics.median(rec["pipe_step"]) for rec in records],
                "optimizer_s": optimizer_s,
                "cpu_busy": [statistics.median(c / w for c, w in zip(rec["cpu"], rec["step"])) for rec in records],
                "single_accumulated_s": single_accumulated,
                "single_paired_s": statistics.median(records[0]["single"]),
                "steps_s": per_step,
                "single_steps_s": records[0]["single"],
                "single_accumulated_steps_s": records[0]["single_accumulated"],
                "stages": [records[r]["stages"] for r in range(pp)],
            }
        )
    return {"case": name, **case, "tokens_per_step": tokens, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument(
        "--layer-balanced",
        action="store_true",
        help="also run each schedule on the previous planner's split (every stage at least one "
        "layer, the costliest stage as cheap as possible), for comparison",
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"), help="where checkpoints are generated")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    info = machine()
    results = []
    for name in args.cases:
        print(f"case {name}: {CASES[name]}", flush=True)
        with PressureMonitor() as pressure:
            result = run_case(
                name,
                CASES[name],
                schedules=args.schedules,
                steps=args.steps,
                warmup=args.warmup,
                root=args.root,
                layer_balanced=args.layer_balanced,
            )
        result["cpu_pressure"] = pressure.summary()
        results.append(result)
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    rows = [row for result in results for row in result["rows"]]
    print()
    print(
        table(
            rows,
            [
                "case",
                "schedule",
                "split",
                "step_s",
                "single_s",
                "tokens_per_s",
                "single_tokens_per_s",
                "efficiency",
                "ideal",
                "of_ideal",
                "granularity",
                "balance",
                "runtime",
                "of_ideal_vs_accumulated",
            ],
        )
    )
    for row in rows:
        stages = ", ".join(f"{t * 1000:.0f}" for t in row["stage_fwd_bwd_s"])
        print(
            f"{row['case']} {row['schedule']}/{row['split']}: stage fwd+bwd per microbatch [{stages}] ms, "
            f"optimizer per rank {[round(t, 3) for t in row['optimizer_s']]} s, "
            f"CPU busy per rank {[round(b, 2) for b in row['cpu_busy']]}"
        )
    print(
        f"load average before {info['load_avg']}, after {info['load_avg_after']}; CPU pressure from other "
        f"tasks during each case (PSI some avg10, mean/max): {[r['cpu_pressure'] for r in results]}"
    )
    write_json(
        args.out,
        {
            "benchmark": "step",
            "machine": info,
            "command": command_line(__spec__.name),
            "pp": 2,
            "threads_per_process": 1,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
