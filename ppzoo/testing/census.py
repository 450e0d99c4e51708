"""The zoo census: which of the installed transformers' decoder model types ppzoo pipelines exactly.

For each model type, :func:`check_model_type` builds a tiny config from the config class's defaults
(:mod:`ppzoo.testing.tiny_configs`), asks the registry for its adapter and every validation rule,
and, when nothing refuses it, runs the conformance kit's stage chain
(:func:`~ppzoo.testing.check_stage_chain`: 1 to 4 stages against the unsplit model, logits, loss
and gradients at 1e-5 in fp32 on a left-padded batch, in train mode with the class
defaults' dropout) and, when the config has dropout probabilities, the kit's dropout check (every one
turned on, train mode against train mode; :mod:`ppzoo.dropout`). The result is one of

- ``exact``: the stage chain matches the unsplit model;
- ``refused``: no adapter takes the config, or a rule refuses it (the reason is kept);
- ``wrong``: the stage chain differs from the unsplit model;
- ``error``: anything else broke (the tiny config, the build, the forward).

With ``step=True`` every type found exact then also runs ``Pipeline.step`` (and ``eval``) on two
ranks under 1F1B and ZBVZeroBubble against the Hugging Face reference
(:func:`~ppzoo.testing.step.distributed_step_problems`, 32 types to a 2-rank gloo group). The
step verdict is kept in :attr:`ZooResult.step`; a type whose step differs becomes ``wrong``, and
one whose step crashes ``error``, so ``exact`` always means both.

Besides model types, the zoo checks named *variants* (``falcon[alibi]``,
:data:`~ppzoo.testing.tiny_configs.VARIANTS`): a model type's tiny config with the settings of
released checkpoints its defaults do not exercise. A variant is a row of its own; :func:`totals`
counts model types only and :func:`variant_totals` the variants.

:func:`zoo` runs many types, each in a worker process by default, so that one crash or hang costs
that type only. ``ppzoo zoo`` is the command line (see docs/zoo.md); the registry in use is the
environment's, so ``PPZOO_BLOCK_PLUGINS=native ppzoo zoo`` measures the zoo without the native
adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import multiprocessing
import os
import re
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from typing import Any

__all__ = [
    "RESULTS",
    "STEP_RESULTS",
    "STEP_SCHEDULES",
    "ZooResult",
    "check_model_type",
    "check_steps",
    "crash_summary",
    "is_variant",
    "render",
    "step_totals",
    "summary",
    "totals",
    "variant_totals",
    "zoo",
    "zoo_adapter",
]

#: the results a model type can have, best first
RESULTS = ("exact", "refused", "wrong", "error")
#: the step verdicts a model type can have ("not run": the step did not run, :attr:`ZooResult.step` None)
STEP_RESULTS = ("exact", "wrong", "error", "not run")
#: the schedules the zoo's step runs under: one stage a rank, and V placement (tied head on rank 0)
STEP_SCHEDULES = ("1F1B", "ZBVZeroBubble")
#: model types whose step runs in one 2-rank process group; a group's time limit is the zoo's
#: per-type timeout, and gloo's collective timeout with it, so a hang is found within that
STEP_GROUP = 32


@dataclass(frozen=True)
class ZooResult:
    """The zoo's verdict on one model type.

    Attributes:
        model_type: the transformers model type, or a variant's name (``falcon[alibi]``).
        adapter: the adapter the registry picked, or None when none takes the config.
        result: one of :data:`RESULTS`; with the step run, ``exact`` only if the step is too.
        detail: why it was refused, how it differs, or what broke; empty when exact.
        seconds: how long the check took.
        step: the 2-rank step's verdict, ``exact``, ``wrong`` or ``error``; None when it did not run.
        step_detail: how the step differs, or what broke; when exact, the schedules the pipeline
            refused for the type (a validation rule, with its reason), if any.
        step_seconds: how long the step check took.
    """

    model_type: str
    adapter: str | None
    result: str
    detail: str = ""
    seconds: float = 0.0
    step: str | None = None
    step_detail: str = ""
    step_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings and progress bars off while the zoo builds hundreds of models."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def zoo_adapter(model_type: str, adapter: Any = None) -> Any:
    """A copy of ``model_type``'s adapter whose ``tiny_config()`` is the zoo's tiny config.

    The conformance kit builds from ``adapter.tiny_config()``; this copy lets any of its checks
    (``check_stage_chain``, ``distributed_step_problems``, ...) run on a zoo model type. It pickles,
    so it can be sent to spawned ranks.

    Args:
        model_type: a model type of :func:`~ppzoo.testing.tiny_configs.decoder_model_types`.
        adapter: the adapter to copy; default the registry's for the tiny config.
    """
    from ppzoo import registry
    from ppzoo.testing.tiny_configs import tiny_config

    adapter = adapter if adapter is not None else registry.adapter_for(tiny_config(model_type))
    view = copy.copy(adapter)
    view.tiny_config = functools.partial(tiny_config, model_type)
    view.name = f"{adapter.name}[{model_type}]"
    return view


def check_model_type(model_type: str) -> ZooResult:
    """The zoo's verdict on ``model_type``, checked in this process (see the module docstring)."""
    from ppzoo import registry
    from ppzoo.testing.chain_checks import check_stage_chain
    from ppzoo.testing.dropout import check_dropout, with_dropout
    from ppzoo.testing.tiny_configs import tiny_config

    start = time.monotonic()

    def result(adapter: Any, verdict: str, detail: str = "") -> ZooResult:
        name = adapter.name if adapter is not None else None
        return ZooResult(model_type, name, verdict, _one_line(detail), round(time.monotonic() - start, 2))

    with _quiet():
        try:
            config = tiny_config(model_type)
        except Exception as exc:  # noqa: BLE001 - every failure is a result
            return result(None, "error", f"the tiny config does not build: {type(exc).__name__}: {exc}")
        try:
            adapter = registry.adapter_for(config)
        except registry.UnknownArchitectureError:
            return result(None, "refused", "no adapter takes the config")
        try:
            problems = registry.problems(config, adapter=adapter)
        except Exception as exc:  # noqa: BLE001
            return result(adapter, "error", f"validation raised {type(exc).__name__}: {exc}")
        if problems:
            return result(adapter, "refused", "; ".join(f"{p.code}: {p.message}" for p in problems))
        try:
            view = zoo_adapter(model_type, adapter)
            check_stage_chain(view)
            if with_dropout(config)[1]:
                check_dropout(view, require_effect=False)
        except AssertionError as exc:
            return result(adapter, "wrong", str(exc))
        except Exception as exc:  # noqa: BLE001
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return result(
                adapter, "error", f"{type(exc).__name__}: {exc} (at {os.path.basename(where.filename)}:{where.lineno})"
            )
        return result(adapter, "exact")


