"""GPU check: every stage of a ~1 B model built straight onto one GPU from safetensors, in bf16.

Run it on a machine with one CUDA GPU, from the repository root (about a minute; under four
with the checkpoint's generation):

    python -m benchmarks.gpu_check --device cuda --out /tmp/ppzoo_gpu_check.json

and on CPU, with a tiny shape, to try it anywhere:

    python -m benchmarks.gpu_check --device cpu --small --out /tmp/ppzoo_gpu_check_cpu.json

It generates a random Llama-style checkpoint of ~0.84 B parameters directly in bf16 under /tmp
(reused when present), then:

1. reads the shard files plainly (``readinto`` a reusable buffer), cold (pages dropped with
   ``posix_fadvise``) and warm, for the disk's and the page cache's GB/s;
2. builds every stage of a ``--pp``-stage plan onto the device, cold then warm, and reports the
   GB/s of the whole build and of the weight loading alone, against (1);
3. runs the stage chain and the Hugging Face model (``from_pretrained``, same dtype and
   attention) on the same batch: max |difference| of the logits and of the loss;
4. times the stage chain's forward+backward (and the Hugging Face model's, for scale).

The last line printed is a compact JSON summary, also written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import evict_page_cache, llama_config, machine, write_json
from ppzoo.testing.synthetic import checkpoint_files, generate_checkpoint

_READ_CHUNK = 64 * 2**20


def read_files(paths: list[Path]) -> tuple[int, float]:
    """(bytes, seconds) to read the files whole with plain reads into one reusable buffer."""
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - start


def build_all(directory: Path, plan, config, *, device: str, dtype) -> tuple[list, float, float]:
    """Every stage of ``plan`` on ``device``: (stages, seconds for the builds, seconds in weight loading)."""
    import ppzoo.stage
    from ppzoo import registry
    from ppzoo.checkpoint import Checkpoint

    loading = []
    original = ppzoo.stage.load_stage_weights

    def timed_load(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync(device)
            loading.append(time.perf_counter() - start)

    adapter = registry.adapter_for(config)
    ppzoo.stage.load_stage_weights = timed_load
    try:
        _sync(device)
        start = time.perf_counter()
        stages = [
            ppzoo.stage.build_stage(
                config,
                adapter,
                plan,
                i,
                checkpoint=Checkpoint(directory),
                device=device,
                dtype=dtype,
                attn_implementation="sdpa",
            )
            for i in range(plan.num_stages)
        ]
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        ppzoo.stage.load_stage_weights = original
    return stages, seconds, sum(loading)


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, *, repeats: int, warmup: int) -> list[float]:
    """Wall times of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="a tiny shape instead of ~1 B (for CPU runs)")
    parser.add_argument("--pp", type=int, default=4, help="stages to split the model into")
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024 (64 with --small)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint directory (default under /tmp)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers.utils import logging as hf_logging

    import ppzoo
    from ppzoo.config import load_config
    from ppzoo.loss import causal_lm_loss
    from ppzoo.stage import run_chain

    hf_logging.disable_progress_bar()
    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(
                "gpu_check: --device cuda but torch sees no CUDA GPU; use --device cpu --small to try it on CPU"
            )
        device = str(torch.device(device if ":" in device else f"cuda:{torch.cuda.current_device()}"))
    shape = "tiny" if args.small else "1b"
    seq_len = args.seq_len or (64 if args.small else 1024)
    directory = args.dir or Path(f"/tmp/ppzoo-gpu-check/llama-{shape}-bf16")
    dtype = torch.bfloat16
    summary: dict = {"device": device, "shape": shape, "dtype": "bfloat16", "pp": args.pp, "machine": machine()}
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # NOTE: CUDA context creation is not part of any timing below

    start = time.perf_counter()
    generate_checkpoint(
        directory, llama_config(shape), dtype="bfloat16", device=device if device.startswith("cuda") else "cpu"
    )
    summary["generate_s"] = round(time.perf_counter() - start, 2)
    files = checkpoint_files(directory)
    print(f"checkpoint {directory}: {len(files)} shards, generated or reused in {summary['generate_s']}s", flush=True)

    # 1. plain reads, cold then warm
    evict_page_cache(files)
    nbytes, cold = read_files(files)
    _, warm = read_files(files)
    summary["file_bytes"] = nbytes
    summary["read_gbps"] = {"cold": round(nbytes / cold / 1e9, 3), "warm": round(nbytes / warm / 1e9, 3)}
    print(
        f"plain read of {nbytes / 1e9:.2f} GB: cold {summary['read_gbps']['cold']} GB/s, "
        f"warm {summary['read_gbps']['warm']} GB/s",
        flush=True,
    )

    # 2. every stage onto the device, cold then warm
    config = load_config(directory)
    config._attn_implementation = "sdpa"
    plan = ppzoo.plan(config, pp=args.pp, dtype=dtype)
    stage_bytes = sum(s.bytes for s in plan.stages)
    builds = {}
    for cache in ("cold", "warm"):
        if cache == "cold":
            evict_page_cache(files)
        stages, seconds, loading = build_all(directory, plan, config, device=device, dtype=dtype)
        builds[cache] = {
            "build_s": round(seconds, 3),
            "load_s": round(loading, 3),
            "build_gbps": round(stage_bytes / seconds / 1e9, 3),
            "load_gbps": round(stage_bytes / loading / 1e9, 3),
        }
        print(
            f"{plan.num_stages} stages ({stage_bytes / 1e9:.2f} GB) onto {device}, {cache} cache: "
            f"build {seconds:.2f}s = {builds[cache]['build_gbps']} GB/s, weight loading "
            f"{loading:.2f}s = {builds[cache]['load_gbps']} GB/s",
            flush=True,
        )
        if cache == "cold":
            del stages
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    summary["stage_bytes"] = stage_bytes
    summary["stage_build"] = builds
    summary["load_vs_read"] = {c: round(builds[c]["load_gbps"] / summary["read_gbps"][c], 3) for c in builds}

    # 3. the stage chain against Hugging Face
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (args.batch_size, seq_len), generator=gen).to(device)
    labels = ids.clone()
    with torch.no_grad():
        ours = run_chain(stages, ids)
        theirs = reference(input_ids=ids).logits
        loss_ours = causal_lm_loss(ours, labels)
        loss_theirs = reference(input_ids=ids, labels=labels).loss
    summary["logits_max_abs_diff"] = (ours.float() - theirs.float()).abs().max().item()
    summary["logits_max_abs"] = theirs.float().abs().max().item()
    summary["loss"] = {
        "ppzoo": loss_ours.item(),
        "hf": loss_theirs.item(),
        "abs_diff": abs(loss_ours.item() - loss_theirs.item()),
    }
    print(
        f"logits max |diff| {summary['logits_max_abs_diff']:.3g} (max |logit| {summary['logits_max_abs']:.3g}); "
        f"loss ppzoo {loss_ours.item():.5f}, HF {loss_theirs.item():.5f}",
        flush=True,
    )
    del ours, theirs

    # 4. forward+backward of the chain (and of the reference, for scale)
    for module in stages:
        module.train()
    reference.train()

    def chain_step():
        causal_lm_loss(run_chain(stages, ids), labels).backward()
        for module in stages:
            module.zero_grad(set_to_none=True)

    def reference_step():
        reference(input_ids=ids, labels=labels).loss.backward()
        reference.zero_grad(set_to_none=True)

    repeats, warmup = (3, 1) if not device.startswith("cuda") else (5, 2)
    summary["seq_len"], summary["batch_size"] = seq_len, args.batch_size
    # NOTE: the two alternate, so neither is timed alone in a quieter (or busier) moment.
    times: dict[str, list[float]] = {"chain": [], "hf": []}
    for _ in range(repeats):
        times["chain"] += _timed(chain_step, device, repeats=1, warmup=warmup)
        times["hf"] += _timed(reference_step, device, repeats=1, warmup=warmup)
        warmup = 0
    summary["chain_fwd_bwd_s"] = round(statistics.median(times["chain"]), 4)
    summary["hf_fwd_bwd_s"] = round(statistics.median(times["hf"]), 4)
    summary["fwd_bwd_times_s"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
    if device.startswith("cuda"):
        summary["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(
        f"forward+backward of {args.batch_size} x {seq_len} tokens: stage chain {summary['chain_fwd_bwd_s']}s, "
        f"HF {summary['hf_fwd_bwd_s']}s",
        flush=True,
    )
    summary["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, summary)
    compact = {k: v for k, v in summary.items() if k != "machine"}
    print(json.dumps(compact, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
