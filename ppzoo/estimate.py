"""Memory and bubble estimates for a plan: activations, training state, idle time.

Small pure functions of the numbers they need, plus :func:`estimate_plan`, which applies them to
every stage of a :class:`~ppzoo.planner.Plan`. They are estimates to size a run, not measurements.

Activations follow Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer
Models", 2022), who count ``s·b·h·(34 + 5·a·s/h)`` bytes per GPT layer in fp16. For a Llama-style
layer (pre-norm, gated MLP, grouped-query attention, no dropout) the tensors autograd keeps per
token are: both norms' inputs and outputs (4h), q, k and v (h_q + 2·h_kv), the attention output
(h_q), the MLP's gate, up, activated gate and product (4·I), each counted once at the activation
dtype's width ``e``, plus the attention probabilities (``a·s`` per token) unless a fused kernel
(flash / memory-efficient SDPA) replaces them by a per-head log-sum-exp in fp32::

    layer bytes = s·b·( e·(4h + 2·h_q + 2·h_kv + 4·I) + (e·a·s  or  4·a if fused) )

A non-gated MLP (GPT-2, OPT, BLOOM, Falcon) keeps its up projection and its activation: ``2·I``
instead of ``4·I``. For a GPT layer (I = 4h, h_q = h_kv = h) that gives 16·h + a·s elements per
token: Korthikanti's count without dropout; a gated MLP of the same width adds two I-wide
tensors (8·h). The widths come from each layer's own parameters, measured on the meta device
(:meth:`ppzoo.Adapter.layer_shape`), so fused or split projections, multi-query, grouped-query
and multi-head attention need no config names. The embedding adds
nothing (its output is the first layer's saved input); every stage but the last holds its output
(``e·h``), which the runtime keeps for the backward, a stage of only the embedding too; the last
adds the final norm (``2·e·h``), the logits (``e·V``) and the loss's fp32 log-probabilities
(``4·V``), per token. MoE layers count ``I`` as top-k experts' widths
plus any shared expert; the dense layers of a MoE model (DeepSeek's first layers) their own width.

The bubble is the idle fraction of a step when every stage costs the same and communication is
free: ``(pp − 1) / (k·m + pp − 1)`` with ``m`` microbatches, where ``k`` is the number of equal
pieces one microbatch's work on a rank is cut into: 1 for GPipe and 1F1B, ``v`` (stages per rank)
for Interleaved1F1B (Narayanan et al. 2021), ``3·v`` for the zero-bubble schedules, whose
backward splits into input and weight gradients (forward = input grad = weight grad; this is
what a step-by-step simulation of torch's own ZBVZeroBubble and InterleavedZeroBubble orders
gives, for ZBV once ``m ≥ 2·pp − 1``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ppzoo.layout import LayerShape

__all__ = [
    "StageEstimate",
    "bubble_fraction",
    "layer_activation_bytes",
    "stage_activation_bytes",
    "training_state_bytes",
    "estimate_plan",
]

#: schedules whose bubble is modelled
_MODELLED = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


def bubble_fraction(schedule: str, *, pp: int, microbatches: int, stages_per_rank: int = 1) -> float | None:
    """Idle fraction of a step for balanced stages and free communication; None when not modelled.

    ``(pp − 1) / (k·m + pp − 1)``: ``k`` = 1 for GPipe / 1F1B, ``stages_per_rank`` for
    Interleaved1F1B, ``3 × stages_per_rank`` for InterleavedZeroBubble and ZBVZeroBubble (for ZBV
    only once ``microbatches ≥ 2·pp − 1``: torch pads fewer to that many). LoopedBFS, DualPipeV
    and CSV schedules return None.
    """
    from ppzoo.schedule import schedule_kind

    try:
        name, _ = schedule_kind(schedule)
    except ValueError:
        return None
    if name not in _MODELLED or microbatches < 1 or pp < 1:
        return None
    if name == "ZBVZeroBubble" and microbatches < 2 * pp - 1:
        return None
    if name in ("GPipe", "1F1B"):
        k = 1
    elif name == "Interleaved1F1B":
        k = stages_per_rank
    else:  # NOTE: forward, input grad and weight grad of each stage are separate pieces
        k = 3 * stages_per_rank
    return (pp - 1) / (k * microbatches + pp - 1)


def layer_activation_bytes(
    *,
    hidden: int,
    kv_hidden: int,
    intermediate: int,
    heads: int,
    seq_len: int,
    microbatch_size: int = 1,
    element_bytes: int = 2,
    fused_attention: bool = False,
    q_hidden: int | None = None,
    gated: bool = True,
) -> int:
    """Bytes one decoder layer keeps for its backward, per microbatch (formula in the module doc).

    Args:
        hidden: hidden size ``h``.
        kv_hidden: key/value width ``h_kv`` (kv heads × head dim; ``h`` without grouped queries).
        intermediate: the MLP's width ``I`` (top-k experts' widths summed for MoE).
        heads: attention heads ``a``.
        seq_len: sequence length ``s``.
        microbatch_size: sequences per microbatch ``b``.
        element_bytes: activation element width ``e`` (2 for bf16/fp16, 4 for fp32).
        fused_attention: a fused kernel keeps a log-sum-exp per head, not the ``s×s`` probabilities.
        q_hidden: query width ``h_q`` (heads × head dim); default ``hidden``; 0 without attention.
        gated: the MLP multiplies a gate by an up projection (``4·I`` kept), else ``2·I``.
    """
    q_hidden = hidden if q_hidden is None else q_hidden
    mlp = (4 if gated else 2) * intermediate
    per_token = element_bytes * (4 * hidden + 2 * q_hidden + 2 * kv_hidden + mlp)
    per_token += 4 * heads if fused_attention else element_bytes * heads * seq_len
    return seq_len * microbatch_size * per_token


def stage_activation_bytes(
    *,
    layer_bytes: int,
    layers: int,
    first: bool,
    last: bool,
    hidden: int,
    vocab: int,
    seq_len: int,
    microbatch_size: int = 1,
    element_bytes: int = 2,
) -> int:
    """Bytes a stage keeps per microbatch in flight: its layers plus its ends (see the module doc)."""
    tokens = seq_len * microbatch_size
    extra = 0
    if last:
        extra = tokens * (element_bytes * (2 * hidden + vocab) + 4 * vocab)
    else:  # NOTE: the runtime keeps a stage's output for its backward, an embedding-only stage's too
        extra = tokens * element_bytes * hidden
    del first  # NOTE: the embedding's output is the first layer's saved input, or the stage's output
    return layers * layer_bytes + extra


def training_state_bytes(
    params: int, *, param_bytes: int, grad_bytes: int | None = None, optimizer_states: int = 2, state_bytes: int = 4
) -> int:
    """Parameters + gradients + optimizer states: ``params × (param + grad + states × state)``.

    The default is AdamW with two fp32 states per parameter (mixed-precision practice; torch's
    ``AdamW`` on bf16 parameters keeps its states in bf16, ``state_bytes=2``).
    """
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    return params * (param_bytes + grad_bytes + optimizer_states * state_bytes)


@dataclass(frozen=True)
class StageEstimate:
    index: int
    rank: int
    activation_bytes_per_microbatch: int
    training_state_bytes: int


def _moe_width(cfg: Any) -> int | None:
    """The MLP width one token passes through in a MoE layer (top-k experts plus any shared
    expert), from the config: fused 3-D expert parameters do not show which experts a token uses."""
    from ppzoo.architectures.moe import expert_counts

    if not expert_counts(cfg):
        return None
    top_k = int(getattr(cfg, "num_experts_per_tok", None) or 1)
    width = getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", None)
    if width is None:
        return None
    shared = getattr(cfg, "shared_expert_intermediate_size", None) or getattr(
        cfg, "moe_shared_expert_intermediate_size", None
    )
    if shared is None:  # NOTE: DeepSeek, GLM-4.5: n_shared_experts experts of the routed width
        shared = int(getattr(cfg, "n_shared_experts", 0) or 0) * int(width)
    return top_k * int(width) + int(shared)


def _has_routed_experts(layer: Any) -> bool:
    """Whether ``layer`` holds routed experts (matrices under a module named ``experts``).

    NOTE: dense layers of a MoE model (DeepSeek's first ``first_k_dense_replace``, Llama 4's
    interleaved dense layers, Jamba's and Nemotron-H's non-expert layers) keep their own width.
    """
    return any(".experts." in f".{n}" and p.dim() >= 2 for n, p in layer.named_parameters())


def _layer_bytes(shape: LayerShape, moe_width: int | None, **kwargs: Any) -> int:
    return layer_activation_bytes(
        hidden=shape.hidden,
        q_hidden=shape.q_width,
        kv_hidden=shape.kv_width,
        intermediate=moe_width if moe_width is not None else shape.mlp_width,
        gated=True if moe_width is not None else shape.gated,
        heads=shape.heads,
        **kwargs,
    )


def estimate_plan(
    plan: Any,
    config: Any,
    *,
    seq_len: int,
    microbatch_size: int = 1,
    microbatches: int | None = None,
    fused_attention: bool = False,
) -> dict[str, Any]:
    """Per-stage activation and training-state bytes, and the schedule's bubble, for ``plan``.

    Activations are taken at the plan's parameter dtype; AdamW with two fp32 states.

    Args:
        plan: a :class:`~ppzoo.planner.Plan`.
        config: the config the plan was made from.
        seq_len: sequence length.
        microbatch_size: sequences per microbatch.
        microbatches: microbatches per step (default: the number of stages, as ``ppzoo.pipeline``).
        fused_attention: attention kernels that keep no ``s×s`` probabilities.

    Returns:
        A JSON-ready dict: the inputs, ``bubble_fraction`` (None when not modelled) and ``stages``.
    """
    from ppzoo import registry
    from ppzoo.dtypes import parse_dtype
    from ppzoo.meta import meta_model

    adapter = registry.adapter_for(config)
    cfg = adapter.text_config(config)
    hidden = int(cfg.hidden_size)
    element = parse_dtype(plan.dtype).itemsize
    microbatches = plan.num_stages if microbatches is None else microbatches
    model = meta_model(config)
    moe_width = _moe_width(cfg)
    common = dict(
        seq_len=seq_len, microbatch_size=microbatch_size, element_bytes=element, fused_attention=fused_attention
    )
    # NOTE: layers of one model may differ (attention-free or dense-then-MoE layers); equal shapes
    # are computed once.
    by_shape: dict[tuple[LayerShape, bool], int] = {}
    by_layer: dict[tuple, int] = {}  # NOTE: layers of one class and parameter shapes measure alike
    per_layer = []
    for index in range(plan.layout.num_layers):
        layer = model.get_submodule(plan.layout.layer(index))
        key = (type(layer), tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()))
        if key not in by_layer:
            shape = adapter.layer_shape(config, layer)
            routed = moe_width is not None and _has_routed_experts(layer)
            if (shape, routed) not in by_shape:
                by_shape[shape, routed] = _layer_bytes(shape, moe_width if routed else None, **common)
            by_layer[key] = by_shape[shape, routed]
        per_layer.append(by_layer[key])
    stages = [
        StageEstimate(
            index=s.index,
            rank=s.rank,
            activation_bytes_per_microbatch=stage_activation_bytes(
                layer_bytes=sum(per_layer[i] for i in s.layers),
                layers=1,
                first=s.index == 0,
                last=s.index == plan.num_stages - 1,
                hidden=hidden,
                vocab=int(cfg.vocab_size),
                seq_len=seq_len,
                microbatch_size=microbatch_size,
                element_bytes=element,
            ),
            training_state_bytes=training_state_bytes(s.params, param_bytes=element),
        )
        for s in plan.stages
    ]
    return {
        "seq_len": seq_len,
        "microbatch_size": microbatch_size,
        "microbatches": microbatches,
        "fused_attention": fused_attention,
        "optimizer": "AdamW, 2 fp32 states",
        "bubble_fraction": bubble_fraction(
            plan.schedule, pp=plan.pp, microbatches=microbatches, stages_per_rank=plan.stages_per_rank
        ),
        "stages": [asdict(e) for e in stages],
    }