def is_variant(name: str) -> bool:
    """Whether ``name`` is a variant (:data:`~ppzoo.testing.tiny_configs.VARIANTS`), not a model type."""
    from ppzoo.testing.tiny_configs import VARIANTS

    return name in VARIANTS


def totals(results: Sequence[ZooResult]) -> dict[str, int]:
    """How many model types got each result (every result of :data:`RESULTS`, zeros included);
    variants are not counted here (:func:`variant_totals`)."""
    types_ = [x for x in results if not is_variant(x.model_type)]
    return {r: sum(1 for x in types_ if x.result == r) for r in RESULTS}


def variant_totals(results: Sequence[ZooResult]) -> dict[str, int]:
    """How many variants (:data:`~ppzoo.testing.tiny_configs.VARIANTS`) got each result."""
    variants = [x for x in results if is_variant(x.model_type)]
    return {r: sum(1 for x in variants if x.result == r) for r in RESULTS}


def step_totals(results: Sequence[ZooResult]) -> dict[str, int]:
    """How many rows (model types and variants) got each step verdict of :data:`STEP_RESULTS`."""
    return {v: sum(1 for x in results if (x.step or "not run") == v) for v in STEP_RESULTS}


# -- running many types ------------------------------------------------------------------------
def _serve(conn: Any) -> None:
    """A worker process: check the model types the parent sends until it sends None."""
    import torch

    torch.set_num_threads(1)
    while True:
        model_type = conn.recv()
        if model_type is None:
            return
        conn.send(check_model_type(model_type).to_dict())


