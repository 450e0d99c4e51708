"""Split backward: what the zero-bubble schedules pay for input and weight gradients apart.

    python -m benchmarks.backward_split --out benchmarks/results/backward-split.json

InterleavedZeroBubble and ZBVZeroBubble run each stage's backward as two actions, the input
gradient (I) and later the weight gradient (W), with torch's ``stage_backward_input`` and
``stage_backward_weight`` (what their ``PipelineStage`` calls). The schedules' ideal assumes
I + W costs one full backward (B). This benchmark times, on a stage of decoder layers (a ppzoo
stage built from the generated checkpoint, hidden states in and out), forward + full backward
against forward + I + W, alternating the two call by call; one process, one torch thread.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import (
    PressureMonitor,
    command_line,
    float32_checkpoint,
    paired_parser,
    start_single_process,
    table,
    write_json,
)

#: shape name → (sequence length, microbatch size)
CASES = {"small": (128, 1), "medium": (128, 1)}


def measure(directory: Path, *, seq_len: int, batch_size: int, pairs: int, warmup: int) -> dict:
    """Per-call forward, backward, input-gradient and weight-gradient seconds of a middle stage."""
    import torch
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    import ppzoo
    from ppzoo import registry
    from ppzoo.checkpoint import Checkpoint
    from ppzoo.config import load_config
    from ppzoo.stage import build_stage

    config = load_config(directory)
    layout = registry.adapter_for(config).fqn_layout(config)
    layers = [layout.layer(i) for i in range(layout.num_layers)]
    # NOTE: a middle stage of every layer: hidden states in, hidden states out, no head
    split = [list(layout.inputs), layers, list(layout.outputs)]
    plan = ppzoo.plan(config, pp=3, stage_modules=split, dtype=torch.float32)
    stage = build_stage(
        config,
        registry.adapter_for(config),
        plan,
        1,
        checkpoint=Checkpoint(directory),
        dtype=torch.float32,
        attn_implementation="sdpa",
    )
    stage.train()
    hidden = int(config.hidden_size)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch_size, seq_len, hidden, generator=gen)

    grads: dict[str, list] = {}

    def run(name: str) -> tuple[float, float, float]:
        """(forward, input or full backward, weight) seconds; the gradients are kept in ``grads``."""
        x = x0.clone().requires_grad_()
        start = time.perf_counter()
        y = stage(x)
        middle = time.perf_counter()
        if name == "full":
            y.backward(torch.ones_like(y))
            dx = x.grad
        else:
            (dx,), groups = stage_backward_input([y], [torch.ones_like(y)], [x], stage.parameters())
            input_done = time.perf_counter()
            stage_backward_weight(stage.parameters(), groups)
        end = time.perf_counter()
        grads[name] = [dx] + [p.grad for p in stage.parameters()]
        stage.zero_grad(set_to_none=True)
        if name == "full":
            return middle - start, end - middle, 0.0
        return middle - start, input_done - middle, end - input_done

    # NOTE: the two compute the same gradients, or the comparison would mean nothing
    run("full"), run("split")
    for a, b in zip(grads["full"], grads["split"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for _ in range(warmup):
        run("full"), run("split")
    times: dict[str, list] = {"full": [], "split": []}
    for i in range(pairs):
        for name in ("full", "split") if i % 2 == 0 else ("split", "full"):
            times[name].append(run(name))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = paired_parser(__doc__.split("\n\n")[0], CASES, "(full, split)")
    args = parser.parse_args(argv)
    info = start_single_process(args.threads)
    rows = []
    for name in args.cases:
        seq_len, batch_size = CASES[name]
        directory = float32_checkpoint(args.root, name)
        with PressureMonitor() as pressure:
            times = measure(directory, seq_len=seq_len, batch_size=batch_size, pairs=args.pairs, warmup=args.warmup)
        forward = statistics.median(t[0] for t in times["full"] + times["split"])
        backward = statistics.median(t[1] for t in times["full"])
        grad_input = statistics.median(t[1] for t in times["split"])
        grad_weight = statistics.median(t[2] for t in times["split"])
        paired = statistics.median((s[1] + s[2]) / f[1] for f, s in zip(times["full"], times["split"]))
        rows.append(
            {
                "case": name,
                "forward_s": forward,
                "backward_s": backward,
                "input_grad_s": grad_input,
                "weight_grad_s": grad_weight,
                "split_over_full": paired,
                "cpu_pressure": pressure.summary(),
                "times": times,
            }
        )
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(
        table(
            rows,
            ["case", "forward_s", "backward_s", "input_grad_s", "weight_grad_s", "split_over_full"],
            floats="{:.4f}",
        )
    )
    print(
        f"split_over_full: (I + W) / B, the median of per-pair ratios; threads {args.threads}; load average "
        f"before {info['load_avg']}, after {info['load_avg_after']}; CPU pressure (mean/max): "
        f"{[r['cpu_pressure'] for r in rows]}"
    )
    write_json(
        args.out,
        {
            "benchmark": "backward_split",
            "machine": info,
            "command": command_line(__spec__.name),
            "threads": args.threads,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
