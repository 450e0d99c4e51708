"""Peers: ppzoo's ``Pipeline.step`` against torchtitan's pipeline runtime on the same model and split.

    python -m benchmarks.peers --out benchmarks/results/peers.json

Two gloo ranks (``run_distributed``), one torch thread each. Both sides load the same seeded
checkpoint (a generated Hugging Face Llama, fp32): ppzoo through ``ppzoo.pipeline``, torchtitan
0.3.0 as its own ``Llama3Model`` (SDPA attention, complex RoPE, unfused q/k/v) with the weights
converted by its ``Llama3StateDictAdapter.from_hf``, split and scheduled by its ``pipeline_llm``
(its ``parallelize_llama`` included, i.e. FSDP2 of degree 1 in float32). The split is the same
on both sides, module for module (``--split``: torchtitan's default, one layer's weight for the
embedding and for the head, or ppzoo's plan). Same batch, same microbatches, same loss (summed
token cross-entropy over the batch's token count), AdamW on both.

A timed step is the pipeline step, ``optimizer.step()`` and ``zero_grad``, timed on each rank
from a barrier to its own end; the step's time is the slowest rank's. The runtimes take turns
step by step (which goes first rotates too), so a change in the machine's load touches all.
Reported: the median over the timed steps of each, the spread (min–max), their ratio
(ppzoo / torchtitan, below 1 when ppzoo is faster), the CPU seconds of a step (both ranks'
together: the work each runtime does, waiting left out, which another job's load disturbs less
than wall time) and both losses of every step, which must agree to 6 decimals (the run fails
otherwise). ``--baseline-runtime FILE`` adds a third side, ppzoo built by another version's
``ppzoo/runtime.py`` (``git show REV:ppzoo/runtime.py > FILE``), to measure a change of the runtime.

torchtitan is an optional dependency (``pip install -e .[peers]``: ``torchtitan==0.3.0`` and
``triton``, which its model package imports even on CPU). Its trainer's pipeline step does not run
on torch 2.13 (it passes per-microbatch argument lists), so the comparison is at the schedule
level: ``schedule.step(ids, target=labels, losses=...)`` on both sides.
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

from benchmarks.common import PressureMonitor, command_line, float32_checkpoint, machine, table, write_json

#: the peer shape: model shape (benchmarks.common.SHAPES), sequence length, microbatches of one sequence
CASE = dict(shape="small", seq_len=128, microbatches=4)
SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble")
#: losses of the two runtimes must agree to this many decimals
DECIMALS = 6


# -- the split, in both spellings ------------------------------------------------------------
def titan_name(fqn: str) -> str:
    """torchtitan's module name for a Hugging Face Llama module FQN."""
    names = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "lm_head"}
    if fqn in names:
        return names[fqn]
    if fqn.startswith("model.layers."):
        return fqn.removeprefix("model.")
    raise ValueError(f"no torchtitan module for {fqn!r}")


def hf_name(name: str) -> str:
    """The Hugging Face Llama FQN of a torchtitan module name (inverse of :func:`titan_name`)."""
    names = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
    if name in names:
        return names[name]
    if name.startswith("layers."):
        return f"model.{name}"
    raise ValueError(f"no Hugging Face module for {name!r}")


def stages_per_rank(schedule: str) -> int:
    from ppzoo.schedule import schedule_kind

    return 1 if schedule_kind(schedule)[1] == "single" else 2


def titan_split(schedule: str, *, pp: int, num_layers: int) -> list[list[str]]:
    """torchtitan's default split (``_generate_llm_fqn_per_model_part``, weights 1 and 1), in HF FQNs.

    The same rule as torchtitan's: the embedding and the norm + head each count as one layer, and
    the ``num_layers + 2`` are shared out evenly, earlier stages taking the remainder.
    """
    stages = pp * stages_per_rank(schedule)
    effective = num_layers + 2
    per, extra = divmod(effective, stages)
    out, layer = [], 0
    for index in range(stages):
        count = per + (index < extra) - (index == 0) - (index == stages - 1)
        modules = ["model.embed_tokens"] if index == 0 else []
        modules += [f"model.layers.{i}" for i in range(layer, min(layer + count, num_layers))]
        layer += count
        if index == stages - 1:
            modules += ["model.norm", "lm_head"]
        out.append(modules)
    return out


def plan_split(directory: str, schedule: str, *, pp: int, seq_len: int, microbatches: int) -> list[list[str]]:
    """ppzoo's own split for this schedule (``ppzoo.plan``), in HF FQNs."""
    import torch

    import ppzoo
    from ppzoo.config import load_config

    plan = ppzoo.plan(
        load_config(directory),
        pp=pp,
        schedule=schedule,
        dtype=torch.float32,
        seq_len=seq_len,
        microbatches=microbatches,
    )
    return [list(stage.modules) for stage in plan.stages]