class _Worker:
    def __init__(self, ctx: Any):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.task: str | None = None
        self.since = 0.0

    def give(self, model_type: str) -> None:
        self.task, self.since = model_type, time.monotonic()
        self.conn.send(model_type)

    def stop(self, *, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def zoo(
    model_types: Sequence[str] | None = None,
    *,
    isolate: bool = True,
    jobs: int = 1,
    timeout_s: float = 600.0,
    step: bool = False,
    progress: Callable[[int, int, ZooResult], None] | None = None,
) -> list[ZooResult]:
    """Check every decoder model type of the installed transformers and every variant (or
    ``model_types``).

    Args:
        model_types: the types (or variants) to check, in this order; default
            :func:`~ppzoo.testing.tiny_configs.decoder_model_types`, then
            :data:`~ppzoo.testing.tiny_configs.VARIANTS`.
        isolate: check each type in a worker process (a crash or hang costs that type only);
            False checks them in this process, which is faster for a few types.
        jobs: worker processes working at once (with ``isolate``).
        timeout_s: a type still running after this long is an ``error`` (with ``isolate``); with
            ``step``, also the time limit of each 2-rank process group (:func:`check_steps`).
        step: then run the 2-rank step of every type found exact (:func:`check_steps`).
        progress: called as ``progress(done, total, result)`` after each type, and again, with
            ``result.step`` set, after each type's step.

    Returns:
        One :class:`ZooResult` per type, in the order of ``model_types``.

    Raises:
        ValueError: ``model_types`` names a type the installed transformers does not know, or
            ``jobs`` is below 1.
    """
    from ppzoo.testing.tiny_configs import VARIANTS, decoder_model_types

    known = decoder_model_types()
    types_ = list(dict.fromkeys(model_types)) if model_types is not None else known + list(VARIANTS)
    unknown = [t for t in types_ if t not in known and t not in VARIANTS]
    if unknown:
        raise ValueError(
            f"model types {unknown} are not decoder causal-LM types of the installed transformers "
            f"nor variants ({', '.join(VARIANTS)}); see `ppzoo zoo --list` for those it has"
        )
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    done: dict[str, ZooResult] = {}

    def record(outcome: ZooResult) -> None:
        done[outcome.model_type] = outcome
        if progress is not None:
            progress(len(done), len(types_), outcome)

    if not isolate:
        for model_type in types_:
            record(check_model_type(model_type))
    else:
        _run_isolated(types_, jobs=jobs, timeout_s=timeout_s, record=record)
    results = [done[t] for t in types_]
    return check_steps(results, timeout_s=timeout_s, progress=progress) if step else results


def check_steps(
    results: Sequence[ZooResult],
    *,
    schedules: Sequence[str] = STEP_SCHEDULES,
    timeout_s: float = 600.0,
    progress: Callable[[int, int, ZooResult], None] | None = None,
) -> list[ZooResult]:
    """Run the 2-rank ``Pipeline.step`` of every ``exact`` result against the Hugging Face reference.

    Each type runs ``step`` (loss and every gradient) and ``eval`` (logits) under each of
    ``schedules`` (:func:`~ppzoo.testing.step.distributed_step_problems`), :data:`STEP_GROUP`
    types to a spawned 2-rank gloo group; a group restarts after a crash, charging the type it was
    on. A type whose step differs becomes ``wrong`` and one whose step crashed ``error``, with the
    step's problems in the detail.

    Args:
        results: the census results; only ``exact`` ones run.
        schedules: the schedules each type runs under.
        timeout_s: each process group's time limit (gloo's collective timeout too).
        progress: called as ``progress(done, total, result)`` after each type's step.

    Returns:
        ``results`` with :attr:`ZooResult.step` set on the exact ones (and their verdicts updated).
    """
    from ppzoo.testing.step import CRASHED, REFUSED, distributed_step_problems

    order = [r.model_type for r in results if r.result == "exact"]
    updated = {r.model_type: r for r in results}
    views: dict[str, str] = {}  # adapter view name -> model type
    adapters = []
    with _quiet():
        for model_type in order:
            try:
                view = zoo_adapter(model_type)
            except Exception as exc:  # noqa: BLE001
                problem = f"its adapter could not be copied for the step: {type(exc).__name__}: {exc}"
                updated[model_type] = _with_step(updated[model_type], [problem], 0.0, crashed=True)
                continue
            views[view.name] = model_type
            adapters.append(view)
    count, since = 0, time.monotonic()

    def finish(name: str, problems: list[str]) -> None:
        nonlocal count, since
        now = time.monotonic()
        model_type = views[name]
        crashed = any(p.startswith(CRASHED) for p in problems)
        # NOTE: a schedule the pipeline refuses for the type (a validation rule, with its reason)
        # is not a failed step; the type is exact under the schedules that ran
        refused = [p for p in problems if p.startswith(REFUSED)]
        problems = [p for p in problems if not p.startswith(REFUSED)]
        if len(refused) == len(schedules):
            problems = refused
        updated[model_type] = _with_step(
            updated[model_type], problems, round(now - since, 2), crashed=crashed, refused=refused
        )
        count, since = count + 1, now
        if progress is not None:
            progress(count, len(adapters), updated[model_type])

    for start in range(0, len(adapters), STEP_GROUP):
        since = time.monotonic()
        with _quiet():
            distributed_step_problems(
                adapters[start : start + STEP_GROUP], schedules=tuple(schedules), timeout_s=timeout_s, progress=finish
            )
    return [updated[r.model_type] for r in results]


def _with_step(
    result: ZooResult, problems: list[str], seconds: float, *, crashed: bool, refused: Sequence[str] = ()
) -> ZooResult:
    """``result`` with the step's verdict; a step that is not exact makes the result not exact.
    Schedules the pipeline ``refused`` for the type are named in the step's detail."""
    if not problems:
        return dataclasses.replace(
            result, step="exact", step_detail=_one_line("; ".join(refused)), step_seconds=seconds
        )
    if crashed:
        detail = "; ".join(crash_summary(p) for p in problems)
        verdict = "error"
    else:
        detail = "; ".join(problems)
        verdict = "wrong"
    detail = _one_line(detail)
    return dataclasses.replace(
        result,
        result=verdict,
        detail=f"the 2-rank step {'differs' if verdict == 'wrong' else 'failed'}: {detail}",
        step=verdict,
        step_detail=detail,
        step_seconds=seconds,
    )


#: a traceback's exception line: ``ValueError: ...``, ``torch.OutOfMemoryError: ...``
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:?")


def crash_summary(problem: str) -> str:
    """Each rank's exception in a crashed group's message (``--- rank N ---`` blocks of tracebacks).

    A chained traceback prints its cause first, so each rank's first exception line is the root
    cause (the model's own error, rather than torch's "failed to run forward" around it), and a
    rank that only lost its peer says so in its line.
    """
    lines: list[str] = []
    for block in problem.split("--- rank ")[1:]:
        rank, _, text = block.partition(" ---")
        kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
        raised = [line for line in kept if _EXCEPTION_LINE.match(line)]
        lines.append(f"rank {rank}: {(raised or kept or ['?'])[0]}")
    return "; ".join(lines) if lines else problem


def _run_isolated(types_: list[str], *, jobs: int, timeout_s: float, record: Callable[[ZooResult], None]) -> None:
    ctx = multiprocessing.get_context("spawn")
    pending, idle, busy = deque(types_), [], []
    try:
        while pending or busy:
            while pending and len(busy) < jobs:
                worker = idle.pop() if idle else _Worker(ctx)
                worker.give(pending.popleft())
                busy.append(worker)
            ready = wait([w.conn for w in busy], timeout=1.0)
            for worker in list(busy):
                elapsed = time.monotonic() - worker.since
                if worker.conn in ready:
                    try:
                        outcome = ZooResult(**worker.conn.recv())
                    except (EOFError, OSError):
                        worker.process.join(timeout=5)
                        code = worker.process.exitcode
                        outcome = ZooResult(
                            worker.task, None, "error", f"the worker process died (exit code {code})", round(elapsed, 2)
                        )
                        busy.remove(worker)
                        worker.stop(kill=True)
                        record(outcome)
                        continue
                    busy.remove(worker)
                    idle.append(worker)
                    record(outcome)
                elif elapsed > timeout_s:
                    busy.remove(worker)
                    worker.stop(kill=True)
                    record(ZooResult(worker.task, None, "error", f"timed out after {timeout_s:g}s", round(elapsed, 2)))
    finally:
        for worker in idle + busy:
            worker.stop(kill=worker in busy)


# -- reporting ---------------------------------------------------------------------------------
def summary(results: Sequence[ZooResult]) -> str:
    """The totals (model types; then variants and step verdicts, where there are any), and the
    exact model types per adapter."""
    counts = totals(results)
    by_adapter: dict[str, int] = {}
    for r in results:
        if r.result == "exact" and not is_variant(r.model_type):
            by_adapter[r.adapter or "-"] = by_adapter.get(r.adapter or "-", 0) + 1
    shown = ", ".join(f"{name} {n}" for name, n in sorted(by_adapter.items(), key=lambda kv: -kv[1]))
    types_ = sum(counts.values())
    head = f"{types_} model types: " + ", ".join(f"{n} {r}" for r, n in counts.items())
    head += f" (exact by adapter: {shown})" if shown else ""
    variants = variant_totals(results)
    if sum(variants.values()):
        head += f"; {sum(variants.values())} variants: " + ", ".join(f"{n} {r}" for r, n in variants.items())
    if any(r.step is not None for r in results):
        steps = step_totals(results)
        head += f"; 2-rank step ({', '.join(STEP_SCHEDULES)}): " + ", ".join(f"{n} {v}" for v, n in steps.items())
    return head


def render(results: Sequence[ZooResult], *, markdown: bool = False, width: int = 110) -> str:
    """The results as a table (model type, adapter, result, the step's verdict where it ran,
    detail) and the :func:`summary`."""
    stepped = any(r.step is not None for r in results)
    header = ["model type", "adapter", "result", *(["step"] if stepped else []), "detail"]
    rows = [
        [r.model_type, r.adapter or "-", r.result, *([r.step or "-"] if stepped else []), r.detail or r.step_detail]
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines + ["", summary(results)])
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header) - 1)]
    widths = [max(w, 7) if header[i] in ("result", "step") else w for i, w in enumerate(widths)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(header, widths)) + "  detail"]
    for row in rows:
        d = row[-1] if len(row[-1]) <= width else row[-1][: width - 3] + "..."
        lines.append(("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + f"  {d}").rstrip())
    return "\n".join(lines + [summary(results)])
