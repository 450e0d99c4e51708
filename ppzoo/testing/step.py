"""The distributed check: ``Pipeline.step`` and ``Pipeline.eval`` equal the Hugging Face reference.

Starting processes costs seconds (each imports torch and transformers), so one spawned gloo group
of two CPU ranks runs every adapter under every schedule. Ranks record each adapter's problems in
a file as they finish it; if a rank raises (and so leaves its peer blocked), the adapter it was on
is charged with the traceback and the adapters not reached yet run again in a fresh group.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ppzoo.adapter import Adapter
from ppzoo.architectures.moe import RouterLoss, router_loss_of, router_modules
from ppzoo.dropout import key_dropout
from ppzoo.loss import causal_lm_loss
from ppzoo.testing.harness import DROPOUT_SEED, SEQ_LEN, resolving_to
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model
from ppzoo.validation import ValidationError

__all__ = ["CRASHED", "SCHEDULES", "WORLD_SIZE", "check_distributed_step", "distributed_step_problems"]

#: every placement kind: one stage a rank, loop placement, V placement (tied copy on rank 0)
SCHEDULES: tuple[str, ...] = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
WORLD_SIZE = 2
MICROBATCHES = 4
#: how a problem starts when the pipeline refused the schedule (a validation rule), before any step
REFUSED = "refused"
#: a whole group's wall-clock limit; tiny models take seconds per adapter
TIMEOUT_S = 900.0
#: how a problem starts when the adapter's check crashed (rather than found a difference)
CRASHED = "a rank failed while checking it"


def check_distributed_step(adapter: Adapter, *, problems: Sequence[str] | None = None) -> None:
    """``ppzoo.pipeline(pp=2)`` under GPipe, 1F1B, Interleaved1F1B, ZBVZeroBubble and DualPipeV gives
    the Hugging Face loss (on every rank; a router aux loss per stage and microbatch, as
    ``ppzoo.architectures.moe`` defines it), gradients (tied copies synchronised) and eval logits.

    Args:
        adapter: the adapter under test.
        problems: what :func:`distributed_step_problems` already found for this adapter in a shared
            process group; None starts a group for this adapter alone.
    """
    if problems is None:
        problems = distributed_step_problems([adapter])[adapter.name]
    if problems:
        raise AssertionError(
            f"adapter {adapter.name!r}: distributed step vs Hugging Face" + "".join(f"\n  - {p}" for p in problems)
        )


def distributed_step_problems(
    adapters: Sequence[Adapter],
    *,
    schedules: Sequence[str] = SCHEDULES,
    timeout_s: float = TIMEOUT_S,
    progress: Callable[[str, list[str]], None] | None = None,
) -> dict[str, list[str]]:
    """Run every adapter under every schedule in one 2-rank gloo group (more only after a crash).

    Args:
        adapters: the adapters to check (unique names), in the order the ranks take them.
        schedules: the schedules each adapter runs under.
        timeout_s: a group's wall-clock limit; the adapter a group was on when it ran out is
            charged with the failure and the group restarts after it.
        progress: called as ``progress(name, problems)`` as each adapter's check finishes.

    Returns:
        Adapter name → the problems found (empty when everything matched the reference). A check
        that crashed has one problem starting with :data:`CRASHED`, with the ranks' tracebacks.
    """
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}")
    results: dict[str, list[str]] = {}

    def finish(name: str, problems: list[str]) -> None:
        results[name] = problems
        if progress is not None:
            progress(name, problems)

    with tempfile.TemporaryDirectory(prefix="ppzoo-step-") as tmp:
        cases = []
        for adapter in adapters:
            directory = Path(tmp) / adapter.name
            try:
                save_tiny_model(adapter, directory)
            except Exception as exc:  # noqa: BLE001 - one adapter's failure is its own result
                finish(adapter.name, [f"{CRASHED}: its tiny model does not save ({type(exc).__name__}: {exc})"])
                continue
            cases.append((adapter, str(directory)))
        pending = list(cases)
        while pending:
            failure = _run_group(pending, tuple(schedules), tmp, timeout_s, done=results, finish=finish)
            still = []
            for adapter, directory in pending:
                if adapter.name in results:
                    continue
                found = _collect(tmp, adapter.name)
                if found is not None:
                    finish(adapter.name, found)
                elif failure is not None:
                    # NOTE: ranks go through adapters in order: the first unfinished one crashed.
                    finish(adapter.name, [f"{CRASHED}:\n{failure}"])
                    failure = None
                else:
                    still.append((adapter, directory))
            if still and still == pending:
                raise RuntimeError(f"the process group finished without checking {[a.name for a, _ in still]}")
            pending = still
    return results


def _run_group(pending, schedules, tmp: str, timeout_s: float, *, done: dict, finish: Callable) -> str | None:
    """Run one group over ``pending``; report each adapter as both ranks finish it. Returns the
    group's failure (the ranks' tracebacks), or None."""
    from ppzoo.testing.distributed import DistributedFailure, run_distributed

    failure: list[str] = []

    def run() -> None:
        try:
            run_distributed(_rank_main, WORLD_SIZE, pending, schedules, tmp, timeout_s=timeout_s)
        except DistributedFailure as exc:
            failure.append(str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported like a failing rank
            failure.append(f"{type(exc).__name__}: {exc}")

    group = threading.Thread(target=run, name="ppzoo-step-group", daemon=True)
    group.start()
    while group.is_alive():
        group.join(timeout=0.5)
        # NOTE: report adapters as they finish, in order, so a long run shows its progress
        for adapter, _ in pending:
            if adapter.name in done:
                continue
            found = _collect(tmp, adapter.name)
            if found is None:
                break
            finish(adapter.name, found)
    return failure[0] if failure else None


def _collect(tmp: str, name: str) -> list[str] | None:
    found = []
    for rank in range(WORLD_SIZE):
        path = Path(tmp) / f"{name}.rank{rank}.json"
        if not path.is_file():
            return None
        found += json.loads(path.read_text())
    return found


def _rank_main(rank: int, world_size: int, cases, schedules, tmp: str) -> None:
    for adapter, directory in cases:
        problems: list[str] = []
        with resolving_to(adapter):
            for schedule in schedules:
                problems += _schedule_problems(rank, directory, schedule, adapter)
        path = Path(tmp) / f"{adapter.name}.rank{rank}.json"
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(problems))
        os.replace(partial, path)


def _schedule_problems(rank: int, directory: str, schedule: str, adapter: Adapter) -> list[str]:
    import torch.distributed as dist

    import ppzoo

    label = f"{schedule} rank {rank}"
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.get_text_config().vocab_size, batch_size=MICROBATCHES, seq_len=SEQ_LEN)
    with torch.no_grad():
        evaluated = reference(input_ids=ids, attention_mask=mask).logits
    try:
        pipe = ppzoo.pipeline(
            directory,
            pp=WORLD_SIZE,
            schedule=schedule,
            microbatches=MICROBATCHES,
            dtype=torch.float32,
            device="cpu",
            attn_implementation="eager",
        )
    except ValidationError as exc:
        # NOTE: refused alike on both ranks, before any communication; rank 0 reports it
        return [f"{REFUSED} under {schedule}: {' '.join(str(exc).split())}"] if rank == 0 else []
    # NOTE: train mode against train mode: the reference runs microbatch by microbatch with its
    # dropout keyed as the stages key theirs (seed, layer, microbatch; ppzoo.dropout), and every
    # rank seeds torch alike before the step
    reference.train()
    layout = pipe.plan.layout
    key_dropout(reference, layout, range(layout.num_layers), seed=DROPOUT_SEED)
    want = _reference_loss(reference, pipe.plan, ids, mask, labels)
    want.backward()
    problems = []
    torch.manual_seed(DROPOUT_SEED)
    loss = pipe.step(ids, labels=labels, attention_mask=mask)
    if not torch.allclose(loss, want, rtol=1e-5, atol=0):
        problems.append(f"{label}: loss {loss.item():.8f} != reference {want.item():.8f}")
    named = list(pipe.named_parameters())
    problems += [f"{label}: gradient of {m}" for m in grad_mismatches(named, reference)]
    problems += _coverage_problems(pipe, named, reference, adapter, label)
    logits = pipe.eval(ids, attention_mask=mask)
    if pipe.holds_last:
        if logits is None or not torch.allclose(logits, evaluated, rtol=1e-5, atol=1e-6):
            diff = "None" if logits is None else f"off by {(logits - evaluated).abs().max().item():.3e}"
            problems.append(f"{label}: eval logits on the last-stage rank are {diff}")
    elif logits is not None:
        problems.append(f"{label}: eval returned logits on a rank without the last stage")
    dist.barrier()
    return problems


def _reference_loss(reference, plan, ids, mask, labels) -> torch.Tensor:
    """The loss a pipeline step must return: Hugging Face's, the model run microbatch by microbatch
    (in train mode, so each microbatch draws its own dropout masks), plus its router aux loss (when
    the forward adds one) taken as ppzoo defines it for a pipeline (``ppzoo.architectures.moe``):
    each stage's term over its own layers' router logits, per microbatch, weighted by its share of
    the model's routers and averaged over the microbatches. The term is the forward's own, read
    from its source with ``router_loss_of`` (each family's loss function, arguments and
    coefficient: Doge's key count, JetMoE's ``aux_loss_coef``). Only the whole model on the whole
    batch can equal Hugging Face's single term; the stage chain check compares that one."""
    rows = ids.shape[0] // MICROBATCHES
    parts = [slice(mb * rows, (mb + 1) * rows) for mb in range(MICROBATCHES)]
    outs = [reference(input_ids=ids[part], attention_mask=mask[part]) for part in parts]
    loss = causal_lm_loss(torch.cat([o.logits for o in outs]), labels)
    if getattr(outs[0], "aux_loss", None) is None:
        return loss  # NOTE: the forward adds no aux loss (none, or its switch off: Doge's is_moe)
    recipe = router_loss_of(type(reference))
    if not isinstance(recipe, RouterLoss):
        raise AssertionError(f"the reference adds an aux loss that ppzoo does not read: {recipe}")
    # NOTE: router logits come in call order, one per router module, which is layer order
    layers = plan.layout.layers
    owner = [_layer_of(fqn, layers) for fqn, _, _ in router_modules(reference)]
    for part, out in zip(parts, outs):
        router = tuple(out.router_logits)
        if len(router) != len(owner):
            raise AssertionError(f"the reference returned {len(router)} router logits for {len(owner)} routers")
        for stage in plan.stages:
            own = tuple(r for r, layer in zip(router, owner) if layer in stage.layers)
            if own:
                term = recipe.term(reference, own, mask[part])
                loss = loss + term * (len(own) / len(owner)) / MICROBATCHES
    return loss


