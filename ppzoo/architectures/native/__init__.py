"""The native fallback: any decoder-only causal LM, run by steering Hugging Face's own forward.

Dedicated adapters re-implement the forward around the layers (embed, masks, RoPE, norm, head);
this adapter does not. Every stage is the whole CausalLM with the other stages' modules replaced
by parameter-free stand-ins, and Hugging Face's forward runs on it: entered with the incoming
hidden states at the stage's first layer, left right after its last (:mod:`.stage`). Masks, RoPE,
ALiBi, multipliers, soft-caps and ``layer_types`` stay the model's own code, so they stay exact.

The layout (input modules, the layer list, output modules) is read from the module tree and one
forward on the meta device (:mod:`.layout`, :mod:`.trace`), which also shows what cannot cross a
stage boundary. What later layers read besides the hidden states (per-layer inputs computed
from the token ids, keys and values one layer stores for later ones) crosses the boundary packed
with them (:mod:`.boundary`). A block several layers share (Zamba) is a tie group: each stage
holding one of those layers keeps a copy, its gradients summed over the holders (:mod:`ppzoo.tied`).
Configs are refused before any weight is read, with the reason, when something cannot be carried
that way: parameters tied between other modules, a router aux loss the forward computes in a form
ppzoo cannot read.

Mixtures of experts run as the model defines them; each stage records its own layers' router
logits with transformers' output recorders, and :meth:`NativeAdapter.aux_loss` adds the router
aux loss exactly as the CausalLM forward writes it (``ppzoo.architectures.moe``).

It is tried after every other adapter, so the model types they serve keep them. Dropout runs as
the model defines it, from streams keyed by layer and microbatch (:mod:`ppzoo.dropout`), so a
split draws the masks the unsplit model draws.
"""

from __future__ import annotations

import functools
import inspect
import io
import re
import sys
import tokenize
from typing import Any

from ppzoo.adapter import Adapter, KeyMap, encoder_decoder_problems
from ppzoo.architectures.moe import record_router_logits, router_aux_loss, router_loss_of
from ppzoo.architectures.native import buffers as _buffers
from ppzoo.architectures.native import keys as _keys
from ppzoo.architectures.native import layout as _layout
from ppzoo.architectures.native import stage as _stage
from ppzoo.hookspecs import hookimpl
from ppzoo.validation import Problem

__all__ = ["NativeAdapter"]

#: config sizes ppzoo's planner, cost model and runtime read from the config itself; a size that
#: varies per layer (Gemma 4's ``head_dim``) is measured on the layers (``Adapter.layer_shape``)
PLANNED_SIZES = ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers", "sliding_window")


