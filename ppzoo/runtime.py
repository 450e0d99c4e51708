"""The runtime: the ``Pipeline`` object users hold, and ``pipeline()``, which builds it on every rank."""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining

from ppzoo import registry
from ppzoo.agreement import batch_groups, check_same, exchange, schedule_failure, tensor_digest
from ppzoo.aux_loss import AuxLoss
from ppzoo.checkpoint import Checkpoint, resolve
from ppzoo.config import load_config
from ppzoo.dtypes import parse_dtype
from ppzoo.loss import IGNORE_INDEX, PendingLoss, causal_lm_loss, count_label_tokens
from ppzoo.mesh import Degrees, build_mesh, default_device, init_distributed, parse_timeout
from ppzoo.parallelize import (
    FSDP_MIXED_PRECISION,
    TP_GRAD_ALLREDUCE,
    ParallelizeFn,
    parse_activation_checkpointing,
    stage_parallelizer,
)
from ppzoo.planner import Plan
from ppzoo.planner import plan as make_plan
from ppzoo.precision import activation_dtype as boundary_dtype
from ppzoo.precision import apply_autocast, parse_mixed_precision
from ppzoo.schedule import SPLIT_BACKWARD, build_schedule, check_batch, csv_stage_count, schedule_kind
from ppzoo.stage import build_stage
from ppzoo.tied import TiedWeights
from ppzoo.vision import TOKEN_IDS, ImageBatch, finish_images, freeze_modules, prepare_images

__all__ = ["Pipeline", "PipelineStage", "check_tokens", "pipeline"]

log = logging.getLogger("ppzoo")

#: keyword arguments of ``from_pretrained`` that ppzoo passes on when loading the config
_CONFIG_LOADING_KWARGS = ("trust_remote_code", "revision", "token", "cache_dir")
#: how many batch shapes keep their stages and schedules (each shape needs its own, see below)
_SHAPE_CACHE = 4
#: where a rank's count of tokens to learn sits among the facts it tells the others (the last)
_TOKENS_FACT = 7


def check_tokens(tokens: torch.Tensor, name: str, *, vocab_size: int, ignore_index: int | None = None) -> None:
    """Refuse ``tokens`` that are not integer ids in ``[0, vocab_size)`` (or ``ignore_index``).

    Args:
        tokens: a ``(batch, sequence)`` tensor of token ids (``input_ids`` or ``labels``).
        name: what ``tokens`` is, for the message.
        vocab_size: the model's vocabulary size.
        ignore_index: a value allowed besides the ids (``-100`` for labels).

    Raises:
        ValueError: ``tokens`` is not an integer tensor, or holds an id out of range; the message
            names the first such value, its position (row, column) and the vocabulary size.
    """
    dtype = tokens.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of token ids, got dtype {dtype}; "
            f"tokenize to ids (torch.long) in [0, {vocab_size})"
        )
    bad = (tokens < 0) | (tokens >= vocab_size)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if not bool(bad.any()):
        return
    where = tuple(int(i) for i in bad.nonzero()[0])
    count = int(bad.sum())
    allowed = f"ids 0..{vocab_size - 1}" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
    others = f" ({count - 1} more out of range)" if count > 1 else ""
    raise ValueError(
        f"{name}[{', '.join(map(str, where))}] is {int(tokens[where])}, outside the vocabulary of {vocab_size} "
        f"tokens{others}; {name} must hold {allowed}: check that the tokenizer is the model's"
    )


class PipelineStage(pipelining.PipelineStage):
    """torch's ``PipelineStage``, minus connection warm-up messages from a rank to itself.

    NOTE: some torch releases (2.11) warm up the point-to-point connections at the first step by
    exchanging a tensor with both neighbouring stages, even one on this very rank (V placement);
    gloo cannot send to its own rank, so those exchanges are left out. Stages on one rank pass
    their tensors directly, and torch releases that warm up otherwise never call this.
    """

    def _get_init_p2p_neighbors_ops(self) -> list:
        return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != self.group_rank]