def _layer_of(fqn: str, layers: str) -> int:
    """The index of the layer of ``layers`` (the layer list's FQN) that holds module ``fqn``."""
    rest = fqn[len(layers) + 1 :] if fqn.startswith(layers + ".") else ""
    index = rest.split(".", 1)[0]
    if not index.isdigit():
        raise AssertionError(f"router {fqn!r} is not inside a layer of {layers!r}")
    return int(index)


def _coverage_problems(pipe: Any, named, reference, adapter: Adapter, label: str) -> list[str]:
    """Across ranks every reference parameter is held exactly once, except tied copies, which are
    either a second tensor on the last stage or the very source tensor on the same rank."""
    import torch.distributed as dist

    local = []
    tied = adapter.tied_weights(reference.config)
    # NOTE: the members of a tie group this rank holds (in any of its stages) must be one tensor
    on_rank: set[str] = set()
    for source in sorted(set(tied.values())):
        members = [source, *sorted(c for c, s in tied.items() if s == source)]
        found = []
        for stage in pipe.stages:
            for fqn in members:
                try:
                    found.append((fqn, stage.get_parameter(fqn)))
                except AttributeError:
                    continue
        for fqn, param in found[1:]:
            if param is not found[0][1]:
                local.append(f"{label}: {fqn!r} and {found[0][0]!r} are on one rank but not tied there")
        on_rank |= {fqn for fqn, _ in found}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ([name for name, _ in named], sorted(on_rank)))
    if dist.get_rank() != 0:
        return local
    held = [name for names, _ in gathered for name in names]
    want = {name for name, _ in reference.named_parameters(remove_duplicate=False)}
    problems = local
    twice = sorted({n for n in held if held.count(n) > 1})
    if twice:
        problems.append(f"{label}: parameters held by more than one rank: {twice}")
    missing = want - set(held)
    missing -= {n for _, tied_here in gathered for n in tied_here}  # tied to another member on that rank; checked there
    # NOTE: a tie within one stage's modules (BERT's decoder bias and its prediction bias) is one
    # parameter on that stage, held under one of its names; only ties across the pipeline
    # (``tied``) must be held under each name
    names_of: dict[int, set[str]] = {}
    for name, param in reference.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), set()).add(name)
    aliases = {n: names for names in names_of.values() for n in names if len(names) > 1}
    missing = sorted(n for n in missing if n in tied or not (aliases.get(n, set()) - {n}) & set(held))
    if missing:
        problems.append(f"{label}: no rank holds {missing}")
    unknown = sorted(set(held) - want)
    if unknown:
        problems.append(f"{label}: ranks hold parameters the reference does not have: {unknown}")
    return problems
