"""The runtime: the ``Pipeline`` object users hold (``pipeline()``, in :mod:`ppzoo.build`, builds it on every rank)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining

from ppzoo.agreement import batch_groups, schedule_failure
from ppzoo.aux_loss import AuxLoss
from ppzoo.inputs import StepInputs
from ppzoo.loss import PendingLoss, causal_lm_loss
from ppzoo.parallelize import TP_GRAD_ALLREDUCE
from ppzoo.planner import Plan
from ppzoo.schedule import SPLIT_BACKWARD, build_schedule, schedule_kind
from ppzoo.tied import TiedWeights
from ppzoo.vision import ImageBatch, finish_images, prepare_images

__all__ = ["Pipeline", "PipelineStage"]

#: how many batch shapes keep their stages and schedules (each shape needs its own, see below)
_SHAPE_CACHE = 4


class PipelineStage(pipelining.PipelineStage):
    """torch's ``PipelineStage``, minus connection warm-up messages from a rank to itself.

    NOTE: some torch releases (2.11) warm up the point-to-point connections at the first step by
    exchanging a tensor with both neighbouring stages, even one on this very rank (V placement);
    gloo cannot send to its own rank, so those exchanges are left out. Stages on one rank pass
    their tensors directly, and torch releases that warm up otherwise never call this.
    """

    def _get_init_p2p_neighbors_ops(self) -> list:
        return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != self.group_rank]


class Pipeline(StepInputs):
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
