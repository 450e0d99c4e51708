"""``pipeline()``: builds this rank's stages of a model, on every rank, into the :class:`Pipeline` that runs them."""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ppzoo import registry
from ppzoo.agreement import exchange
from ppzoo.checkpoint import Checkpoint, resolve
from ppzoo.config import load_config
from ppzoo.dtypes import parse_dtype
from ppzoo.mesh import Degrees, build_mesh, default_device, init_distributed, parse_timeout
from ppzoo.parallelize import (
    FSDP_MIXED_PRECISION,
    ParallelizeFn,
    parse_activation_checkpointing,
    stage_parallelizer,
)
from ppzoo.planner import plan as make_plan
from ppzoo.precision import activation_dtype as boundary_dtype
from ppzoo.precision import apply_autocast, parse_mixed_precision
from ppzoo.runtime import Pipeline
from ppzoo.schedule import csv_stage_count, schedule_kind
from ppzoo.stage import build_stage
from ppzoo.vision import freeze_modules

__all__ = ["pipeline"]

log = logging.getLogger("ppzoo")

#: keyword arguments of ``from_pretrained`` that ppzoo passes on when loading the config
_CONFIG_LOADING_KWARGS = ("trust_remote_code", "revision", "token", "cache_dir")


def pipeline(
    model: str | os.PathLike,
    *,
    pp: int,
    schedule: str = "1F1B",
    microbatches: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    stages_per_rank: int | None = None,
    layers_per_stage: int | None = None,
    stage_modules: Sequence[Sequence[str]] | None = None,
    seq_len: int = 2048,
    cost: str = "flops",
    dp_replicate: int = 1,
    dp_shard: int = 1,
    cp: int = 1,
    tp: int = 1,
    parallelize_fn: ParallelizeFn | None = None,
    attn_implementation: str | None = None,
    timeout: float | datetime.timedelta | None = None,
    check_batch: bool = False,
    mixed_precision: str | torch.dtype | None = None,
    activation_checkpointing: str | int | None = None,
    compile: bool = False,
    freeze_vision: bool = False,
    **from_pretrained_kwargs: Any,
) -> Pipeline:
    """Build this rank's pipeline stages of ``model`` and the schedule that runs them.

    Call it on every rank (under ``torchrun``, or with a process group already initialised).

    Args:
        model: a local checkpoint directory or a hub id.
        pp: pipeline-parallel degree.
        schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble,
            DualPipeV (any case), or a path to a ``.csv`` schedule.
        microbatches: microbatches per step (default: the number of stages).
        dtype: parameter dtype.
        device: target device (default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
        stages_per_rank, layers_per_stage, stage_modules: how to split; see :func:`ppzoo.plan`.
        seq_len: the sequence length the cost-balanced split assumes (attention's share of a
            layer's cost grows with it); set it to your training length.
        cost: what the split balances: ``"flops"`` (default, FLOP counts) or ``"measured"``
            (global rank 0 times each layer kind's and the head's forward + backward and an AdamW
            step on its device at start-up, cached, and every rank splits by those times;
            :mod:`ppzoo.calibration`).
        dp_replicate, dp_shard, cp, tp: the other mesh degrees; world size = their product × pp.
            Each data-parallel rank passes its own part of the global batch to ``step``.
        parallelize_fn: ``fn(stage_module, stage_mesh)`` replacing the default tensor parallel +
            FSDP2 (:func:`ppzoo.parallelize.parallelize_stage`); ``stage_mesh`` is the stage's
            ``(dp_replicate, dp_shard, cp, tp)`` sub-mesh. The module is still on the meta device.
        attn_implementation: as in ``from_pretrained`` (``"eager"``, ``"sdpa"``, ...).
        timeout: how long a rank waits for the others (seconds or a ``timedelta``) before it
            fails: the process-group timeout, given to the group ppzoo initialises (default 600 s)
            or set on the one that exists, and on the mesh's groups. A rank whose stage fails
            inside the schedule leaves its peers waiting this long at most.
        check_batch: compare a hash of every rank's batch (ids, labels, mask, positions) in each
            ``step`` / ``eval``, and refuse a step whose ranks passed different batches (shapes
            are always compared). Also settable later as ``Pipeline.check_batch``.
        mixed_precision: ``"bf16"``: float32 parameters and optimizer state (``dtype`` must stay
            float32), bfloat16 compute, float32 gradient reduction and loss; hidden states and
            logits cross stages (and ``eval`` returns logits) in bfloat16. None (default): compute
            in ``dtype``. float16 is refused (it needs loss scaling). See :mod:`ppzoo.precision`.
        activation_checkpointing: recompute decoder layers' activations in backward instead of
            keeping them: ``"full"`` (every layer), ``"selective"`` (every second layer), an
            integer k (every k-th layer by its index in the whole model), or None (default).
        compile: ``torch.compile`` each decoder layer (after activation checkpointing, before
            FSDP2, as torchtitan does). The first step of each batch shape compiles.
        freeze_vision: a vision-language model's vision tower and projector get no gradients
            (``requires_grad=False``), as fine-tuning recipes that train the language model do;
            its images still reach the language model (:mod:`ppzoo.vision`).
        **from_pretrained_kwargs: other ``from_pretrained`` keywords: ``trust_remote_code``,
            ``revision``, ``token``, ``cache_dir``, or config attributes to override.

    Returns:
        The :class:`Pipeline`.

    Raises:
        ValueError: an argument of the wrong type, before any communication.
        ppzoo.validation.ValidationError: the config, split, schedule, microbatch count or degrees
            break validation rules (every problem at once, each with its code), before any
            communication.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype)
    timeout = parse_timeout(timeout)
    compute_dtype = parse_mixed_precision(mixed_precision, dtype=dtype)
    checkpoint_every = parse_activation_checkpointing(activation_checkpointing)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if not isinstance(freeze_vision, bool):
        raise ValueError(f"freeze_vision must be True or False, got {freeze_vision!r}")
    degrees = Degrees(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp)
    name, kind = schedule_kind(schedule)
    if kind == "csv" and stages_per_rank is None and stage_modules is None and layers_per_stage is None:
        stages_per_rank = csv_stage_count(name) // pp
    loading = {k: from_pretrained_kwargs.pop(k) for k in _CONFIG_LOADING_KWARGS if k in from_pretrained_kwargs}
    hub_kwargs = {k: v for k, v in loading.items() if k != "trust_remote_code"}
    local = resolve(model, **hub_kwargs)
    config = load_config(local, trust_remote_code=loading.get("trust_remote_code", False))
    for key, value in from_pretrained_kwargs.items():
        if not hasattr(config, key):
            raise TypeError(f"pipeline() got an unexpected keyword argument {key!r} (not a config attribute either)")
        setattr(config, key, value)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if cost not in ("flops", "measured"):
        raise ValueError(f"cost must be 'flops' or 'measured', got {cost!r}")
    planning = dict(
        pp=pp,
        schedule=name,
        stages_per_rank=stages_per_rank,
        layers_per_stage=layers_per_stage,
        stage_modules=stage_modules,
        dtype=dtype,
        seq_len=seq_len,
        microbatches=microbatches,
        dp_replicate=dp_replicate,
        dp_shard=dp_shard,
        cp=cp,
        tp=tp,
        custom_parallelize=parallelize_fn is not None,
    )
    the_plan = make_plan(config, **planning)
    # NOTE: the plan ran every validation rule on these settings; none needs a process group.
    microbatches = the_plan.num_stages if microbatches is None else microbatches
    adapter = registry.adapter_for(config)
    if freeze_vision and not adapter.image_modules(config):
        raise ValueError(
            f"freeze_vision=True, but model_type {getattr(config, 'model_type', None)!r} has no vision tower; "
            "leave freeze_vision out for a text-only model"
        )

    init_distributed(device, timeout=timeout)
    if cost == "measured":
        from ppzoo.calibration import agreed_costs

        measured = agreed_costs(
            config, adapter, the_plan.layout, seq_len=seq_len, device=device, dtype=compute_dtype or dtype
        )
        the_plan = make_plan(config, **planning, cost=measured)
    mesh = build_mesh(degrees, device, timeout=timeout)
    pp_rank = mesh["pp"].get_local_rank()
    on_hub = not Path(os.fspath(model)).expanduser().is_dir()
    checkpoint = Checkpoint(local, repo_id=str(model) if on_hub else None, hub_kwargs=hub_kwargs if on_hub else None)
    checkpoint.check_layer_count(the_plan.layout.layers, the_plan.layout.num_layers)
    stage_mesh = mesh["dp_replicate", "dp_shard", "cp", "tp"]
    parallelize = stage_parallelizer(
        stage_mesh,
        adapter=adapter,
        config=config,
        parallelize_fn=parallelize_fn,
        mixed_precision=compute_dtype,
        activation_checkpointing=checkpoint_every,
        compile=compile,
    )
    modules: dict[int, nn.Module] = {}
    error: BaseException | None = None
    try:
        for spec in the_plan.stages_for_rank(pp_rank):
            started = time.perf_counter()
            modules[spec.index] = build_stage(
                config,
                adapter,
                the_plan,
                spec.index,
                checkpoint=checkpoint,
                device=device,
                dtype=dtype,
                parallelize=parallelize,
                attn_implementation=config._attn_implementation,
            )
            log.info(
                "rank %d: stage %d/%d ready (%s params) in %.1fs",
                dist.get_rank(),
                spec.index,
                the_plan.num_stages,
                f"{spec.params:,}",
                time.perf_counter() - started,
            )
            if freeze_vision:
                freeze_modules(modules[spec.index], adapter.image_modules(config))
            if compute_dtype is not None and not getattr(modules[spec.index], FSDP_MIXED_PRECISION, False):
                apply_autocast(modules[spec.index], compute_dtype, param_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here
        error = exc
    # NOTE: building a stage is local to its rank (it reads only its own tensors); a rank that
    # failed (a missing shard, a corrupt file) tells the others here instead of leaving them
    # waiting in the first step's collectives
    exchange("pipeline", error)
    pipe = Pipeline(
        config=config,
        adapter=adapter,
        plan=the_plan,
        modules=modules,
        mesh=mesh,
        device=device,
        microbatches=microbatches,
        dtype=dtype,
        activation_dtype=boundary_dtype(dtype=dtype, compute=compute_dtype),
    )
    pipe.source = local
    pipe.check_batch = bool(check_batch)
    pipe.vision_frozen = freeze_vision
    return pipe
