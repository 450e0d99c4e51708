"""The ``ppzoo`` command: ``list``, ``plan``, ``train`` and friends."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from ppzoo import registry

    for name, adapter in registry.adapters().items():
        types_ = ", ".join(adapter.model_types) or ("(fallback)" if adapter.fallback else "-")
        print(f"{name:<14} {types_:<32} {registry.adapter_source(adapter)}")
    return 0


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def _fresh_process() -> bool:
    """Whether nothing of ppzoo's planning is loaded in this process yet (a ``ppzoo`` command).

    NOTE: the plan cache is read and written only then: a process that already planned may have
    registered plugins or patched modules that the cache key cannot see (tests do both).
    """
    return not any(m in sys.modules for m in ("ppzoo.registry", "ppzoo.planner"))


def _cmd_plan(args: argparse.Namespace) -> int:
    from ppzoo import plan_cache

    for flag, value in (
        ("--seq-len", args.seq_len),
        ("--microbatch-size", args.microbatch_size),
        ("--microbatches", args.microbatches),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "path", "json", "no_cache")}
    key = plan_cache.plan_key(args.path, options) if not args.no_cache and _fresh_process() else None
    answer = plan_cache.load(key) if key else None
    if answer is None:
        try:
            answer = _plan_answer(args)
        except ValueError as exc:  # NOTE: a refusal (rules broken, pp too large) is an answer too
            answer = {"error": str(exc)}
        if key:
            plan_cache.store(key, answer)
    if "error" in answer:
        raise ValueError(answer["error"])
    print(answer["json"] if args.json else answer["text"])
    return 0


def _plan_answer(args: argparse.Namespace) -> dict[str, str]:
    """What ``ppzoo plan`` prints, as JSON and as text (both cached; see :mod:`ppzoo.plan_cache`)."""
    import ppzoo
    from ppzoo.config import load_config
    from ppzoo.estimate import estimate_plan

    config = load_config(args.path)
    result = ppzoo.plan(
        config,
        pp=args.pp,
        schedule=args.schedule,
        stages_per_rank=args.stages_per_rank,
        layers_per_stage=args.layers_per_stage,
        dtype=args.dtype,
        seq_len=args.seq_len,
        microbatches=args.microbatches,
        cost=args.cost,
    )
    estimates = estimate_plan(
        result,
        config,
        seq_len=args.seq_len,
        microbatch_size=args.microbatch_size,
        microbatches=args.microbatches,
        fused_attention=args.fused_attention,
    )
    lines = [
        f"{result.model_type} ({result.adapter} adapter): {_human(result.total_params)} parameters, "
        f"pp={result.pp}, {result.num_stages} stages, schedule {result.schedule}, {result.placement} placement"
    ]
    total_cost = sum(s.cost for s in result.stages)
    lines.append(
        f"{'stage':>5} {'rank':>4} {'params':>9} {'bytes':>9} {'cost':>6} {'act/mb':>9} {'p+g+adam':>10}  modules"
    )
    for s, est in zip(result.stages, estimates["stages"]):
        mods = list(s.modules)
        layer_mods = [m for m in mods if m.startswith(result.layout.layers + ".")]
        others = [m for m in mods if m not in layer_mods]
        span = result.layout.layer(s.layers[0]) if s.layers else ""
        if len(s.layers) > 1:
            span += f"-{s.layers[-1]}"
        shown = ", ".join(
            [m for m in others if m in result.layout.inputs]
            + ([span] if span else [])
            + [m for m in others if m in result.layout.outputs]
        )
        act, state = est["activation_bytes_per_microbatch"], est["training_state_bytes"]
        lines.append(
            f"{s.index:>5} {s.rank:>4} {_human(s.params):>9} {_human(s.bytes) + 'B':>9} {s.cost / total_cost:>6.1%} "
            f"{_human(act) + 'B':>9} {_human(state) + 'B':>10}  {shown}"
        )
    bubble = estimates["bubble_fraction"]
    lines.append(
        f"act/mb: activations per microbatch of {args.microbatch_size} x {args.seq_len} tokens; "
        f"p+g+adam: parameters, gradients, 2 fp32 AdamW states; bubble with {estimates['microbatches']} "
        f"microbatches: " + ("not modelled for this schedule" if bubble is None else f"{bubble:.1%}")
    )
    lines += [f"note: {note}" for note in result.notes]
    return {"json": json.dumps(result.to_dict() | {"estimates": estimates}, indent=2), "text": "\n".join(lines)}


def _cmd_check(args: argparse.Namespace) -> int:
    from ppzoo import registry
    from ppzoo.testing import check_adapters
    from ppzoo.testing.report import render_matrix

    known = registry.adapters()
    if args.all == bool(args.adapter):
        raise ValueError("name adapters with --adapter NAME (repeatable) or check every registered one with --all")
    unknown = [name for name in args.adapter if name not in known]
    if unknown:
        raise ValueError(f"no registered adapter {unknown[0]!r}; registered: {', '.join(known)} (see `ppzoo list`)")
    selected = list(known.values()) if args.all else [known[name] for name in dict.fromkeys(args.adapter)]
    results = check_adapters(selected, select=args.check or None)
    sources = {a.name: registry.adapter_source(a).split(" (", 1)[0] for a in selected}
    print(render_matrix(results, sources=sources, markdown=args.markdown))
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from ppzoo.testing import census
    from ppzoo.testing.tiny_configs import VARIANTS, decoder_model_types

    if args.list:
        print("\n".join([*decoder_model_types(), *VARIANTS]))
        return 0
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    types_ = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    from ppzoo.testing import vision_census

    images = vision_census.vision_model_types() if args.vision else []
    if types_ is not None:
        images = [t for t in types_ if t in images]
        types_ = [t for t in types_ if t in set(decoder_model_types()) | set(VARIANTS) or t not in images]

    def progress(done: int, total: int, result: census.ZooResult) -> None:
        adapter = f" ({result.adapter})" if result.adapter else ""
        if result.step is None:
            line = f"[{done:>{len(str(total))}}/{total}] {result.model_type}: {result.result}{adapter} in {result.seconds:.1f}s"
        else:
            line = f"[step {done:>{len(str(total))}}/{total}] {result.model_type}: {result.step} in {result.step_seconds:.1f}s"
        print(line, file=sys.stderr, flush=True)

    results = (
        census.zoo(
            types_,
            isolate=not args.in_process,
            jobs=args.jobs,
            timeout_s=args.timeout,
            step=args.step,
            progress=progress,
        )
        if types_ != []
        else []
    )

    def progress_images(result: vision_census.VisionResult) -> None:
        print(f"[images] {result.model_type}: {result.result}", file=sys.stderr, flush=True)

    image_results = vision_census.vision_zoo(images, progress=progress_images, timeout_s=args.timeout) if images else []
    if args.json:
        report = {"results": [r.to_dict() for r in results], "totals": census.totals(results)}
        if any(census.is_variant(r.model_type) for r in results):
            report["variant_totals"] = census.variant_totals(results)
        if args.step:
            report["step_totals"] = census.step_totals(results)
        if image_results:
            report["image_text_to_text"] = [dataclasses.asdict(r) for r in image_results]
        print(json.dumps(report, indent=2))
    else:
        if results:
            print(census.render(results, markdown=args.markdown))
        if image_results:
            print(("\n" if results else "") + vision_census.render_vision(image_results, markdown=args.markdown))
    failed = any(r.result in ("wrong", "error") or r.step in ("wrong", "error") for r in results)
    return 1 if failed or any(r.result in ("wrong", "error") for r in image_results) else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ppzoo import train

    return train.main(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from ppzoo import completions

    return completions.main(args)


def _add_generate(sub, *, full: bool = True) -> None:
    p = sub.add_parser("generate", help="complete prompts with a pipelined checkpoint, streamed on rank 0")
    if full:
        from ppzoo.completions import add_arguments

        add_arguments(p)
    p.set_defaults(func=_cmd_generate)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ppzoo`` parser; given the ``command`` about to run, other commands' options are left out.

    NOTE: ``train``'s and ``generate``'s options import torch; ``ppzoo plan`` answering from its
    cache imports nothing heavy, so their options are added only when they may be parsed.
    """
    parser = argparse.ArgumentParser(prog="ppzoo", description="Pipeline-parallel training of Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered adapters and the plugins that provide them")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("plan", help="show how a model splits into stages (reads config.json only)")
    p.add_argument("path", help="directory holding config.json (weights optional), or a hub id")
    p.add_argument("--pp", type=int, required=True, help="pipeline-parallel degree")
    p.add_argument("--schedule", default="1F1B", help="schedule name (GPipe, 1F1B, Interleaved1F1B, ...) or .csv file")
    p.add_argument("--stages-per-rank", type=int, default=None)
    p.add_argument("--layers-per-stage", type=int, default=None)
    p.add_argument("--dtype", default=None, help="parameter dtype for byte counts (default: the config's)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for costs and activations (default 2048)")
    p.add_argument("--microbatch-size", type=int, default=1, help="sequences per microbatch (default 1)")
    p.add_argument(
        "--microbatches", type=int, default=None, help="microbatches per step (default: the number of stages)"
    )
    p.add_argument(
        "--fused-attention",
        action="store_true",
        help="activations for flash / memory-efficient attention (no seq x seq probabilities kept)",
    )
    p.add_argument(
        "--cost",
        choices=("flops", "measured"),
        default="flops",
        help="what the split balances: FLOP counts (default), or each layer kind's and the head's forward + "
        "backward and the optimizer step timed on this machine's CPU once (cached)",
    )
    p.add_argument("--json", action="store_true", help="print the plan and its estimates as JSON")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="plan afresh: neither read nor write the answers kept under ~/.cache/ppzoo/plans "
        "(PPZOO_CACHE_DIR moves them)",
    )
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("check", help="run the conformance kit and print an architecture x check table")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME", help="an adapter to check (repeatable)")
    p.add_argument("--all", action="store_true", help="check every registered adapter")
    p.add_argument("--check", action="append", default=[], metavar="CHECK", help="run only this check (repeatable)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "zoo", help="check every decoder model type of the installed transformers: exact, refused, wrong or error"
    )
    p.add_argument("--types", default=None, metavar="A,B,C", help="check only these model types (comma-separated)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", action="store_true", help="print the results and totals as JSON")
    p.add_argument(
        "--jobs", type=int, default=1, help="model types checked at once, each in a worker process (default 1)"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before a model type counts as an error (default 600)"
    )
    p.add_argument(
        "--in-process", action="store_true", help="check in this process, without worker processes (no isolation)"
    )
    p.add_argument(
        "--step",
        action="store_true",
        help="then run the 2-rank Pipeline.step of every exact type under 1F1B and ZBVZeroBubble, in gloo "
        "groups of 2 CPU ranks (--timeout limits each group); a type whose step differs is wrong",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="print the decoder model types of the installed transformers, then the variants, and exit",
    )
    p.add_argument(
        "--no-vision",
        dest="vision",
        action="store_false",
        help="leave out the second table: image-text-to-text types checked with images on 2 ranks",
    )
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("train", help="train with pipeline parallelism: one worker process per rank")
    if command in (None, "train"):
        from ppzoo.train import add_arguments as add_train_arguments

        add_train_arguments(p)
    p.set_defaults(func=_cmd_train)
    _add_generate(sub, full=command in (None, "generate"))
    return parser


#: commands whose parsing does not need train's and generate's options
_LIGHT_COMMANDS = ("list", "plan", "check", "zoo")


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # NOTE: the first word that is not an option names the command (ppzoo has no global options)
    command = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(command if command in _LIGHT_COMMANDS else None)
    args = parser.parse_args(words)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # OSError: no such directory, or a hub id that cannot be fetched
        print(f"ppzoo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