def losses_agree(ours: Sequence[float], theirs: Sequence[float], decimals: int = DECIMALS) -> bool:
    """Whether two loss series agree to ``decimals`` decimals: within one unit of the last (float32 has ~7 digits)."""
    return len(ours) == len(theirs) and all(abs(a - b) <= 10**-decimals for a, b in zip(ours, theirs))


def summarize(times: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per-step times of every rank → the slowest rank's per step, its median and spread."""
    per_step = [max(step) for step in zip(*times)]
    return {
        "steps_s": per_step,
        "median_s": statistics.median(per_step),
        "min_s": min(per_step),
        "max_s": max(per_step),
    }


def cpu_seconds(per_rank: Sequence[Sequence[float]]) -> float:
    """Per-step CPU seconds of every rank → the median over steps of their sum."""
    return statistics.median(sum(step) for step in zip(*per_rank))


# -- the two runtimes ------------------------------------------------------------------------
def _titan_model(config: Any, state_dict: dict[str, Any]):
    """torchtitan's Llama3 of ``config``'s shape, with the checkpoint's weights."""
    import dataclasses

    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    dim, vocab, eps = config.hidden_size, config.vocab_size, config.rms_norm_eps
    heads = config.num_attention_heads
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    layers = _build_llama3_layers(
        n_layers=config.num_hidden_layers,
        dim=dim,
        n_heads=heads,
        n_kv_heads=config.num_key_value_heads,
        hidden_dim=config.intermediate_size,
        rope=ComplexRoPE.Config(
            dim=dim // heads, max_seq_len=config.max_position_embeddings, theta=theta, scaling="none"
        ),
        fuse_qkv=False,
        attn_backend="flex",  # NOTE: replaced below: torchtitan's SDPA, as Hugging Face's side uses
    )
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        layer.attention_norm = dataclasses.replace(layer.attention_norm, eps=eps)
        layer.ffn_norm = dataclasses.replace(layer.ffn_norm, eps=eps)
    model_config = Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim, eps=eps),
        lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=layers,
    )
    model = model_config.build()
    model.load_state_dict(Llama3StateDictAdapter(model_config, None).from_hf(dict(state_dict)), strict=True)
    return model, model_config