class Pipeline:
    """This rank's pipeline stages and the schedules that run them.

    Every rank of a pipeline calls :meth:`step` / :meth:`eval` with the same batch (with data
    parallelism, its data-parallel rank's part of the global batch). ``PipelineStage`` fixes its
    communication shapes when built, so the pipeline keeps one set of stages and schedules per
    (microbatch size, sequence length) it has seen (the last few): a batch of a new length simply
    gets its own, with no change to the modules or their gradients. Sequences need no padding to a
    fixed length; pad them yourself if you want to avoid the extra set of buffers per length.
    """

    def __init__(
        self,
        *,
        config: Any,
        adapter: Any,
        plan: Plan,
        modules: dict[int, nn.Module],
        mesh: Any,
        device: torch.device,
        microbatches: int,
        dtype: torch.dtype,
        activation_dtype: torch.dtype | None = None,
    ):
        self.config = config
        self.adapter = adapter
        self.plan = plan
        self.mesh = mesh
        self.device = device
        self.microbatches = microbatches
        self.dtype = dtype
        #: the dtype of hidden states and logits between stages (the compute dtype under mixed precision)
        self.activation_dtype = activation_dtype or dtype
        self._modules = modules  # stage index -> module, in stage order
        self._pp_group = mesh["pp"].get_group()
        self.pp_rank = mesh["pp"].get_local_rank()
        self._last_rank = plan.stages[-1].rank
        self._num_tokens = 1
        # NOTE: slicing a DeviceMesh builds a new sub-mesh each time (milliseconds on CPU): the
        # groups and sizes the step needs are read once here, not per step or per microbatch.
        self._dp_groups = [mesh[d].get_group() for d in ("dp_replicate", "dp_shard") if mesh[d].size() > 1]
        self._dp_size = mesh["dp_replicate"].size() * mesh["dp_shard"].size()
        self._tp_group = mesh["tp"].get_group() if mesh["tp"].size() > 1 else None
        self._batch_groups = batch_groups(mesh)
        # NOTE: the global ranks of this rank's data-parallel peers (itself included): the ranks
        # whose token counts add up to the global batch's, as an all-reduce over dp would sum them
        coordinate = (mesh.mesh == dist.get_rank()).nonzero()[0].tolist()
        self._dp_peers = mesh.mesh[coordinate[0], :, :, coordinate[3], coordinate[4]].flatten().tolist()
        self._params: list[nn.Parameter] | None = None
        #: the last step's loss reduction, while it is in flight (see :class:`PendingLoss`)
        self._pending: PendingLoss | None = None
        self._runtimes: OrderedDict[tuple[int, int, bool], Any] = OrderedDict()
        self._tied = TiedWeights(
            adapter.tied_weights(config), modules=modules, stages=plan.stages, pp_rank=self.pp_rank, mesh=mesh
        )
        self._aux_loss = AuxLoss(adapter, config, list(modules.values()), microbatches=microbatches, device=device)

    # -- what this rank holds ----------------------------------------------------------------
    @property
    def stages(self) -> list[nn.Module]:
        """This rank's stage modules, in stage order."""
        return list(self._modules.values())

    @property
    def holds_first(self) -> bool:
        return 0 in self._modules

    @property
    def holds_last(self) -> bool:
        return self.plan.num_stages - 1 in self._modules

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their original FQNs (a parameter shared by two stages once)."""
        seen: set[int] = set()
        for module in self._modules.values():
            for name, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield name, param

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    @property
    def info(self) -> dict[str, Any]:
        return {
            "rank": dist.get_rank(),
            "pp_rank": self.pp_rank,
            "pp": self.plan.pp,
            "schedule": self.plan.schedule,
            "placement": self.plan.placement,
            "microbatches": self.microbatches,
            "num_stages": self.plan.num_stages,
            "stages": [
                {
                    "index": index,
                    "modules": list(self.plan.stages[index].modules),
                    "params": sum(p.numel() for p in module.parameters()),
                }
                for index, module in self._modules.items()
            ],
        }

    # -- running -------------------------------------------------------------------------------
    def _runtime(self, microbatch_size: int, seq_len: int, train: bool) -> Any:
        key = (microbatch_size, seq_len, train)
        if key in self._runtimes:
            self._runtimes.move_to_end(key)
            return self._runtimes[key]
        hidden = self.adapter.boundary_width(self.config)
        vocab = int(self.adapter.text_config(self.config).vocab_size)
        stages = []
        for index, module in self._modules.items():
            spec = self.plan.stages[index]
            meta = dict(device="meta")
            # NOTE: static shapes spare the dummy forward torch would run to infer them; hidden
            # states (and logits) require grad, which tells the stage to exchange gradients.
            inputs = (
                torch.empty(microbatch_size, seq_len, dtype=torch.long, **meta)
                if spec.index == 0
                else torch.empty(
                    microbatch_size, seq_len, hidden, dtype=self.activation_dtype, requires_grad=train, **meta
                )
            )
            last = spec.index == self.plan.num_stages - 1
            outputs = torch.empty(
                microbatch_size,
                seq_len,
                vocab if last else hidden,
                dtype=self.activation_dtype,
                requires_grad=train,
                **meta,
            )
            stages.append(
                PipelineStage(
                    module,
                    spec.index,
                    self.plan.num_stages,
                    self.device,
                    input_args=(inputs,),
                    output_args=(outputs,),
                    group=self._pp_group,
                )
            )
        runtime = build_schedule(
            self.plan.schedule, stages, microbatches=self.microbatches, loss_fn=self._loss if train else None
        )
        self._runtimes[key] = runtime
        while len(self._runtimes) > _SHAPE_CACHE:
            self._runtimes.popitem(last=False)
        return runtime

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # NOTE: data-parallel gradient reduction averages over dp ranks; scaling by dp makes the
        # average the gradient of (this rank's token loss sum) / (global token count). Without
        # data parallelism the factor is 1 and left out (x * 1 == x: one autograd node less).
        loss = causal_lm_loss(logits, labels, self._num_tokens)
        return loss * self._dp_size if self._dp_size > 1 else loss

    @property
    def _vocab_size(self) -> int:
        return int(self.adapter.text_config(self.config).vocab_size)

    def _inputs(self, input_ids, attention_mask, position_ids) -> tuple[tuple, dict]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        check_batch(batch_size=batch, microbatches=self.microbatches)
        # NOTE: every rank of a pipeline gets the same batch, so every rank refuses it here, before
        # any communication; an id out of range would otherwise fail on the first rank only (or
        # read past the embedding on a GPU) while its peers wait in the schedule.
        check_tokens(input_ids, "input_ids", vocab_size=self._vocab_size)
        kwargs = {}
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq)}")
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if position_ids is not None:
            # NOTE: microbatching splits every kwarg along dim 0, so a shared (1, seq) row is expanded.
            kwargs["position_ids"] = position_ids.to(self.device).expand(batch, seq).contiguous()
        args = (input_ids.to(self.device),) if self.holds_first else ()
        return args, kwargs

    #: compare a hash of every rank's batch in each step / eval (see ``pipeline(check_batch=...)``)
    check_batch: bool = False

    def _agreed_inputs(
        self, what: str, input_ids, labels, attention_mask, position_ids, images: dict[str, Any] | None = None
    ) -> tuple[tuple, dict, int]:
        """This rank's checked inputs, once every rank has checked its own and they agree, and the
        global count of tokens to learn (this rank's labels' summed over its data-parallel peers).

        NOTE: a rank whose batch is refused still joins the exchange with its error, so its peers
        raise too instead of waiting in the schedule for it; ranks of one pipeline that pass
        different shapes (or, with ``check_batch``, different contents) are refused on every rank.
        The token count rides in the same exchange, so no collective of its own sums it over the
        data-parallel ranks.
        """
        error: Exception | None = None
        facts: list[int] = []
        try:
            args, kwargs = self._inputs(input_ids, attention_mask, position_ids)
            if self._vision_language:
                kwargs[TOKEN_IDS] = input_ids.to(self.device)
            if images:
                # NOTE: the vision tower runs here, before the exchange, so that a failure in it is
                # told to every rank instead of leaving them waiting in the schedule
                self._images = self._image_batch(
                    input_ids, attention_mask, images, train=labels is not None, positions=position_ids is None
                )
                kwargs.update(self._images.kwargs)
            tokens = 0
            if labels is not None:
                if tuple(labels.shape) != tuple(input_ids.shape):
                    raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
                check_tokens(labels, "labels", vocab_size=self._vocab_size, ignore_index=IGNORE_INDEX)
                tokens = count_label_tokens(labels)
            facts = [*input_ids.shape, labels is not None, attention_mask is not None, position_ids is not None]
            facts.append(tensor_digest(input_ids, labels, attention_mask, position_ids) if self.check_batch else 0)
            facts += [0] * (_TOKENS_FACT - len(facts)) + [tokens]
        except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here
            error = exc
        facts_seen = exchange(what, error, facts)

        def describe(v: list[int]) -> str:
            given = [n for n, f in zip(("labels", "attention_mask", "position_ids"), v[2:5], strict=True) if f]
            parts = [f"input_ids {(v[0], v[1])}", *given]
            return ", ".join(parts + ([f"content hash {v[5]:016x}"] if self.check_batch else []))

        # NOTE: the token count is not compared: without check_batch, ranks may pass different
        # labels of one shape, and each counts its own (summed over its data-parallel peers)
        check_same(facts_seen[:, :_TOKENS_FACT], self._batch_groups, what=what, describe=describe)
        self._check_length(input_ids.shape[1])
        return args, kwargs, int(facts_seen[self._dp_peers, _TOKENS_FACT].sum())

    #: whether this pipeline has warned of sequences longer than the model's positions
    _warned_length: bool = False

    def _check_length(self, seq_len: int) -> None:
        limit = getattr(self.adapter.text_config(self.config), "max_position_embeddings", None)
        if self._warned_length or not isinstance(limit, int) or seq_len <= limit:
            return
        self._warned_length = True
        warnings.warn(
            f"sequences of {seq_len} tokens are longer than the model's max_position_embeddings={limit}: the "
            "positions past it were never trained (and learned position embeddings have no entry for them); "
            f"cut or split the sequences to {limit} tokens at most. Warned once per pipeline",
            UserWarning,
            stacklevel=4,
        )

    @contextlib.contextmanager
    def _earlier_grads_set_aside(self) -> Iterator[None]:
        """Run a schedule on this step's gradients alone; earlier steps' go back in afterwards.

        Gradient accumulation must survive two things: the sums ppzoo adds after the schedule
        (tied copies over their two ranks, tp-replicated gradients over tp) would count earlier
        steps' gradients again, and torch clears the gradients of FSDP-sharded stages when a new
        schedule (a new batch shape, or the first ``eval``) infers its metadata.
        """
        earlier: dict[nn.Parameter, torch.Tensor] = {}
        if self._params is None:  # NOTE: a stage's parameters are set when it is built: listed once
            self._params = list(self.parameters())
        for param in self._params:
            if param.grad is not None:
                earlier[param] = param.grad
                param.grad = None
        try:
            yield
        finally:
            for param, grad in earlier.items():
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad += grad  # NOTE: a + b == b + a exactly: as if accumulated in place

    def _run(self, what: str, runtime: Any, *args: Any, **kwargs: Any) -> Any:
        """``runtime.step``; a failure inside it names the rank where it began (see :func:`ppzoo.agreement.schedule_failure`)."""
        try:
            return runtime.step(*args, **kwargs)
        except Exception as exc:
            error = schedule_failure(exc, what)
            if error is exc:
                raise
            raise error from exc

    def step(
        self,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **images: Any,
    ) -> torch.Tensor:
        """One training step over all microbatches; gradients accumulate in ``.grad``.

        Every rank of a pipeline passes the whole batch (with data parallelism: its data-parallel
        rank's part of the global batch). The loss is Hugging Face's: labels shifted inside,
        ``-100`` ignored, mean over the valid tokens of the whole (global) batch.

        A vision-language model also takes its family's image inputs, as its processor returns
        them (``pixel_values``, ``image_grid_thw``, ``image_sizes``, ``token_type_ids``, ...): the
        vision tower runs on the first stage's rank (:mod:`ppzoo.vision`).

        Returns:
            The global batch loss (a detached float32 scalar), the same on every rank. Without data
            parallelism it is a :class:`ppzoo.loss.PendingLoss`: its reduction over the pipeline's
            ranks may still run when ``step`` returns, and the first use of it waits for it.

        Raises:
            ValueError: this rank's batch is refused (ids, labels, shapes), or the ranks of one
                pipeline passed different batch shapes (or, with ``check_batch``, contents).
            ppzoo.agreement.RankError: another rank failed (naming it and its error), or the
                ranks are not all in ``step``; see docs/reliability.md.
        """
        self._settle_loss()
        # NOTE: train mode before the inputs: a vision tower runs while they are checked
        for module in self._modules.values():
            module.train()
        args, kwargs, self._num_tokens = self._agreed_inputs(
            "step", input_ids, labels, attention_mask, position_ids, images
        )
        if self._num_tokens == 0:
            raise ValueError("labels hold no token to predict (all -100 after the shift); the loss is undefined")
        runtime = self._runtime(input_ids.shape[0] // self.microbatches, input_ids.shape[1], train=True)
        losses: list[torch.Tensor] = []
        self._aux_loss.reset()
        # NOTE: return_outputs=False: training needs only the losses; keeping and concatenating
        # every microbatch's logits would cost vocab-sized memory and time on the last rank.
        with self._earlier_grads_set_aside():
            self._run(
                "step",
                runtime,
                *args,
                target=labels.to(self.device) if self.holds_last else None,
                losses=losses,
                return_outputs=False,
                **kwargs,
            )
            if self._images is not None:
                finish_images(self._images)
                self._images = None
            self._tied.sync_grads()
            self._sync_tp_replicated_grads()
        # NOTE: one all-reduce over the pipeline carries both the loss (the last stage's rank
        # gives it, the others zeros: x + 0 == x exactly) and every stage's auxiliary terms
        # (averaged over data-parallel ranks as their gradients are). Without data parallelism it
        # runs in the background: a rank whose part of the schedule is done returns at once (to its
        # optimizer step) instead of waiting for the last backward of another; the loss waits for
        # it when first read.
        parts = torch.zeros(2, dtype=torch.float32, device=self.device)
        if self.holds_last:
            parts[0] = torch.stack([part.detach().float() for part in losses]).sum() / self._dp_size
        parts[1] = self._aux_loss.total
        if self._dp_groups:
            dist.all_reduce(parts, group=self._pp_group)
            return self._dp_sum(parts[0] + parts[1] / self._dp_size)
        work = dist.all_reduce(parts, group=self._pp_group, async_op=True)
        self._pending = PendingLoss(parts, work, dp_size=self._dp_size)
        return self._pending

    #: this step's image features, whose gradient runs back through the vision tower after the schedule
    _images: ImageBatch | None = None
    #: whether the vision tower was frozen (``pipeline(freeze_vision=True)``)
    vision_frozen: bool = False

    @functools.cached_property
    def _vision_language(self) -> bool:
        return bool(self.adapter.image_modules(self.config))

    def _image_batch(
        self, input_ids, attention_mask, images: dict[str, Any], *, train: bool, positions: bool
    ) -> ImageBatch:
        first = self._modules.get(0)
        module = next(iter(self._modules.values()))
        return prepare_images(
            config=self.config,
            first=first,
            model=module,
            images=getattr(self.adapter, "image_modules", lambda config: ())(self.config),
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs=images,
            train=train,
            split_backward=schedule_kind(self.plan.schedule)[0] in SPLIT_BACKWARD,
            frozen=self.vision_frozen,
            positions=positions,
            device=self.device,
        )

    def _settle_loss(self) -> None:
        """Wait for the last step's loss reduction, if still in flight (before the next collective call)."""
        if self._pending is not None:
            self._pending.settle()
            self._pending = None

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (each holds its own part of the global batch)."""
        for group in self._dp_groups:
            dist.all_reduce(value, group=group)
        return value

    def _sync_tp_replicated_grads(self) -> None:
        # NOTE: a replicated parameter applied to tp-sharded activations (per-head q/k norms)
        # sees only its rank's heads: its gradient is partial until summed over tp.
        if self._tp_group is None:
            return
        for module in self._modules.values():
            for name in getattr(module, TP_GRAD_ALLREDUCE, ()):
                grad = module.get_parameter(name).grad
                if grad is not None:
                    grad = grad.to_local() if hasattr(grad, "to_local") else grad
                    dist.all_reduce(grad, group=self._tp_group)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, *, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of the whole model by their global norm (collective: every rank calls it).

        The norm is over every parameter of the model, across pipeline ranks, FSDP2 shards and
        tensor-parallel slices, each tied pair once: what ``torch.nn.utils.clip_grad_norm_`` gives
        on the unsplit model, and the gradients are scaled as it scales them. Call it after
        :meth:`step`, before the optimizer's step. See :mod:`ppzoo.grad_norm`.

        Returns:
            The total norm before clipping (a float32 scalar), the same on every rank.
        """
        from ppzoo.grad_norm import clip_grad_norm_

        return clip_grad_norm_(
            self.named_parameters(),
            max_norm,
            mesh=self.mesh,
            norm_type=norm_type,
            skip=self._tied.tied,
            error_if_nonfinite=error_if_nonfinite,
            device=self.device,
        )

    @torch.no_grad()
    def eval(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **images: Any,
    ) -> torch.Tensor | None:
        """A pipelined forward without gradients (image inputs as for :meth:`step`).

        Returns:
            The logits ``(batch, sequence, vocab)`` on the rank holding the last stage; None elsewhere.

        Raises:
            ValueError, ppzoo.agreement.RankError: as :meth:`step`.
        """
        self._settle_loss()
        # NOTE: eval mode before the inputs: a vision tower runs while they are checked
        for module in self._modules.values():
            module.eval()
        args, kwargs, _ = self._agreed_inputs("eval", input_ids, None, attention_mask, position_ids, images)
        self._images = None
        runtime = self._runtime(input_ids.shape[0] // self.microbatches, input_ids.shape[1], train=False)
        with self._earlier_grads_set_aside():
            out = self._run("eval", runtime, *args, **kwargs)
        return out if self.holds_last else None

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        microbatches: int | None = None,
        on_tokens: Any = None,
    ) -> torch.Tensor:
        """Generate continuations of ``input_ids`` (collective: every rank passes the same prompts).

        Each stage keeps its own KV cache; the prefill is one pipelined forward, then the batch's
        microbatches go through the stages a token at a time, so stages work concurrently, and a
        row stops at its eos token without holding up the others. Greedy decoding gives Hugging
        Face's ``model.generate(..., do_sample=False)`` of the unsplit model token for token; see
        :mod:`ppzoo.generation` and docs/generation.md.

        Args:
            input_ids: ``(batch, prompt)`` token ids, left-padded when prompts differ in length.
            attention_mask: ``(batch, prompt)``, 0 on padding; None: no padding.
            max_new_tokens: at most this many tokens per row.
            do_sample, temperature, top_k, top_p: as in Hugging Face's ``generate``; top_k and top_p
                left None take the checkpoint's ``generation_config.json`` values, then
                transformers' defaults (top_k=50 when sampling; pass 0 for none).
            eos_token_id: token id(s) that end a row; None: the checkpoint's.
            seed: seed of the sampling generator (the state ``torch.manual_seed(seed)`` gives);
                None: torch's default generator on the last stage's rank, as it is.
            microbatches: how many microbatches the batch is cut into (default: the number of
                stages, at most one row each).
            on_tokens: ``on_tokens(rows, tokens)``, called on every rank as tokens arrive (global
                row indices and their new ids), e.g. to stream text.

        Returns:
            ``(batch, prompt + generated)`` ids on every rank; rows that ended early are padded
            with the pad token (the eos token when the checkpoint has none), as Hugging Face pads them.

        Raises:
            ValueError: bad ids, shapes or settings; an adapter that does not support generation
                (named); a mesh with cp > 1. With data parallelism each replica generates the
                prompts its own ranks pass; with tensor parallelism a stage's ranks pass the same.
        """
        from ppzoo.generation import generate

        return generate(
            self,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            seed=seed,
            microbatches=microbatches,
            on_tokens=on_tokens,
        )

    # -- checkpoints ---------------------------------------------------------------------------
    #: the local directory the model was loaded from; save_pretrained copies its tokenizer files
    source: Path | None = None

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str = "50GB") -> Path:
        """Write a Hugging Face checkpoint of the current weights (collective); see :mod:`ppzoo.checkpoint.export`.

        ``max_shard_size`` (bytes, or ``"5GB"``-style) bounds each shard file, as in Hugging Face.
        """
        from ppzoo.checkpoint import save_pretrained

        return save_pretrained(
            self._modules,
            directory,
            adapter=self.adapter,
            config=self.config,
            mesh=self.mesh,
            dtype=self.dtype,
            source=self.source,
            max_shard_size=max_shard_size,
        )

    def save_state(self, directory: str | os.PathLike, optimizer: torch.optim.Optimizer, *, step: int) -> Path:
        """Save model, optimizer and step for resuming, under any split (collective); see :mod:`ppzoo.checkpoint.state`."""
        from ppzoo.checkpoint import save_state

        return save_state(self.stages, directory, optimizer, step=step, adapter=self.adapter, config=self.config)

    def load_state(self, directory: str | os.PathLike, optimizer: torch.optim.Optimizer) -> int:
        """Restore what :meth:`save_state` saved (collective); returns the saved step. See :mod:`ppzoo.checkpoint.state`."""
        from ppzoo.checkpoint import load_state

        return load_state(self.stages, directory, optimizer, adapter=self.adapter, config=self.config)


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
