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

:func:`zoo` runs many types, each in a worker process by default, so that one crash or hang costs
that type only. ``ppzoo zoo`` is the command line (see docs/zoo.md); the registry in use is the
environment's, so ``PPZOO_BLOCK_PLUGINS=native ppzoo zoo`` measures the zoo without the native
adapter.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import multiprocessing
import os
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from typing import Any

__all__ = ["RESULTS", "ZooResult", "check_model_type", "render", "summary", "totals", "zoo", "zoo_adapter"]

#: the results a model type can have, best first
RESULTS = ("exact", "refused", "wrong", "error")


@dataclass(frozen=True)
class ZooResult:
    """The zoo's verdict on one model type.

    Attributes:
        model_type: the transformers model type.
        adapter: the adapter the registry picked, or None when none takes the config.
        result: one of :data:`RESULTS`.
        detail: why it was refused, how it differs, or what broke; empty when exact.
        seconds: how long the check took.
    """

    model_type: str
    adapter: str | None
    result: str
    detail: str = ""
    seconds: float = 0.0

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
    from ppzoo.testing.checks import check_stage_chain
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


def totals(results: Sequence[ZooResult]) -> dict[str, int]:
    """How many model types got each result (every result of :data:`RESULTS`, zeros included)."""
    return {r: sum(1 for x in results if x.result == r) for r in RESULTS}


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
    progress: Callable[[int, int, ZooResult], None] | None = None,
) -> list[ZooResult]:
    """Check every decoder model type of the installed transformers (or ``model_types``).

    Args:
        model_types: the types to check, in this order; default
            :func:`~ppzoo.testing.tiny_configs.decoder_model_types`.
        isolate: check each type in a worker process (a crash or hang costs that type only);
            False checks them in this process, which is faster for a few types.
        jobs: worker processes working at once (with ``isolate``).
        timeout_s: a type still running after this long is an ``error`` (with ``isolate``).
        progress: called as ``progress(done, total, result)`` after each type.

    Returns:
        One :class:`ZooResult` per type, in the order of ``model_types``.

    Raises:
        ValueError: ``model_types`` names a type the installed transformers does not know, or
            ``jobs`` is below 1.
    """
    from ppzoo.testing.tiny_configs import decoder_model_types

    known = decoder_model_types()
    types_ = list(dict.fromkeys(model_types)) if model_types is not None else known
    unknown = [t for t in types_ if t not in known]
    if unknown:
        raise ValueError(
            f"model types {unknown} are not decoder causal-LM types of the installed transformers; "
            "see `ppzoo zoo --list` for those it has"
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
    return [done[t] for t in types_]


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
    """One line: the totals, and the exact types per adapter."""
    counts = totals(results)
    by_adapter: dict[str, int] = {}
    for r in results:
        if r.result == "exact":
            by_adapter[r.adapter or "-"] = by_adapter.get(r.adapter or "-", 0) + 1
    shown = ", ".join(f"{name} {n}" for name, n in sorted(by_adapter.items(), key=lambda kv: -kv[1]))
    head = f"{len(results)} model types: " + ", ".join(f"{n} {r}" for r, n in counts.items())
    return head + (f" (exact by adapter: {shown})" if shown else "")


def render(results: Sequence[ZooResult], *, markdown: bool = False, width: int = 110) -> str:
    """The results as a table (model type, adapter, result, detail) and the :func:`summary`."""
    rows = [(r.model_type, r.adapter or "-", r.result, r.detail) for r in results]
    if markdown:
        lines = ["| model type | adapter | result | detail |", "| --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in (t, a, res, d)) + " |" for t, a, res, d in rows]
        return "\n".join(lines + ["", summary(results)])
    w_type = max([len("model type")] + [len(r[0]) for r in rows])
    w_adapter = max([len("adapter")] + [len(r[1]) for r in rows])
    lines = [f"{'model type':<{w_type}}  {'adapter':<{w_adapter}}  {'result':<7}  detail"]
    for t, a, res, d in rows:
        d = d if len(d) <= width else d[: width - 3] + "..."
        lines.append(f"{t:<{w_type}}  {a:<{w_adapter}}  {res:<7}  {d}".rstrip())
    return "\n".join(lines + [summary(results)])