class _Titan:
    """torchtitan's pipeline on this rank: ``pipeline_llm`` over its Llama3, AdamW on its parts."""

    def __init__(self, directory: str, schedule: str, split: list[list[str]], *, pp: int, microbatches: int):
        import torch
        import torchtitan.distributed.parallel_dims as parallel_dims_module

        # NOTE: torchtitan reads its device type at import; on a CPU-only machine it must be told.
        parallel_dims_module.device_type = "cpu"
        from safetensors.torch import load_file
        from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
        from torchtitan.distributed import ParallelDims
        from torchtitan.distributed.pipeline_parallel import pipeline_llm
        from torchtitan.models.llama3 import parallelize_llama

        from ppzoo.config import load_config

        config = load_config(directory)
        state = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(file))
        model, model_config = _titan_model(config, state)
        world = torch.distributed.get_world_size()
        dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=pp, ep=1, world_size=world)
        dims.build_mesh()
        parallelism = ParallelismConfig(
            pipeline_parallel_degree=pp,
            pipeline_parallel_schedule=schedule,
            pipeline_parallel_microbatch_size=1,
            data_parallel_shard_degree=1,
            module_fqns_per_model_part=[[titan_name(m) for m in stage] for stage in split],
        )
        self.num_tokens = 1
        self.schedule, self.parts, self.has_first, self.has_last = pipeline_llm(
            model,
            parallel_dims=dims,
            training=TrainingConfig(local_batch_size=microbatches, mixed_precision_param="float32"),
            parallelism=parallelism,
            compile_config=CompileConfig(),
            ac_config=None,
            dump_folder="/tmp/ppzoo-bench/torchtitan",
            device=torch.device("cpu"),
            model_config=model_config,
            parallelize_fn=parallelize_llama,
            loss_fn=self._loss,
        )
        del model
        self.optimizer = torch.optim.AdamW([p for part in self.parts for p in part.parameters()], lr=1e-5)

    def _loss(self, logits, labels):
        import torch.nn.functional as F

        from ppzoo.loss import IGNORE_INDEX

        # NOTE: torchtitan's data loaders give labels already shifted; the sum over tokens
        # divided by the batch's token count, as torchtitan's global-token loss.
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(0, 1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss / self.num_tokens, None

    def step(self, ids, labels) -> float | None:
        import torch

        from ppzoo.loss import IGNORE_INDEX, shift_labels

        targets = shift_labels(labels)
        self.num_tokens = int((targets != IGNORE_INDEX).sum())
        losses: list | None = [] if self.has_last else None
        args = (ids,) if self.has_first else ()
        self.schedule.step(*args, target=targets if self.has_last else None, losses=losses, return_outputs=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(torch.stack(losses).detach().sum()) if losses else None


class _Ppzoo:
    """ppzoo's pipeline on this rank, AdamW on its parameters; ``runtime``: another ``ppzoo/runtime.py`` to build it with."""

    def __init__(
        self,
        directory: str,
        schedule: str,
        split: list[list[str]],
        *,
        pp: int,
        microbatches: int,
        runtime: str | None = None,
    ):
        import torch

        import ppzoo

        build = ppzoo.pipeline if runtime is None else _load_runtime(runtime).pipeline
        self.pipe = build(
            directory,
            pp=pp,
            schedule=schedule,
            microbatches=microbatches,
            dtype=torch.float32,
            device="cpu",
            attn_implementation="sdpa",
            stage_modules=split,
        )
        self.optimizer = torch.optim.AdamW(self.pipe.parameters(), lr=1e-5)

    def step(self, ids, labels) -> float | None:
        loss = self.pipe.step(ids, labels=labels)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # NOTE: read after the optimizer step, as a training loop logs it (see Pipeline.step)
        return float(loss) if self.pipe.holds_last else None


def _load_runtime(path: str) -> Any:
    """A ``ppzoo/runtime.py`` of another version (e.g. ``git show REV:ppzoo/runtime.py``), imported beside ppzoo."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ppzoo_runtime_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "pipeline", None)):
        raise SystemExit(
            f"{path} has no pipeline(): give a runtime.py from before pipeline() moved to ppzoo/build.py "
            "(commit 8f780e1's, say), or compare two trees another way"
        )
    return module


def _measure(
    rank: int,
    world: int,
    directory: str,
    variants: list[tuple[str, list[list[str]]]],
    steps: int,
    warmup: int,
    baseline: str | None,
    case: dict[str, Any],
) -> dict:
    import torch
    import torch.distributed as dist

    from ppzoo.config import load_config

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, load_config(directory).vocab_size, (case["microbatches"], case["seq_len"]), generator=gen)
    labels = ids.clone()
    out = {}
    for schedule, split in variants:
        sides = {
            "ppzoo": _Ppzoo(directory, schedule, split, pp=world, microbatches=case["microbatches"]),
            "torchtitan": _Titan(directory, schedule, split, pp=world, microbatches=case["microbatches"]),
        }
        if baseline is not None:
            sides["baseline"] = _Ppzoo(
                directory, schedule, split, pp=world, microbatches=case["microbatches"], runtime=baseline
            )
        times: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        losses: dict[str, list[float | None]] = {name: [] for name in sides}
        for i in range(warmup + steps):
            # NOTE: alternate which runtime goes first, so neither always follows the other's frees.
            order = list(sides)[i % len(sides) :] + list(sides)[: i % len(sides)]
            for name in order:
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                loss = sides[name].step(ids, labels)
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                if i >= warmup:
                    times[name].append(elapsed)
                    cpu[name].append(elapsed_cpu)
                losses[name].append(loss)
        out[schedule] = {"times": times, "cpu": cpu, "losses": losses}
        del sides
    return out


def run(
    directory: Path,
    *,
    schedules: Sequence[str],
    split: str,
    steps: int,
    warmup: int,
    pp: int = 2,
    baseline: str | None = None,
    case: dict[str, Any] = CASE,
) -> list[dict[str, Any]]:
    """Both runtimes on every schedule; one row a schedule."""
    from ppzoo.config import load_config
    from ppzoo.testing.distributed import run_distributed

    layers = load_config(directory).num_hidden_layers
    variants = []
    for schedule in schedules:
        if split == "titan":
            modules = titan_split(schedule, pp=pp, num_layers=layers)
        else:
            modules = plan_split(
                str(directory), schedule, pp=pp, seq_len=case["seq_len"], microbatches=case["microbatches"]
            )
        variants.append((schedule, modules))
    ranks = run_distributed(_measure, pp, str(directory), variants, steps, warmup, baseline, case)
    rows = []
    for schedule, modules in variants:
        per_rank = [r[schedule] for r in ranks]
        ours = summarize([r["times"]["ppzoo"] for r in per_rank])
        theirs = summarize([r["times"]["torchtitan"] for r in per_rank])
        # NOTE: the losses are known on the rank of the last stage (the same one on both sides)
        loss_ours = next(r["losses"]["ppzoo"] for r in per_rank if r["losses"]["ppzoo"][0] is not None)
        loss_theirs = next(r["losses"]["torchtitan"] for r in per_rank if r["losses"]["torchtitan"][0] is not None)
        paired = statistics.median(a / b for a, b in zip(ours["steps_s"], theirs["steps_s"]))
        # NOTE: CPU seconds of a step, both ranks together: the work done, waiting left out, so
        # less sensitive than wall time to what else runs on the machine
        cpu = {side: cpu_seconds([r["cpu"][side] for r in per_rank]) for side in per_rank[0]["cpu"]}
        extra = {}
        if baseline is not None:
            before = summarize([r["times"]["baseline"] for r in per_rank])
            loss_before = next(r["losses"]["baseline"] for r in per_rank if r["losses"]["baseline"][0] is not None)
            extra = {
                "baseline_s": before["median_s"],
                "baseline_spread": f"{before['min_s']:.3f}-{before['max_s']:.3f}",
                "vs_baseline": ours["median_s"] / before["median_s"],
                "baseline_cpu_s": cpu["baseline"],
                "cpu_vs_baseline": cpu["ppzoo"] / cpu["baseline"],
                "baseline_losses_equal": loss_before == loss_ours,
                "baseline": before,
            }
        rows.append(
            {
                "schedule": schedule,
                "split": " / ".join(_describe(stage) for stage in modules),
                "ppzoo_s": ours["median_s"],
                "ppzoo_spread": f"{ours['min_s']:.3f}-{ours['max_s']:.3f}",
                "torchtitan_s": theirs["median_s"],
                "torchtitan_spread": f"{theirs['min_s']:.3f}-{theirs['max_s']:.3f}",
                "ratio": ours["median_s"] / theirs["median_s"],
                "ratio_paired": paired,
                "ppzoo_cpu_s": cpu["ppzoo"],
                "torchtitan_cpu_s": cpu["torchtitan"],
                "cpu_ratio": cpu["ppzoo"] / cpu["torchtitan"],
                "loss_first": f"{loss_ours[0]:.6f} / {loss_theirs[0]:.6f}",
                "loss_last": f"{loss_ours[-1]:.6f} / {loss_theirs[-1]:.6f}",
                "losses_agree": losses_agree(loss_ours, loss_theirs),
                "stage_modules": modules,
                "ppzoo": ours,
                "torchtitan": theirs,
                "losses": {"ppzoo": loss_ours, "torchtitan": loss_theirs},
                **extra,
            }
        )
    return rows


def _describe(stage: Sequence[str]) -> str:
    """A stage's modules in a few characters: ``emb+3L``, ``1L+head``."""
    layers = sum(m.startswith("model.layers.") for m in stage)
    parts = (["emb"] if "model.embed_tokens" in stage else []) + ([f"{layers}L"] if layers else [])
    return "+".join(parts + (["head"] if "lm_head" in stage else [])) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument(
        "--split",
        choices=("titan", "plan"),
        default="titan",
        help="torchtitan's default split or ppzoo's plan; either way the same on both sides",
    )
    parser.add_argument(
        "--baseline-runtime",
        default=None,
        help="also run ppzoo built by this ppzoo/runtime.py (another version: git show REV:ppzoo/runtime.py > FILE)",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each runtime (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"), help="where checkpoints are generated")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        import torchtitan  # noqa: F401
    except ImportError:
        print("torchtitan is not installed: pip install -e '.[peers]' (torchtitan==0.3.0, triton)", file=sys.stderr)
        return 2

    info = machine()
    directory = float32_checkpoint(args.root, CASE["shape"])
    with PressureMonitor() as pressure:
        rows = run(
            directory,
            schedules=args.schedules,
            split=args.split,
            steps=args.steps,
            warmup=args.warmup,
            baseline=args.baseline_runtime,
        )
    info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(
        table(
            rows,
            [
                "schedule",
                "split",
                "ppzoo_s",
                "ppzoo_spread",
                "torchtitan_s",
                "torchtitan_spread",
                "ratio",
                "ratio_paired",
                "ppzoo_cpu_s",
                "torchtitan_cpu_s",
                "cpu_ratio",
                "loss_first",
                "loss_last",
                "losses_agree",
            ]
            + (
                [
                    "baseline_s",
                    "baseline_spread",
                    "vs_baseline",
                    "baseline_cpu_s",
                    "cpu_vs_baseline",
                    "baseline_losses_equal",
                ]
                if args.baseline_runtime
                else []
            ),
        )
    )
    print(
        f"{CASE}, pp=2, fp32, one thread a rank; load average before {info['load_avg']}, after "
        f"{info['load_avg_after']}; CPU pressure from other tasks (PSI some avg10, mean/max) {pressure.summary()}"
    )
    write_json(
        args.out,
        {
            "benchmark": "peers",
            "machine": info,
            "command": command_line(__spec__.name),
            "case": CASE,
            "cpu_pressure": pressure.summary(),
            "rows": rows,
        },
    )
    if not all(row["losses_agree"] for row in rows):
        print(f"the losses differ beyond {DECIMALS} decimals", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