class NativeAdapter(Adapter):
    name = "native"
    fallback = True
    capabilities = frozenset({"tied_embeddings"})
    #: the stage patches only the CausalLM's forward; the root stands for the inner model
    inner_name = ""

    def tiny_config(self):
        """GPT-2 (no adapter of its own): learned positions, tied head, fused QKV as ``Conv1D``, and
        its released dropouts (0.1 on embeddings, attention and residuals), which the kit compares
        train mode against train mode. Weights drawn wider than GPT-2's 0.02: a tiny GPT-2 drawn
        that narrow predicts one token whatever the prompt, which would leave generation untested."""
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=8,
            n_head=4,
            n_inner=64,
            n_positions=128,
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            initializer_range=0.5,
            bos_token_id=1,
            eos_token_id=2,
        )

    def matches(self, config: Any) -> bool:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            # NOTE: an image-text-to-text model's language model is a decoder (ppzoo.vision)
            return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        # NOTE: encoder families (BERT, RoBERTa, ...) attend causally only with is_decoder=True;
        # GPT-NeoX's config carries is_decoder=False too, but its code never reads it.
        return getattr(config, "is_decoder", None) is not False or not _reads_is_decoder(type(config))

    # -- what the layout discovery found ---------------------------------------------------------
    def _found(self, config: Any) -> _layout.NativeLayout:
        found = _layout.discover(config)
        if isinstance(found, list):
            raise ValueError(
                f"the native adapter cannot split model_type {getattr(config, 'model_type', None)!r}: "
                + "; ".join(p.message for p in found)
            )
        return found

    def fqn_layout(self, config: Any):
        return self._found(config).layout

    def tied_weights(self, config: Any) -> dict[str, str]:
        return dict(self._found(config).tied)

    def key_map(self, config: Any) -> KeyMap:
        # NOTE: renamed and fused checkpoint keys go through transformers' own rules in ppzoo's
        # loader and save (ppzoo.checkpoint.conversion); only ties on one stage need a key map
        found = self._found(config)
        return _keys.CheckpointKeys(found.local_ties) if found.local_ties else KeyMap()

    def boundary_width(self, config: Any) -> int:
        """The last dimension of what one stage hands the next, ``(microbatch, seq, width)``.

        ``hidden_size``, unless the model's layers read more than the previous layer's hidden
        states (per-layer inputs, shared keys and values, AltUp's stacked hidden states), which
        cross the boundary with them (:mod:`.boundary`).
        """
        boundary = self._found(config).boundary
        return boundary.width if boundary.carries else int(self.text_config(config).hidden_size)

    def image_modules(self, config: Any) -> tuple[str, ...]:
        # NOTE: with the parameters the base model holds itself for its image code (image_newline)
        found = self._found(config)
        return found.images + found.image_parameters

    def tp_plan(self, config: Any) -> dict[str, str]:
        plan = getattr(self.text_config(config), "base_model_tp_plan", None) or {}
        found = self._found(config)
        # NOTE: a vision-language model's text plan is its language model's (``layers.*``)
        base = found.layout.layers.rpartition(".")[0] if found.images else found.base
        return {f"{base}.{pattern}" if base else pattern: style for pattern, style in plan.items()}

    # -- validation ----------------------------------------------------------------------------
    def validate(self, config: Any, plan: Any = None) -> list[Problem]:
        # NOTE: of the base class's rules only the encoder-decoder one applies: the model's own
        # forward builds masks for every layer type (and reads num_hidden_layers only if it has it)
        problems = encoder_decoder_problems(config)
        cfg = self.text_config(config)
        kind = f"model_type {getattr(config, 'model_type', None)!r}"
        recipe = router_loss_of(_causal_lm_class(config))
        if isinstance(recipe, str):
            problems.append(
                Problem(
                    "native-moe", f"{kind}: {recipe}; ppzoo adds each stage's router loss only as the forward writes it"
                )
            )
        for attr in PLANNED_SIZES:
            try:
                getattr(cfg, attr, None)
            except Exception as exc:  # noqa: BLE001 - e.g. a size that varies per layer
                problems.append(
                    Problem(
                        "native-config-size",
                        f"{kind}: ppzoo's planner reads config.{attr}, which the config refuses ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                    )
                )
        if not problems:
            found = _layout.discover(config)
            if isinstance(found, list):
                problems += found
            else:
                problems += _split_backward_problems(found, plan, kind)
        return problems

    def validation_cases(self):
        # NOTE: fp8 and mxfp4 checkpoints are dequantized on load (ppzoo.checkpoint.quantized);
        # every other method is refused by ppzoo's own rules, this adapter's configs included
        quantized = self.tiny_config()
        quantized.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        return [(quantized, "quantized-unsupported")]

    # -- the stage -------------------------------------------------------------------------------
    def init_buffers(self, model, module) -> None:
        """Copy ``module``'s non-persistent buffers from what the model's constructor computes.

        NOTE: ``_init_weights`` does not re-create every such buffer (Falcon-H1's ``mup_vector``).
        """
        import torch

        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        reference = _buffers.reference_buffers(model.config, dtype)
        fqn = next(name for name, m in model.named_modules() if m is module)
        missing = False
        for name in module._non_persistent_buffers_set:
            target = module._buffers.get(name)
            source = reference.get(f"{fqn}.{name}" if fqn else name)
            if target is None:
                continue
            if source is None or source.shape != target.shape:
                missing = True
                continue
            with torch.no_grad():
                target.copy_(source)
        if missing:
            super().init_buffers(model, module)

    def prune_to_stage(self, model, layout, stage, *, config) -> None:
        _stage.prune(model, self._found(config), stage.modules, stage.layers)

    def patch_inner_forward(self, inner) -> None:
        """Nothing: Hugging Face's inner forward runs as it is (see :meth:`patch_causal_lm_forward`)."""

    def generation_problem(self, config: Any) -> str | None:
        """Why ``config``'s stages cannot generate; None when they can.

        A stage runs Hugging Face's forward with a transformers cache in which the layers other
        stages hold are dummies (:func:`.stage.stage_cache`), so masks and positions come from
        the stage's own layers. Refused: a forward that takes no cache, a model whose own
        ``prepare_inputs_for_generation`` changes the forward's inputs, a model that keeps its
        own cache class, and layers that reuse keys and values an earlier layer stored (they
        would cross a stage boundary for the whole sequence, not a step's tokens).
        """
        kind = f"model_type {getattr(config, 'model_type', None)!r}"
        lm = _causal_lm_class(config)
        if getattr(lm, "forward", None) is None:
            return None  # NOTE: not a model this adapter builds; building it says why
        params = inspect.signature(lm.forward).parameters
        if not {"cache", "past_key_values"} & set(params) and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return f"{kind}: {lm.__name__}.forward takes no cache"
        changed = _prepared_inputs(lm)
        if changed:
            return (
                f"{kind}: {lm.__name__}.prepare_inputs_for_generation changes what the forward is given at a step "
                f"({', '.join(changed)}), which ppzoo's stages are not given"
            )
        own = _own_cache_classes(lm)
        if own:
            return f"{kind} keeps its keys and values in its own {own[0]}, which ppzoo cannot hold per stage"
        found = _layout.discover(config)
        shared = [] if isinstance(found, list) else sorted({s.name for s in found.boundary.slots if s.kind == "state"})
        if shared:
            return (
                f"{kind}: later layers reuse the keys and values earlier layers stored ({', '.join(shared)}), "
                "which cross a stage boundary for the whole sequence, not one step's tokens"
            )
        return None

    def patch_causal_lm_forward(self, lm) -> None:
        _stage.patch_forward(lm)
        # NOTE: a vision-language model's later stages run the forward on the token ids (ppzoo.vision)
        lm.ppzoo_reads_token_ids = bool(self.image_modules(lm.config))
        record_router_logits(lm)

    def aux_loss(self, config: Any, stages, attention_mask=None):
        """The CausalLM forward's router aux term, read from transformers' code (``ppzoo.architectures.moe``)."""
        return router_aux_loss(config, stages, attention_mask, routers=stages[0]._ppzoo_routers)


def _split_backward_problems(found: _layout.NativeLayout, plan: Any, kind: str) -> list[Problem]:
    """A layer parameter used again downstream of its own use cannot go through torch's weight pass.

    NOTE: torch's weight pass computes each parameter group's gradient from the nodes the input
    pass saved, without keeping the graph; a parameter used again on a value computed with it
    (Gemma 3n's AltUp router) reaches its first use through nodes an earlier group has freed.
    """
    from ppzoo.schedule import SPLIT_BACKWARD, schedule_kind

    schedule = getattr(plan, "schedule", None)
    if not found.reused or schedule is None:
        return []
    try:
        if schedule_kind(schedule)[0] not in SPLIT_BACKWARD:
            return []
    except ValueError:  # NOTE: an unknown schedule is ppzoo's own rules' to report
        return []
    index, _, name = sorted(found.reused)[0].partition(".")
    return [
        Problem(
            "native-split-backward",
            f"{kind}: decoder layer {index} uses {name} again on a value computed with it, which torch's "
            f"zero-bubble weight pass cannot differentiate (schedule {schedule}); use a schedule without a "
            "split backward (1F1B, GPipe, Interleaved1F1B, LoopedBFS)",
        )
    ]


def _causal_lm_class(config: Any) -> type:
    from ppzoo.meta import model_class

    try:
        return model_class(config)._model_mapping[type(config)]
    except (KeyError, ValueError):
        return type(None)


@functools.cache
def _prepared_inputs(lm: type) -> list[str]:
    """The inputs a model's own ``prepare_inputs_for_generation`` sets besides transformers' default
    (Mamba drops the attention mask after the prefill); ppzoo gives a stage the default inputs."""
    from transformers import GenerationMixin

    method = getattr(lm, "prepare_inputs_for_generation", None)
    if method is None or method is GenerationMixin.prepare_inputs_for_generation:
        return []
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return []
    return sorted(set(re.findall(r"model_inputs\[[\"'](\w+)[\"']\]\s*=", source)))


@functools.cache
def _own_cache_classes(lm: type) -> list[str]:
    """Cache classes the modeling module of ``lm`` defines for itself (``MiniMaxCache``, ``xLSTMCache``)."""
    module = sys.modules.get(lm.__module__)
    return sorted(
        name
        for name, value in vars(module or {}).items()
        if isinstance(value, type) and name.endswith("Cache") and value.__module__ == lm.__module__
    )


@functools.cache
def _reads_is_decoder(config_class: type) -> bool:
    """Whether the modeling code of ``config_class``'s CausalLM reads ``is_decoder`` (not in docstrings)."""
    from transformers import AutoModelForCausalLM

    try:
        source = inspect.getsource(sys.modules[AutoModelForCausalLM._model_mapping[config_class].__module__])
    except (KeyError, OSError, TypeError, ValueError):
        return True
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return any(tok.type == tokenize.NAME and tok.string == "is_decoder" for tok in tokens)


#: the instance this plugin registers (and claims configs for)
_ADAPTER = NativeAdapter()
#: claim decisions by config and registry contents (the claim asks the other fallbacks' rules)
_CLAIMS: dict[tuple, bool] = {}


@hookimpl
def ppzoo_register_adapters(register):
    register(_ADAPTER)


@hookimpl
def ppzoo_adapter_for(config):
    """Claim a config that an earlier fallback (the generic adapter) matches but cannot run.

    Dedicated adapters keep their model types, and an earlier fallback keeps every config it
    accepts; the native adapter takes a config such a fallback refuses, or whose checkpoint keys
    transformers renames (EXAONE), when the native adapter accepts it.
    """
    from ppzoo import registry

    if not _ADAPTER.matches(config):
        return None
    registered = list(registry.adapters().values())
    if _ADAPTER not in registered:
        return None
    try:
        key = (config.to_json_string(use_diff=False), tuple(map(id, registered)))
    except Exception:  # noqa: BLE001 - an unserialisable config is decided each time
        return _ADAPTER if _claims(config, registered) else None
    if key not in _CLAIMS:
        if len(_CLAIMS) >= 64:
            _CLAIMS.pop(next(iter(_CLAIMS)))
        _CLAIMS[key] = _claims(config, registered)
    return _ADAPTER if _CLAIMS[key] else None


def _claims(config: Any, registered: list[Adapter]) -> bool:
    model_type, archs = getattr(config, "model_type", None), getattr(config, "architectures", None) or ()
    others = [a for a in registered if a is not _ADAPTER]
    if any(model_type in a.model_types or any(x in a.architectures for x in archs) for a in others):
        return False
    earlier = [a for a in registered[: registered.index(_ADAPTER)] if a.fallback and a.matches(config)]
    if not earlier or _ADAPTER.validate(config):
        return False  # NOTE: the registry's own order decides; a refusal stays the earlier fallback's
    renamed = bool(_ADAPTER._found(config).renames)
    return not any(not a.validate(config) and not (renamed and type(a.key_map(config)) is KeyMap) for a in earlier)
