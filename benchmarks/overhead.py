"""Overhead: the whole model as one ppzoo stage against plain Hugging Face, forward + backward.

    python -m benchmarks.overhead --out benchmarks/results/overhead.json

One process, one torch thread (``--threads``). The stage is ``build_stage`` with a one-stage plan
(embedding, every layer, norm and head; ppzoo's patched forwards) and ``causal_lm_loss``; the
reference is ``AutoModelForCausalLM.from_pretrained`` called with ``labels=``, its own loss. Both
load the same generated checkpoint in fp32 with SDPA attention. The two alternate call by call
(gradients dropped after each), so a change in the machine's load touches both alike; the ratio
reported is the median of the per-pair ratios, next to the ratio of the medians.
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


def main(argv: list[str] | None = None) -> int:
    parser = paired_parser(__doc__.split("\n\n")[0], CASES, "(ppzoo, Hugging Face)")
    args = parser.parse_args(argv)
    info = start_single_process(args.threads)
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
