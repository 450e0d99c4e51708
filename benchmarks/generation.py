"""Decode throughput: ``Pipeline.generate`` at pp=2 against the unsplit model's ``generate``.

    python -m benchmarks.generation --out benchmarks/results/generation.json

Two processes with one torch thread each (``run_distributed``, gloo) hold the pipeline's two
stages (1F1B placement, the planner's split); the baseline is the unsplit Hugging Face model
(``from_pretrained``, the same attention implementation) calling ``generate`` in one process with
one thread — rank 0 runs it while rank 1 waits at a barrier. Every round times, one after the
other: Hugging Face, then ppzoo with the batch in 1, 2 and 4 microbatches, each for ``--new``
tokens and for one token (the prefill alone), greedy, with no eos (every row runs to the end).

    decode tokens/s = batch × (new − 1) / (time for new tokens − time for one token)

The median over the rounds is reported with the spread of the rounds' decode rates (each round's
rate from its own two timings), the ratios to the unsplit model and to one microbatch round by
round (median and range: the runs of one round follow each other, so a burst of load from other
jobs falls on them more alike than on runs of different rounds), and whether ppzoo's ids equal
Hugging Face's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PressureMonitor, command_line, float32_checkpoint, machine, table, write_json

#: model shape, prompts, prompt length, new tokens
CASES: dict[str, dict[str, Any]] = {
    "small": dict(shape="small", batch=8, prompt=32, new=32),
    "medium": dict(shape="medium", batch=8, prompt=32, new=32),
    # NOTE: decode of a few rows reads every weight once per microbatch and row block (memory
    # bound); a wide batch makes the matrix multiplies compute bound, where microbatches pay off
    "small-b64": dict(shape="small", batch=64, prompt=16, new=16),
    "medium-b64": dict(shape="medium", batch=64, prompt=16, new=16),
}
MICROBATCHES = (1, 2, 4)
#: an eos id no token has: every row generates ``new`` tokens
NO_EOS = -1


def _timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _rank_main(rank: int, world_size: int, directory: str, case: dict[str, Any], rounds: int, attn: str):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import ppzoo

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    pipe = ppzoo.pipeline(directory, pp=2, schedule="1F1B", device="cpu", attn_implementation=attn)
    reference = None
    if rank == 0:
        reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn)
        reference.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, pipe.config.vocab_size, (case["batch"], case["prompt"]), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(case["batch"]):  # left padding of different lengths
        mask[row, : row % 4 * 3] = 0
    times: dict[str, list[float]] = {"hf": [], "hf_1": []}
    times.update({f"pp{m}": [] for m in MICROBATCHES} | {f"pp{m}_1": [] for m in MICROBATCHES})
    outputs: dict[str, Any] = {}
    for round_ in range(rounds + 1):  # the first round warms up
        for new in (case["new"], 1):
            suffix = "" if new > 1 else "_1"
            dist.barrier()
            if rank == 0:
                with torch.no_grad():
                    elapsed, out = _timed(
                        lambda new=new: reference.generate(
                            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=NO_EOS
                        )
                    )
                if round_:
                    times["hf" + suffix].append(elapsed)
                outputs["hf" + suffix] = out
            dist.barrier()
            for m in MICROBATCHES:
                dist.barrier()
                elapsed, out = _timed(
                    lambda new=new, m=m: pipe.generate(
                        ids, mask, max_new_tokens=new, eos_token_id=NO_EOS, microbatches=m
                    )
                )
                slowest = torch.tensor(elapsed)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if round_:
                    times[f"pp{m}{suffix}"].append(slowest.item())
                outputs[f"pp{m}{suffix}"] = out
    if rank != 0:
        return None
    medians = {key: statistics.median(value) for key, value in times.items()}
    equal = {m: bool(torch.equal(outputs[f"pp{m}"], outputs["hf"])) for m in MICROBATCHES}
    return {"medians": medians, "times": times, "equal": equal}


def run_case(name: str, case: dict[str, Any], *, rounds: int, root: Path, attn: str) -> dict[str, Any]:
    from ppzoo.testing.distributed import run_distributed

    directory = float32_checkpoint(root, case["shape"])
    result = run_distributed(_rank_main, 2, str(directory), case, rounds, attn, timeout_s=3600)[0]
    rows = case_rows(name, case, result["times"], result["equal"])
    return {"case": name, "settings": case, "rows": rows, "times": result["times"], "equal": result["equal"]}


def case_rows(name: str, case: dict[str, Any], times: dict[str, list[float]], equal: dict) -> list[dict[str, Any]]:
    """The table rows of one case from its timings: median rates, the spread of the rounds' rates,
    and each run against the unsplit model and against one microbatch *round by round* (the runs
    of a round follow each other, so the ratio of two of them is less at the mercy of the load
    than the ratio of two medians), as the median and the range of the rounds' ratios."""
    decoded = case["batch"] * (case["new"] - 1)
    med = {key: statistics.median(value) for key, value in times.items()}

    def rates(key: str) -> list[float]:
        return [
            decoded / (full - one) if full > one else float("nan") for full, one in zip(times[key], times[key + "_1"])
        ]

    def ratio(key: str, base: str) -> tuple[float, str]:
        pairs = [a / b for a, b in zip(rates(key), rates(base)) if a == a and b == b]
        return statistics.median(pairs), f"{min(pairs):.2f}–{max(pairs):.2f}"

    rows = []
    for label, key in [("hf (unsplit)", "hf")] + [(f"pp=2, {m} microbatches", f"pp{m}") for m in MICROBATCHES]:
        own = [r for r in rates(key) if r == r]
        vs_hf, vs_hf_range = ratio(key, "hf") if key != "hf" else (1.0, "")
        vs_one, vs_one_range = ratio(key, "pp1") if key not in ("hf", "pp1") else (float("nan"), "")
        rows.append(
            {
                "case": name,
                "run": label,
                "total_s": med[key],
                "prefill_s": med[key + "_1"],
                "decode_tokens_per_s": decoded / (med[key] - med[key + "_1"]),
                "rounds_spread": f"{min(own):.0f}–{max(own):.0f}",
                "vs_unsplit": vs_hf,
                "vs_unsplit_range": vs_hf_range,
                "vs_one_microbatch": vs_one,
                "vs_one_range": vs_one_range,
                # NOTE: keys are ints as returned, strings once read back from the JSON
                "equal_to_hf": key == "hf" or bool(equal.get(int(key[2:]), equal.get(key[2:]))),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (median reported)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation of both sides (default sdpa)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"), help="where checkpoints are generated")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    info = machine()
    results = []
    for name in args.cases:
        print(f"case {name}: {CASES[name]}", flush=True)
        with PressureMonitor() as pressure:
            result = run_case(name, CASES[name], rounds=args.rounds, root=args.root, attn=args.attn)
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
                "run",
                "total_s",
                "prefill_s",
                "decode_tokens_per_s",
                "rounds_spread",
                "vs_unsplit",
                "vs_unsplit_range",
                "vs_one_microbatch",
                "vs_one_range",
                "equal_to_hf",
            ],
        )
    )
    print(f"machine: {info}")
    write_json(args.out, {"command": command_line("benchmarks.generation"), "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
