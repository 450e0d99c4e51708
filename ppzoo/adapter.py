"""The ``Adapter`` base class: what an architecture must and may supply.

An adapter says how a Hugging Face causal LM is laid out (input modules, the repeated layer
container, output modules) and how one pipeline stage runs: embed (first stage only), build masks
and rotary embeddings from ``attention_mask`` / ``position_ids``, run the stage's layers, then
norm and head (last stage only). Only ``hidden_states`` cross a stage boundary.

The defaults fit Llama; an architecture that looks like Llama is a subclass with a few overrides.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ppzoo import layer_inputs
from ppzoo.capabilities import Capability, parse_capabilities
from ppzoo.layout import FULL, SLIDING, LayerShape, Layout, measure_layer
from ppzoo.validation import Problem

__all__ = ["Adapter", "KeyMap", "encoder_decoder_problems"]


@dataclass(frozen=True)
class KeyMap:
    """Checkpoint key ⇄ module FQN conversion that transformers' own rules do not describe.

    The default is the identity, and then ppzoo loads and saves through transformers' conversion
    rules (renamed keys, per-expert tensors fused into one parameter, the base model's prefix: see
    :mod:`ppzoo.checkpoint.conversion`). A key map is asked first: where :meth:`sources` answers
    anything but ``[fqn]``, its keys (checkpoint keys, or parameters transformers' rules convert
    to) are read and :meth:`combine` builds the parameter; where :meth:`split` answers other keys
    than ``fqn``, those are written. ``rules`` maps a parameter FQN pattern (``{}`` stands for the
    layer index, ``{e}`` for an expert index) to the checkpoint keys it is built from.
    """

    rules: dict[str, str] = field(default_factory=dict)

    def sources(self, fqn: str, available: Callable[[str], bool]) -> list[str]:
        """Checkpoint keys that hold ``fqn`` (``available(key)`` says whether the checkpoint has a key)."""
        return [fqn]

    def combine(self, fqn: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Build the parameter ``fqn`` from the tensors read for :meth:`sources`."""
        (tensor,) = tensors
        return tensor

    def split(self, fqn: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Checkpoint tensors for the parameter ``fqn`` (the inverse of :meth:`combine`)."""
        return {fqn: tensor}


def encoder_decoder_problems(config: Any) -> list[Problem]:
    """The problem an encoder-decoder config poses to any adapter (ppzoo pipelines decoders only)."""
    if not getattr(config, "is_encoder_decoder", False):
        return []
    return [
        Problem(
            "encoder-decoder",
            f"{config.model_type} is an encoder-decoder model; ppzoo pipelines decoder-only causal LMs",
        )
    ]


class Adapter:
    """How ppzoo pipelines one family of architectures. Subclass and override what differs."""

    #: short unique name, shown in ``ppzoo list`` and errors
    name: str = "base"
    #: ``config.model_type`` values this adapter handles
    model_types: tuple[str, ...] = ()
    #: ``config.architectures`` entries this adapter handles (matched after model types)
    architectures: tuple[str, ...] = ()
    #: declared features (:class:`~ppzoo.capabilities.Capability` members): which conformance checks
    #: apply, and what the tiny config must exercise; an unknown name fails when the class is defined
    capabilities: frozenset[Capability] = frozenset()
    #: a fallback adapter is tried last, for any config its :meth:`matches` accepts
    fallback: bool = False
    #: conformance checks known to fail, ``{check name: reason}``: ``ppzoo check``, ``check_adapter``
    #: and the pytest plugin report them as expected failures (strict: a pass is a failure)
    expected_failures: Mapping[str, str] = types.MappingProxyType({})

    # Attribute names; the defaults are Llama's.
    inner_name = "model"
    embed_name = "embed_tokens"
    layers_name = "layers"
    norm_name = "norm"
    head_name = "lm_head"
    rotary_name = "rotary_emb"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "capabilities" in cls.__dict__:
            cls.capabilities = parse_capabilities(cls.__dict__["capabilities"], owner=f"{cls.__name__}.capabilities")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- discovery ---------------------------------------------------------------------------
    def matches(self, config: Any) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    def text_config(self, config: Any) -> Any:
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def boundary_width(self, config: Any) -> int:
        """The last dimension of what one stage hands the next, ``(microbatch, seq, width)``:
        ``hidden_size``, unless the adapter carries more across the boundary with the hidden states."""
        return int(self.text_config(config).hidden_size)

    def image_modules(self, config: Any) -> tuple[str, ...]:
        """A vision-language model's image modules (vision tower, projector), inputs of the first
        stage that only images reach (:mod:`ppzoo.vision`), and the parameters outside them that
        only images reach (LLaVA-NeXT's ``image_newline``); ``()`` for a text-only model."""
        return ()

    # -- layout ------------------------------------------------------------------------------
    def fqn_layout(self, config: Any) -> Layout:
        p = self.inner_name
        return Layout(
            inputs=(f"{p}.{self.embed_name}",),
            layers=f"{p}.{self.layers_name}",
            num_layers=int(self.text_config(config).num_hidden_layers),
            outputs=(f"{p}.{self.norm_name}", self.head_name),
            # NOTE: rotary_name = None: the model has no rotary embedding (learned or ALiBi positions)
            shared=(f"{p}.{self.rotary_name}",) if self.rotary_name is not None else (),
        )

    def layer_types(self, config: Any) -> list[str]:
        """Attention type of each layer (``"full_attention"`` / ``"sliding_attention"``)."""
        cfg = self.text_config(config)
        types_ = getattr(cfg, "layer_types", None)
        return list(types_) if types_ else [FULL] * int(cfg.num_hidden_layers)

    def tied_weights(self, config: Any) -> dict[str, str]:
        """Tied parameters as ``{copy_fqn: source_fqn}``: a head on the last stage tied to the embedding
        (here), or a block several layers share (each later layer's copy tied to the first's). Every
        stage holding a copy loads it from the source's checkpoint keys; :mod:`ppzoo.tied` sums the
        gradients of a source and its copies over the stages that hold them."""
        if getattr(self.text_config(config), "tie_word_embeddings", False) or getattr(
            config, "tie_word_embeddings", False
        ):
            return {f"{self.head_name}.weight": f"{self.inner_name}.{self.embed_name}.weight"}
        return {}

    def tp_plan(self, config: Any) -> dict[str, str]:
        """Tensor-parallel styles by module FQN pattern; default: transformers' ``base_model_tp_plan``."""
        plan = getattr(self.text_config(config), "base_model_tp_plan", None) or {}
        return {f"{self.inner_name}.{pattern}": style for pattern, style in plan.items()}

    def key_map(self, config: Any) -> KeyMap:
        return KeyMap()

    def layer_shape(self, config: Any, layer: nn.Module) -> LayerShape:
        """The widths of ``layer`` (a meta-device decoder layer) that ``ppzoo plan``'s cost and
        memory estimates use; the default measures its parameters (:func:`ppzoo.layout.measure_layer`)."""
        cfg = self.text_config(config)
        return measure_layer(layer, hidden=int(cfg.hidden_size), heads=int(getattr(cfg, "num_attention_heads", 0) or 0))

    def active_matrix_params(self, config: Any, layer: nn.Module, matrix_params: int) -> int:
        """Matrix weights one token multiplies in ``layer`` (MoE adapters count only routed experts)."""
        return matrix_params

    def aux_loss(self, config: Any, stages: Sequence[nn.Module], attention_mask=None) -> torch.Tensor | None:
        """What the CausalLM forward adds to the LM loss besides cross-entropy, from ``stages``' last forward.

        None when it adds nothing (the default). MoE adapters return the weighted router
        load-balancing loss, from what each stage recorded during its forward (see
        ``ppzoo.architectures.moe``). Add the result to the LM loss.
        """
        return None

    # -- validation --------------------------------------------------------------------------
    def validate(self, config: Any, plan: Any = None) -> list[Problem]:
        """Every reason ``config`` cannot run under ``plan`` (None before the split); empty when it can.

        ppzoo's own rules (:mod:`ppzoo.rules`) call it for every validation. Return one
        :class:`~ppzoo.validation.Problem` per reason, with a stable code: the base class's codes
        are in :data:`ppzoo.validation.CODES`; an adapter's own start with its name.
        """
        problems = encoder_decoder_problems(config)
        cfg = self.text_config(config)
        known = {FULL, SLIDING}
        unknown = sorted(set(self.layer_types(config)) - known)
        if unknown:
            problems.append(
                Problem(
                    "unknown-layer-type",
                    f"layer_types {unknown} are not supported by adapter {self.name!r} (known: {sorted(known)})",
                )
            )
        if SLIDING in self.layer_types(config) and not getattr(cfg, "sliding_window", None):
            problems.append(
                Problem(
                    "sliding-window-unset", "layer_types has sliding_attention layers but sliding_window is not set"
                )
            )
        return problems

    def validation_cases(self) -> list[tuple[Any, str]]:
        """``(config, code)`` pairs: configs this adapter's own rules reject, each with the code of
        one problem :meth:`validate` reports for it. The conformance kit proves each rule fires;
        the base class's rules are checked without being listed here."""
        return []

    # -- build ---------------------------------------------------------------------------------
    def init_buffers(self, model: nn.Module, module: nn.Module) -> None:
        """Re-create the non-persistent buffers of ``module`` (RoPE ``inv_freq``, embedding scales).

        Called after meta init and before weights are loaded, so it may also touch parameters.
        The default asks the model's own ``_init_weights``, which knows its buffers.
        """
        model._init_weights(module)

    def tiny_config(self) -> Any:
        """A tiny config for tests (hidden 32-64, 2-4 heads, vocab ~100, >= 8 layers)."""
        raise NotImplementedError(f"adapter {self.name!r} has no tiny_config()")

    # -- stage forward pieces ------------------------------------------------------------------
    def embed(
        self, inner: nn.Module, input_ids: torch.Tensor, *, position_ids=None, attention_mask=None
    ) -> torch.Tensor:
        """The first stage's hidden states from ``input_ids``.

        ``position_ids`` and ``attention_mask`` are what the step was given (None when the caller
        passed none), for learned absolute positions (GPT-2 adds ``wpe(position_ids)``; OPT
        derives positions from the mask). An override with the older signature
        ``embed(self, inner, input_ids)`` is still called, without them.
        """
        return getattr(inner, self.embed_name)(input_ids)

    def masks(
        self, inner: nn.Module, hidden: torch.Tensor, attention_mask, position_ids, needed: set[str], *, cache=None
    ) -> dict:
        """One mask per layer type in ``needed``; with a ``cache`` (generation), over the cached keys too.

        Without a cache, the masks of the stage's last forward are handed out again when they would
        be rebuilt from the same inputs (:mod:`ppzoo.layer_inputs`): the same tensors, bit for bit.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        from ppzoo import stage  # NOTE: imported here: the stage module imports the planner, which imports this one

        fns = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
        if cache is None:

            def build() -> dict:
                return {t: stage.build_mask(fns[t], inner.config, hidden, attention_mask, position_ids) for t in needed}

            # NOTE: the last microbatch's masks when they would be rebuilt from the same inputs (ppzoo.layer_inputs)
            functions = (create_causal_mask, create_sliding_window_causal_mask, stage.build_mask)
            return layer_inputs.masks(inner, hidden, attention_mask, position_ids, needed, build, functions=functions)
        # NOTE: the mask is sized by the cache of one of this stage's own layers of its type; the
        # cache's other layers (other stages') stay empty
        kinds = self.layer_types(inner.config)
        own = [int(i) for i in getattr(inner, self.layers_name).keys()]
        first = {t: next(i for i in own if kinds[i] == t) for t in needed}
        return {
            t: stage.build_mask(
                fns[t], inner.config, hidden, attention_mask, position_ids, cache=cache, layer_idx=first[t]
            )
            for t in needed
        }

    def position_embeddings(self, inner: nn.Module, hidden: torch.Tensor, position_ids, needed: set[str]) -> dict:
        """One RoPE table (``(cos, sin)``) per layer type in ``needed``, from the inner model's rotary
        module; the last forward's tables when they would be recomputed from the same positions
        and rotary state (:mod:`ppzoo.layer_inputs`)."""
        if self.rotary_name is None:
            return dict.fromkeys(needed)  # NOTE: no rotary embedding: layers get position_embeddings=None
        rotary = getattr(inner, self.rotary_name)

        def compute() -> dict:
            rope = rotary(hidden, position_ids=position_ids)
            return {t: rope for t in needed}

        # NOTE: the last microbatch's tables when they would be rebuilt from the same inputs (ppzoo.layer_inputs)
        return layer_inputs.position_embeddings(inner, rotary, hidden, position_ids, needed, compute)

    def call_layer(
        self, layer: nn.Module, hidden: torch.Tensor, *, mask, position_embeddings, position_ids, cache=None
    ) -> torch.Tensor:
        # NOTE: keyword arguments only: some families put position_embeddings second. The cache
        # (generation only) is passed only when there is one, as the model's own forward does.
        cached = {} if cache is None else {"cache": cache}
        out = layer(
            hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings, **cached
        )
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, inner: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(inner, self.norm_name)(hidden)

    def logits(self, lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(lm, self.head_name)(hidden)

    def generation_problem(self, config: Any) -> str | None:
        """Why stages of ``config`` cannot generate (keep a KV cache each); None when they can.

        The default needs ppzoo's stage forward (:meth:`patch_inner_forward` not overridden) and
        :meth:`masks` / :meth:`call_layer` that take the ``cache`` keyword (an override written
        before generation existed does not). Override to refuse a family whose layers need more
        than a transformers ``Cache`` per stage.
        """
        import inspect

        if type(self).patch_inner_forward is not Adapter.patch_inner_forward:
            return f"{type(self).__name__} patches the inner forward itself, so ppzoo cannot give its layers a KV cache"
        for method in ("masks", "call_layer"):
            params = inspect.signature(getattr(self, method)).parameters
            if "cache" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return f"{type(self).__name__}.{method} takes no cache argument"
        return None

    # -- forward patches -----------------------------------------------------------------------
    def prune_to_stage(self, model: nn.Module, layout: Layout, stage: Any, *, config: Any) -> None:
        """Turn the whole meta-device ``model`` into the pipeline stage ``stage`` (a ``StagePlan``).

        The default drops every module the stage does not hold and keeps its layers in a
        ``ModuleDict`` by original index (:func:`ppzoo.stage.prune`); an adapter that runs the
        model's own forward keeps stand-ins instead (see ``ppzoo.architectures.native``).
        """
        from ppzoo import stage as stage_module

        stage_module.prune(model, layout, stage)

    def patch_inner_forward(self, inner: nn.Module) -> None:
        """Make ``inner`` map (token ids | hidden states) to hidden states for its own layers."""
        from ppzoo import stage

        inner.forward = types.MethodType(functools.partial(stage.inner_stage_forward, adapter=self), inner)

    def patch_causal_lm_forward(self, lm: nn.Module) -> None:
        """Make ``lm`` run its inner stage, then the head when this stage holds it (logits out)."""
        from ppzoo import stage

        lm.forward = types.MethodType(functools.partial(stage.causal_lm_stage_forward, adapter=self), lm)
