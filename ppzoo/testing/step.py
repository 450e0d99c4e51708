"""The distributed check: ``Pipeline.step`` and ``Pipeline.eval`` equal the Hugging Face reference.

Starting processes costs seconds (each imports torch and transformers), so one spawned gloo group
of two CPU ranks runs every adapter under every schedule. Ranks record each adapter's problems in
a file as they finish it; if a rank raises (and so leaves its peer blocked), the adapter it was on
is charged with the traceback and the adapters not reached yet run again in a fresh group.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ppzoo.adapter import Adapter
from ppzoo.dropout import key_dropout
from ppzoo.loss import causal_lm_loss
from ppzoo.testing.checks import DROPOUT_SEED, SEQ_LEN, resolving_to
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model

__all__ = ["SCHEDULES", "WORLD_SIZE", "check_distributed_step", "distributed_step_problems"]

#: every placement kind: one stage a rank, loop placement, V placement (tied copy on rank 0)
SCHEDULES: tuple[str, ...] = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
WORLD_SIZE = 2
MICROBATCHES = 4
#: a whole group's wall-clock limit; tiny models take seconds per adapter
TIMEOUT_S = 900.0


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
    adapters: Sequence[Adapter], *, schedules: Sequence[str] = SCHEDULES, timeout_s: float = TIMEOUT_S
) -> dict[str, list[str]]:
    """Run every adapter under every schedule in one 2-rank gloo group (more only after a crash).

    Returns:
        Adapter name → the problems found (empty when everything matched the reference).
    """
    from ppzoo.testing.distributed import DistributedFailure, run_distributed

    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}")
    results: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="ppzoo-step-") as tmp:
        cases = []
        for adapter in adapters:
            directory = Path(tmp) / adapter.name
            save_tiny_model(adapter, directory)
            cases.append((adapter, str(directory)))
        pending = list(cases)
        while pending:
            failure = None
            try:
                run_distributed(_rank_main, WORLD_SIZE, pending, tuple(schedules), tmp, timeout_s=timeout_s)
            except DistributedFailure as exc:
                failure = str(exc)
            still = []
            for adapter, directory in pending:
                found = _collect(tmp, adapter.name)
                if found is not None:
                    results[adapter.name] = found
                elif failure is not None:
                    # NOTE: ranks go through adapters in order: the first unfinished one crashed.
                    results[adapter.name] = [f"a rank failed while checking it:\n{failure}"]
                    failure = None
                else:
                    still.append((adapter, directory))
            if still and still == pending:
                raise RuntimeError(f"the process group finished without checking {[a.name for a, _ in still]}")
            pending = still
    return results


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
    ids, mask, labels = batch(reference.config.vocab_size, batch_size=MICROBATCHES, seq_len=SEQ_LEN)
    with torch.no_grad():
        evaluated = reference(input_ids=ids, attention_mask=mask).logits
    pipe = ppzoo.pipeline(
        directory,
        pp=WORLD_SIZE,
        schedule=schedule,
        microbatches=MICROBATCHES,
        dtype=torch.float32,
        device="cpu",
        attn_implementation="eager",
    )
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
    (in train mode, so each microbatch draws its own dropout masks), its router aux loss (when the
    model adds one) taken as ppzoo defines it for a pipeline (``ppzoo.architectures.moe``): each
    stage's term over its own MoE layers, per microbatch, weighted by its share of the MoE layers
    and averaged over the microbatches. Only the whole model on the whole batch can equal Hugging
    Face's single term; the stage chain check compares that one."""
    cfg = reference.config
    rows = ids.shape[0] // MICROBATCHES
    parts = [slice(mb * rows, (mb + 1) * rows) for mb in range(MICROBATCHES)]
    outs = [reference(input_ids=ids[part], attention_mask=mask[part]) for part in parts]
    loss = causal_lm_loss(torch.cat([o.logits for o in outs]), labels)
    if getattr(outs[0], "aux_loss", None) is None:
        return loss
    recorder = type(reference)._can_record_outputs["router_logits"]
    layers = reference.get_submodule(plan.layout.layers)
    routed = [i for i, layer in enumerate(layers) if any(isinstance(m, recorder.target_class) for m in layer.modules())]
    balancing = inspect.getmodule(type(reference)).load_balancing_loss_func
    experts = max(int(getattr(cfg, a, None) or 0) for a in ("num_local_experts", "num_experts", "n_routed_experts"))
    for part, out in zip(parts, outs):
        router = out.router_logits
        for stage in plan.stages:
            own = tuple(router[routed.index(i)] for i in stage.layers if i in routed)
            if own:
                term = balancing(own, experts, int(cfg.num_experts_per_tok), mask[part])
                loss = loss + cfg.router_aux_loss_coef * term * (len(own) / len(routed)) / MICROBATCHES
    return loss


def _coverage_problems(pipe: Any, named, reference, adapter: Adapter, label: str) -> list[str]:
    """Across ranks every reference parameter is held exactly once, except tied copies, which are
    either a second tensor on the last stage or the very source tensor on the same rank."""
    import torch.distributed as dist

    local = []
    if pipe.holds_first and pipe.holds_last and pipe.plan.num_stages > 1:
        first, last = pipe.stages[0], pipe.stages[-1]
        for copy_, source in adapter.tied_weights(reference.config).items():
            if last.get_parameter(copy_) is not first.get_parameter(source):
                local.append(f"{label}: {copy_!r} and {source!r} are on one rank but not tied there")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [name for name, _ in named])
    if dist.get_rank() != 0:
        return local
    held = [name for names in gathered for name in names]
    tied = adapter.tied_weights(reference.config)
    want = {name for name, _ in reference.named_parameters(remove_duplicate=False)}
    problems = local
    twice = sorted({n for n in held if held.count(n) > 1})
    if twice:
        problems.append(f"{label}: parameters held by more than one rank: {twice}")
    missing = want - set(held)
    if pipe.plan.stages[0].rank == pipe.plan.stages[-1].rank:
        missing -= set(tied)  # tied to the source on that rank; checked there
    missing = sorted(missing)
    if missing:
        problems.append(f"{label}: no rank holds {missing}")
    unknown = sorted(set(held) - want)
    if unknown:
        problems.append(f"{label}: ranks hold parameters the reference does not have: {unknown}")
    return problems
