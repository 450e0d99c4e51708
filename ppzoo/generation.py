"""Generation under pipeline parallelism: each stage keeps its own KV cache, microbatches flow.

Every rank passes the same prompts and gets the same ids back. The batch is cut into microbatches
of consecutive rows; a microbatch's *slot* ``(t, m)`` is its step ``t`` (``t = 0`` the prefill
of the whole prompt, then one token a step). Slots run in a fixed wavefront that every rank
computes alike: stage ``s`` runs slot ``(t, m)`` at tick ``t·P + m + s`` with ``P = max(M, S)``
(``M`` microbatches, ``S`` stages), so with ``M ≥ S`` every stage works on another microbatch
at each tick, and a microbatch's next step starts as soon as its token is known. Hidden states go
point to point to the next stage's rank (or stay in the process when it holds that stage too);
the last stage samples and broadcasts each slot's tokens to the pipeline's ranks, which all keep
the ids, the attention mask and which rows are still generating. A row that has produced an eos
token leaves the computation: every stage drops it from its cache (``batch_select_indices``), and
the others go on.

What is exactly Hugging Face's:

- caches: one transformers ``DynamicCache(config=...)`` per stage and microbatch, holding only
  the stage's own layers (sliding-window layers get transformers' sliding caches); the stage's
  masks are sized by its own layers' caches (``layer_idx``), as the unsplit model's are by its first
  layer of each type;
- positions: ``cumsum(attention_mask) - 1`` over the prompt (0 on padding), then one more a step;
  an all-ones mask is dropped, as ``generate`` drops it;
- token choice: the last stage's ``GenerationMixin._get_logits_processor`` (temperature, top-k,
  top-p, and what the checkpoint's ``generation_config.json`` asks for), argmax when greedy;
  eos and the pad token finished rows get come from ``_prepare_special_tokens``;
- sampling: ``torch.multinomial(probs, 1)`` is ``argmax(probs / q)`` with
  ``q = torch.empty_like(probs).exponential_(1)``: ppzoo draws ``q`` for the whole batch once a
  step, from the same generator, in the same call, so it draws what ``generate`` draws.
  ``seed=s`` gives the generator the state ``torch.manual_seed(s)`` gives torch's default one;
  ``seed=None`` uses torch's default generator of the last stage's device as it is.

Data-parallel replicas each generate the prompts their own ranks pass; FSDP2-sharded stages are
gathered whole for the generation (:func:`_gathered`), so replicas need no collective while they
decode. Tensor-parallel ranks run their stage together, as in training, and take the token choice
of the last stage's first tensor-parallel rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["generate", "generate_chain", "generation_config"]

#: called on every rank as tokens arrive: ``on_tokens(rows, tokens)`` (global row indices, new ids)
TokenCallback = Callable[[torch.Tensor, torch.Tensor], None]


def generation_config(source: str | os.PathLike | None, config: Any, **explicit: Any) -> Any:
    """The ``GenerationConfig`` a generation runs with: the checkpoint's ``generation_config.json``
    (or the model config's defaults), then ``explicit`` values that are not None, then transformers'
    global defaults for what is still unset — what ``model.generate(**explicit)`` uses."""
    from transformers import GenerationConfig

    if source is not None and (Path(source) / "generation_config.json").is_file():
        base = GenerationConfig.from_pretrained(source)
    else:
        base = GenerationConfig.from_model_config(config)
    gc = GenerationConfig(**{k: v for k, v in explicit.items() if v is not None})
    gc.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
    gc.update(**base._get_default_generation_params(), defaults_only=True)
    return gc


@dataclasses.dataclass
class _Batch:
    """What every rank knows about the batch: ids so far, mask, positions, rows still generating."""

    ids: torch.Tensor  # (B, L + N), pad where nothing was generated
    mask: torch.Tensor | None  # (B, L + N) or None (no padding anywhere)
    positions: torch.Tensor  # (B, L): the prompt's position ids
    alive: torch.Tensor  # (B,) bool
    rows: list[torch.Tensor]  # each microbatch's global row indices
    length: int  # L
    steps: int = 0  # tokens generated so far (the longest row)


class _Decoder:
    """Runs the wavefront for the stages this process holds; the others are on ``stage_ranks``."""

    def __init__(
        self,
        modules: dict[int, nn.Module],
        *,
        num_stages: int,
        stage_ranks: Sequence[int],
        rank: int,
        group: Any,
        adapter: Any,
        config: Any,
        device: torch.device,
        activation_dtype: torch.dtype,
        gc: Any,
        generator: torch.Generator | None,
        tp_group: Any = None,
    ):
        self.modules, self.num_stages, self.stage_ranks = modules, num_stages, list(stage_ranks)
        self.tp_group = tp_group
        self.rank, self.group, self.device, self.dtype = rank, group, device, activation_dtype
        self.adapter, self.config, self.gc, self.generator = adapter, config, gc, generator
        self.hidden = adapter.boundary_width(config)
        self.last = num_stages - 1
        self.caches: dict[tuple[int, int], Any] = {}
        self.cache_rows: dict[tuple[int, int], torch.Tensor] = {}
        self.passed: dict[tuple[int, int], torch.Tensor] = {}  # (slot, stage) -> output for a stage here
        self.processors: dict[int, Any] = {}
        self.noise: tuple[int, torch.Tensor] | None = None

    # -- one slot on one stage -----------------------------------------------------------------
    def _inputs(self, batch: _Batch, t: int, rows: torch.Tensor):
        length = batch.length
        if t == 0:
            positions = batch.positions[rows]
            mask = None if batch.mask is None else batch.mask[rows, :length]
            ids = batch.ids[rows, :length]
        else:
            positions = batch.positions[rows, -1:] + t
            mask = None if batch.mask is None else batch.mask[rows, : length + t]
            ids = batch.ids[rows, length + t - 1 : length + t]
        return ids, mask, positions

    def _cache(self, stage: int, m: int, rows: torch.Tensor) -> Any:
        from transformers import DynamicCache

        key = (stage, m)
        if key not in self.caches:
            self.caches[key] = DynamicCache(config=self.adapter.text_config(self.config))
        else:
            held = self.cache_rows[key]
            if len(held) != len(rows):
                # NOTE: rows that finished leave the cache; the rest keep their order
                _keep_rows(self.caches[key], torch.isin(held, rows).nonzero().squeeze(1).to(self.device))
        self.cache_rows[key] = rows
        return self.caches[key]

    def _forward(self, stage: int, m: int, t: int, rows: torch.Tensor, x: torch.Tensor | None, batch: _Batch):
        ids, mask, positions = self._inputs(batch, t, rows)
        module = self.modules[stage]
        extra = {"logits_to_keep": 1} if stage == self.last else {}
        return module(
            ids.to(self.device) if stage == 0 else x,
            attention_mask=None if mask is None else mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=self._cache(stage, m, rows),
            **extra,
        )

    def _choose(self, m: int, t: int, logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """The next token of every row of microbatch ``m`` (pad for finished rows), as generate picks it."""
        rows = batch.rows[m]
        alive = batch.alive[rows]
        scores = torch.zeros(len(rows), logits.shape[-1], dtype=torch.float32, device=self.device)
        scores[alive.to(self.device)] = logits[:, -1].to(torch.float32)
        ids = batch.ids[rows, : batch.length + t].to(self.device)
        if m not in self.processors:
            lm = self.modules[self.last]
            self.processors[m] = lm._get_logits_processor(
                generation_config=self.gc,
                input_ids_seq_length=batch.length,
                encoder_input_ids=ids,
                device=self.device,
                model_kwargs={"attention_mask": None if batch.mask is None else batch.mask[rows, : batch.length]},
            )
        scores = self.processors[m](ids, scores)
        if self.gc.do_sample:
            if self.noise is None or self.noise[0] != t:
                # NOTE: what torch.multinomial(probs, 1) draws for the whole batch at this step
                shape = (batch.ids.shape[0], scores.shape[-1])
                q = torch.empty(shape, dtype=scores.dtype, device=self.device).exponential_(1, generator=self.generator)
                self.noise = (t, q)
            probs = nn.functional.softmax(scores, dim=-1)
            tokens = torch.argmax(probs / self.noise[1][rows.to(self.device)], dim=-1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        pad = self.gc._pad_token_tensor
        if pad is not None:
            tokens = torch.where(alive.to(self.device), tokens, pad.to(self.device))
        return tokens

    # -- bookkeeping every rank does alike -------------------------------------------------------
    def _record(self, m: int, t: int, tokens: torch.Tensor, batch: _Batch, max_new_tokens: int) -> torch.Tensor:
        rows = batch.rows[m]
        tokens = tokens.to(batch.ids.device)
        alive = batch.alive[rows]
        batch.ids[rows, batch.length + t] = tokens
        batch.steps = max(batch.steps, t + 1)
        eos = self.gc._eos_token_tensor
        done = torch.zeros_like(alive) if eos is None else torch.isin(tokens, eos.to(tokens.device))
        if t + 1 >= max_new_tokens:
            done[:] = True
        batch.alive[rows] = alive & ~done
        return rows[alive]

    def _peer(self, stage: int) -> int:
        return self.stage_ranks[stage]

    def run(
        self, batch: _Batch, *, microbatches: int, max_new_tokens: int, on_tokens: TokenCallback | None
    ) -> torch.Tensor:
        S, M, N = self.num_stages, microbatches, max_new_tokens
        period = max(M, S)
        mine = sorted(self.modules)
        pending_sends: list[Any] = []
        for tick in range((N - 1) * period + (M - 1) + (S - 1) + 1):
            if not bool(batch.alive.any()):
                break
            chosen: torch.Tensor | None = None
            sends: list[Any] = []
            for stage in mine:
                slot = tick - stage
                t, m = divmod(slot, period)
                if slot < 0 or m >= M or t >= N:
                    continue
                rows = batch.rows[m][batch.alive[batch.rows[m]]]
                if len(rows) == 0:
                    continue
                x = None
                if stage > 0:
                    if (slot, stage - 1) in self.passed:
                        x = self.passed.pop((slot, stage - 1))
                    else:
                        seq = batch.length if t == 0 else 1
                        x = torch.empty(len(rows), seq, self.hidden, dtype=self.dtype, device=self.device)
                        dist.irecv(x, group=self.group, group_src=self._peer(stage - 1)).wait()
                out = self._forward(stage, m, t, rows, x, batch)
                if stage == self.last:
                    chosen = self._choose(m, t, out, batch)
                    if self.tp_group is not None:
                        # NOTE: the tensor-parallel ranks of the last stage choose alike but for
                        # their generators (seed=None); the first one's choice is every one's
                        dist.broadcast(chosen, group=self.tp_group, group_src=0)
                elif stage + 1 in self.modules:
                    self.passed[(slot, stage)] = out
                else:
                    out = out.to(self.dtype).contiguous()
                    sends.append(dist.isend(out, group=self.group, group_dst=self._peer(stage + 1)))
            for work in pending_sends:
                work.wait()
            pending_sends = sends
            slot = tick - self.last
            t, m = divmod(slot, period)
            if slot < 0 or m >= M or t >= N or not bool(batch.alive[batch.rows[m]].any()):
                continue
            if self.group is not None:
                if chosen is None:
                    chosen = torch.empty(len(batch.rows[m]), dtype=torch.long, device=self.device)
                dist.broadcast(chosen, group=self.group, group_src=self._peer(self.last))
            fresh = self._record(m, t, chosen, batch, N)
            if on_tokens is not None:
                on_tokens(fresh, batch.ids[fresh, batch.length + t])
        for work in pending_sends:
            work.wait()
        return batch.ids[:, : batch.length + batch.steps]


def _keep_rows(cache: Any, index: torch.Tensor) -> None:
    """Keep rows ``index`` of every layer of ``cache``, in that order.

    NOTE: transformers' linear-attention layers (Mamba, gated delta net, short convolutions) have
    no ``batch_select_indices``; their ``reorder_cache`` selects the rows of every state (and a
    hybrid layer's keys and values), which is the same selection.
    """
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            layer.reorder_cache(index)
        else:
            layer.batch_select_indices(index)


def _prepare(input_ids, attention_mask, *, vocab_size: int, max_new_tokens: int, microbatches: int | None, pad):
    from ppzoo.inputs import check_tokens

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a (batch, sequence) tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
        )
    check_tokens(input_ids, "input_ids", vocab_size=vocab_size)
    batch_size, length = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, length):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch_size, length)}")
    m = min(batch_size, microbatches) if microbatches is not None else None
    if microbatches is not None and (isinstance(microbatches, bool) or not isinstance(microbatches, int) or m < 1):
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    input_ids = input_ids.cpu()
    if attention_mask is not None:
        attention_mask = attention_mask.cpu().long()
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        if bool((attention_mask == 1).all()):
            attention_mask = None  # NOTE: as generate: no padding, no mask
    else:
        positions = torch.arange(length).expand(batch_size, length)
    fill = int(pad) if pad is not None else 0
    ids = torch.full((batch_size, length + max_new_tokens), fill, dtype=torch.long)
    ids[:, :length] = input_ids
    mask = None
    if attention_mask is not None:
        mask = torch.ones(batch_size, length + max_new_tokens, dtype=torch.long)
        mask[:, :length] = attention_mask
    return ids, mask, positions.contiguous(), m


def _check_settings(max_new_tokens: int, do_sample: bool, temperature: float, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0: no top-k filtering), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _decode(
    modules: dict[int, nn.Module],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    adapter: Any,
    config: Any,
    source: Any,
    num_stages: int,
    stage_ranks: Sequence[int],
    rank: int,
    group: Any,
    device: torch.device,
    activation_dtype: torch.dtype,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | Sequence[int] | None,
    seed: int | None,
    microbatches: int | None,
    on_tokens: TokenCallback | None,
    tp_group: Any = None,
) -> torch.Tensor:
    problem = adapter.generation_problem(config)
    if problem is not None:
        raise ValueError(f"adapter {adapter.name!r} does not support generation yet: {problem}")
    _check_settings(max_new_tokens, do_sample, temperature, top_k, top_p)
    gc = generation_config(
        source,
        config,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
    )
    holder = modules[num_stages - 1] if num_stages - 1 in modules else next(iter(modules.values()))
    holder._prepare_special_tokens(gc, kwargs_has_attention_mask=attention_mask is not None, device=device)
    vocab = int(adapter.text_config(config).vocab_size)
    ids, mask, positions, m = _prepare(
        input_ids,
        attention_mask,
        vocab_size=vocab,
        max_new_tokens=max_new_tokens,
        microbatches=microbatches,
        pad=gc._pad_token_tensor,
    )
    m = m if m is not None else min(ids.shape[0], num_stages)
    rows = [part for part in torch.arange(ids.shape[0]).tensor_split(m) if len(part)]
    batch = _Batch(
        ids=ids,
        mask=mask,
        positions=positions,
        alive=torch.ones(ids.shape[0], dtype=torch.bool),
        rows=rows,
        length=input_ids.shape[1],
    )
    generator = None
    if num_stages - 1 in modules and do_sample:
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else _default_generator(device)
    decoder = _Decoder(
        modules,
        num_stages=num_stages,
        stage_ranks=stage_ranks,
        rank=rank,
        group=group,
        adapter=adapter,
        config=config,
        device=device,
        activation_dtype=activation_dtype,
        gc=gc,
        generator=generator,
        tp_group=tp_group,
    )
    training = {module: module.training for module in modules.values()}
    for module in modules.values():
        module.eval()
    try:
        with torch.no_grad(), _gathered(modules):
            return decoder.run(batch, microbatches=len(rows), max_new_tokens=max_new_tokens, on_tokens=on_tokens)
    finally:
        for module, was in training.items():
            module.train(was)


@contextlib.contextmanager
def _gathered(modules: dict[int, nn.Module]):
    """The stages' FSDP2-sharded parameters gathered whole for the generation, sharded again after.

    NOTE: gathered once, together by every rank of the shard group (the same stages in the same
    order); ppzoo shards with ``reshard_after_forward=False``, so no forward gathers again, and each
    data-parallel replica decodes its own prompts, at its own pace, with no collective among them.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for module in modules.values() for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    return torch.get_device_module(device.type).default_generators[device.index or 0]


def generate(
    pipe: Any,
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
    on_tokens: TokenCallback | None = None,
) -> torch.Tensor:
    """Generate with ``pipe`` (collective: every rank of the pipeline passes the same prompts).

    See :meth:`ppzoo.Pipeline.generate`.
    """
    from ppzoo.agreement import batch_groups, check_same, exchange

    mesh = pipe.mesh
    error: Exception | None = None
    facts: list[int] = []
    try:
        if mesh["cp"].size() > 1:
            raise ValueError(
                f"generation decodes one token a step, which cp={mesh['cp'].size()} (context parallelism) "
                "cannot split over ranks; generate from a pipeline built with cp=1"
            )
        problem = pipe.adapter.generation_problem(pipe.config)
        if problem is not None:
            raise ValueError(f"adapter {pipe.adapter.name!r} does not support generation yet: {problem}")
        _check_settings(max_new_tokens, do_sample, temperature, top_k, top_p)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a (batch, sequence) tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
            )
        facts = [*input_ids.shape, max_new_tokens, attention_mask is not None, do_sample, microbatches or 0]
    except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here
        error = exc
    # NOTE: every rank of a pipeline must pass the same prompts and settings: a rank that refuses
    # them tells the others instead of leaving them waiting in the first exchange of hidden states
    seen = exchange("generate", error, facts)
    check_same(
        seen,
        batch_groups(mesh),
        what="generate",
        describe=lambda v: (
            f"input_ids {(v[0], v[1])}, max_new_tokens {v[2]}, mask {bool(v[3])}, "
            f"do_sample {bool(v[4])}, microbatches {v[5] or None}"
        ),
    )
    group = pipe._pp_group
    ranks = [spec.rank for spec in pipe.plan.stages]
    return _decode(
        pipe._modules,
        input_ids,
        attention_mask,
        adapter=pipe.adapter,
        config=pipe.config,
        source=pipe.source,
        num_stages=pipe.plan.num_stages,
        stage_ranks=ranks,
        rank=pipe.pp_rank,
        group=group if pipe.plan.pp > 1 else None,
        device=pipe.device,
        activation_dtype=pipe.activation_dtype,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        seed=seed,
        microbatches=microbatches,
        on_tokens=on_tokens,
        tp_group=mesh["tp"].get_group() if mesh["tp"].size() > 1 else None,
    )


def generate_chain(
    stages: Sequence[nn.Module],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    adapter: Any,
    config: Any,
    source: str | os.PathLike | None = None,
    max_new_tokens: int,
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`generate` for stages 0 → last held in one process (no process group), e.g. the
    conformance kit's; ``kwargs`` are :meth:`ppzoo.Pipeline.generate`'s."""
    device = next(stages[0].parameters()).device
    dtype = next(stages[0].parameters()).dtype
    return _decode(
        dict(enumerate(stages)),
        input_ids,
        attention_mask,
        adapter=adapter,
        config=config,
        source=source,
        num_stages=len(stages),
        stage_ranks=[0] * len(stages),
        rank=0,
        group=None,
        device=device,
        activation_dtype=dtype,
        max_new_tokens=max_new_tokens,
        **{**_DEFAULTS, **kwargs},
    )


#: :func:`generate`'s defaults, for :func:`generate_chain`
_DEFAULTS = dict(
    do_sample=False,
    temperature=1.0,
    top_k=None,
    top_p=None,
    eos_token_id=None,
    seed=None,
    microbatches=None,
    on_tokens=None,
)
