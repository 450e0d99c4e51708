"""Tiny configs for every decoder model type in the installed transformers, built from defaults.

:func:`tiny_config` takes the config class's defaults and shrinks them the way transformers' own
testers do (hidden 32, 4 heads, vocab 100, 4 layers), keeps special token ids inside the
vocabulary, and applies :data:`FIXES`: per-type settings without which the shrunk (or even the
default) config does not build or run in transformers itself, each with its reason.

Dropout stays as the class defaults have it (GPT-2 0.1, BLOOM 0.0, ...): the zoo compares the
stages in train mode with the unsplit model in train mode, both drawing their masks from streams
keyed by seed, layer and microbatch (:mod:`ppzoo.dropout`). Layer drop (:data:`ppzoo.dropout.LAYER_DROP`,
OPT's, XGLM's and BioGPT's ``layerdrop``) is turned off: it skips whole layers at random from the
base model's layer loop, which would skip a stage's entry or exit; every default has it at 0.

:data:`VARIANTS` names the settings of released checkpoints that a type's defaults do not exercise
(``falcon[alibi]``: Falcon-RW's ALiBi): :func:`tiny_config` takes a variant's name as it takes a
model type, and the zoo checks each variant as a row of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "DROP",
    "FIXES",
    "ROUTER_AUX_LOSS",
    "SHRINK",
    "UNSHRUNK",
    "VARIANTS",
    "decoder_model_types",
    "encoder_decoder_model_types",
    "tiny_config",
]

#: shrunk sizes, applied to every config field (or alias) of these names that the class has
SHRINK: dict[str, Any] = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "max_position_embeddings": 64,
    "n_inner": 64,
    "ffn_dim": 64,
    "d_ff": 64,
    "dff": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}

#: the router aux loss on, for every config that has the switch (mixtures of experts), with a
#: weight that makes leaving it out, or adding it wrongly, fail the loss and gradient comparisons
ROUTER_AUX_LOSS: dict[str, Any] = {"output_router_logits": True, "router_aux_loss_coef": 0.5, "aux_loss_coef": 0.5}

#: a FIXES value that removes a SHRINK setting instead of overriding it
DROP = object()

_DECODER = ({"is_decoder": True}, "the encoder family's CausalLM attends causally only with is_decoder=True")
_MLA = {
    "num_key_value_heads": 4,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}
_MAMBA = {"mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 16, "mamba_chunk_size": 16}

#: per model type: (settings, why the shrunk defaults need them)
FIXES: dict[str, tuple[dict[str, Any], str]] = {
    **{
        t: _DECODER
        for t in (
            "bert",
            "bert-generation",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "trocr",
            "xlm-roberta",
            "xlm-roberta-xl",
        )
    },
    **{
        t: (
            dict(_MLA),
            "multi-head latent attention: the default LoRA ranks and rotary/value head sizes do not fit a tiny head",
        )
        for t in (
            "axk1",
            "axk2",
            "deepseek_v3",
            "deepseek_v32",
            "youtu",
            "minicpm3",
            "glm4_moe_lite",
            "sarvam_mla",
        )
    },
    "big_bird": (
        {"is_decoder": True, "attention_type": "original_full"},
        "a causal LM only with is_decoder=True; block-sparse attention needs sequences of over 700 tokens, and "
        "on shorter ones the forward switches every layer to full attention, the other stages' layers too",
    ),
    "cohere_compass_text": (
        {
            "rope_parameters": {
                t: {"rope_type": "default", "rope_theta": 10000.0} for t in ("full_attention", "sliding_attention")
            }
        },
        "its default leaves the RoPE settings per layer type unset",
    ),
    "xmod": (
        {"is_decoder": True, "default_language": "en_XX"},
        "a causal LM only with is_decoder=True; its adapters need a language",
    ),
    "codegen": ({"rotary_dim": 4}, "the default rotary_dim=64 is wider than a tiny head (8)"),
    "gptj": ({"rotary_dim": 4}, "the default rotary_dim=64 is wider than a tiny head (8)"),
    "gpt_neo": ({"attention_types": [[["global", "local"], 2]]}, "attention_types must list num_layers layers"),
    "dots3_note_text": (
        {**_MLA, "head_dim": 16, "per_layer_config": None},
        "latent attention sizes as for MLA (head_dim = nope + rope), and its default per-layer settings name layers 25-41",
    ),
    "jamba": (
        {"attn_layer_period": 2, "attn_layer_offset": 1},
        "the default period puts the first attention layer at layer 4: with no attention layer its cache code fails",
    ),
    "kimi_linear": (
        {
            **_MLA,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
            "linear_num_heads": 4,
            "linear_head_dim": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
        "multi-head latent attention sizes as for MLA (its attention expands the latent keys to every query "
        "head, then repeats them by heads // num_key_value_heads: it needs 4 key/value heads), the default "
        "layout has no full-attention layer in 4 layers (its cache code needs one), and the default linear "
        "attention (32 heads of 128) and 256 experts make the CPU check take minutes",
    ),
    "bailing_hybrid": (
        {
            **_MLA,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
            "num_local_experts": 8,
            "n_group": 4,
            "topk_group": 2,
            "num_experts_per_tok": 2,
        },
        "multi-head latent attention sizes as for MLA (its attention expands the latent keys to every query "
        "head, then repeats them by heads // num_key_value_heads: it needs 4 key/value heads), the default "
        "group size puts the first full-attention layer at layer 6 (its cache code needs one), and the default "
        "512 experts make the CPU check take minutes (group-limited routing kept: 4 groups, 2 of them picked)",
    ),
    "bamba": (
        {**_MAMBA, "attn_layer_indices": [1, 3]},
        "mamba heads must divide mamba_expand * hidden_size, and without an attention layer its mask code fails",
    ),
    "granitemoehybrid": (
        {**_MAMBA, "layer_types": ["mamba", "attention", "mamba", "attention"]},
        "mamba heads must divide mamba_expand * hidden_size, and without an attention layer its mask code fails",
    ),
    "mamba2": (
        {"num_heads": 8, "head_dim": 8, "n_groups": 1, "state_size": 16, "chunk_size": 16},
        "hidden_size * expand must equal num_heads * head_dim",
    ),
    "xlnet": ({"d_head": 8}, "d_head must equal d_model // n_head"),
    "zamba2": (
        {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]},
        "the default layer pattern lists 54 layers",
    ),
    "zamba": (
        {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]},
        "transformers ties the shared block only when two layers use it",
    ),
    "falcon_h1": (
        {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 16, "mamba_chunk_size": 16},
        "the default mamba sizes (d_ssm 1024, 128 heads) make the CPU scan take minutes",
    ),
    "gemma4_assistant": (
        {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
        "its default text config has per-layer inputs, which the assistant forbids",
    ),
    "reformer": (
        {"is_decoder": True, "axial_pos_embds_dim": [16, 16], "axial_pos_shape": [8, 8]},
        "a causal LM only with is_decoder=True; its axial position embeddings must sum to hidden_size",
    ),
    "gemma3n_text": (
        {
            "num_kv_shared_layers": 2,
            "vocab_size_per_layer_input": 100,
            "hidden_size_per_layer_input": 8,
            "laurel_rank": 8,
        },
        "the default shares the key/value cache of 15 layers (more than 4) and has a per-layer vocabulary of 262144",
    ),
    "dots1": (
        {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
        "the default leaves the expert counts unset",
    ),
    "dbrx": (
        {
            "d_model": 32,
            "attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
        },
        "its default attention config lacks rope_theta and clip_qkv, and its experts take their width from "
        "d_model before the hidden_size alias sets it",
    ),
    "longcat_flash": (
        {**_MLA, "num_layers": 4, "n_routed_experts": 4, "zero_expert_num": 2, "moe_topk": 2},
        "multi-head latent attention sizes as for MLA; num_hidden_layers counts its sublayers (two a block) and "
        "derives num_layers, so 4 blocks are set (4 stages) and 512 routed plus 256 zero experts cut to 4 and 2",
    ),
    "deepseek_v2": (
        {**_MLA, "num_experts_per_tok": 2, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
        "multi-head latent attention sizes as for MLA, and its default leaves num_experts_per_tok unset "
        "(group-limited routing on, so that the zoo runs it)",
    ),
    "lfm2_moe": (
        {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
        "its default leaves layer_types unset, which its decoder layers index",
    ),
    "glm_moe_dsa": (
        {**_MLA, "index_head_dim": 16, "index_n_heads": 4, "index_topk": 4},
        "multi-head latent attention sizes as for MLA, and its indexer's heads must fit them",
    ),
    "xlstm": (
        {"hidden_size": 64, "num_heads": 4, "qk_dim_factor": 1.0},
        "its state is sized as if the query/key width (rounded up to 64) were the value width",
    ),
    "rwkv": (
        {"rescale_every": 0, "use_cache": False},
        "in eval mode it rescales its weights in place every rescale_every "
        "layers (the kit's eval-mode comparisons would see changed weights), and with use_cache it updates its state "
        "in place, which breaks the reference's backward",
    ),
    **{
        t: ({"head_dim": DROP}, "head_dim is a per-layer attribute of its config")
        for t in ("gemma4", "gemma4_unified", "gemma4_unified_text")
    },
    "gemma4_text": (
        {"head_dim": DROP, "vocab_size_per_layer_input": 100, "hidden_size_per_layer_input": 8},
        "head_dim is a per-layer attribute of its config, and its per-layer inputs default to a vocabulary of "
        "262144 (a 268M-parameter embedding at 4 layers)",
    ),
    **{
        t: (
            {"output_router_logits": True},
            "its adapter declares the router aux loss, which the kit checks only when the config returns router logits",
        )
        for t in ("mixtral", "qwen2_moe", "qwen3_moe")
    },
}


#: variant name -> (model type, settings on top of its tiny config, the released checkpoints that
#: use them and what they exercise that the defaults do not)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "doge[moe]": (
        "doge",
        {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 4},
        "Doge with its cross-domain mixture of experts (is_moe=True) and router aux loss (the default is dense; "
        "16 experts, as its router takes their square root as a key count)",
    ),
    "falcon[new_decoder]": (
        "falcon",
        {"new_decoder_architecture": True, "num_kv_heads": 2},
        "Falcon-40B and -180B: the new decoder architecture, grouped key/value heads in one fused "
        "projection, separate attention and MLP layer norms",
    ),
    "falcon[new_decoder_one_norm]": (
        "falcon",
        {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
        "Falcon2-11B: the new decoder architecture with one layer norm for attention and MLP",
    ),
    "falcon[alibi]": (
        "falcon",
        {"alibi": True, "multi_query": False, "parallel_attn": False, "bias": True},
        "Falcon-RW-1B and -7B: ALiBi instead of rotary, multi-head attention, sequential residual, biases",
    ),
    "opt[projected]": (
        "opt",
        {"word_embed_proj_dim": 16, "do_layer_norm_before": False},
        "OPT-350M: embeddings narrower than the hidden size (project_in and project_out), layer norm after",
    ),
    "stablelm[parallel_qk_norm]": (
        "stablelm",
        {"use_parallel_residual": True, "qk_layernorm": True, "num_attention_heads": 2, "num_key_value_heads": 2},
        "StableLM 2 12B: parallel residual and per-head query/key layer norms (2 heads: with as many "
        "query heads as layers the per-head norm lists look like a second layer list, which the native "
        "adapter refuses as ambiguous, native-layers)",
    ),
}

#: model types built at their default sizes (layer drop off), with why they cannot be shrunk; the
#: zoo only reads their layout on the meta device unless an adapter accepts them
UNSHRUNK: dict[str, str] = {
    "dots3_note": "its vision and audio adapters must match the text width, and its per-layer settings name layers 25-41",
}

#: special token ids inside the tiny vocabulary, for defaults outside it
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _fields(cls: type) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | set(getattr(cls, "attribute_map", {}))


def _shrunk(cls: type, extra: dict[str, Any]) -> Any:
    fields = _fields(cls)
    kwargs = {k: v for k, v in {**SHRINK, **ROUTER_AUX_LOSS}.items() if k in fields}
    for alias, real in getattr(cls, "attribute_map", {}).items():
        if alias in kwargs and real in kwargs:
            del kwargs[real]  # NOTE: one value per field: the alias (hidden_size) wins over n_embd
    extra = dict(extra)
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        if name in fields and sub.__name__ != "AutoConfig":
            # NOTE: a FIXES entry for a sub-config is a dict of its own settings
            kwargs[name] = _shrunk(sub, extra.pop(name) if isinstance(extra.get(name), dict) else {})
        elif name in fields and name not in extra:
            # NOTE: a sub-config of any model type (Fuyu's Persimmon text model): that type's tiny config
            default = getattr(cls(), name, None)
            if getattr(default, "model_type", None) and default.model_type != cls.model_type:
                kwargs[name] = {"model_type": default.model_type, **tiny_config(default.model_type).to_diff_dict()}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for name, inside in _TOKEN_IDS.items():
        if isinstance(defaults.get(name), int) and "vocab_size" in kwargs and defaults[name] >= kwargs["vocab_size"]:
            kwargs[name] = inside
    for name, value in extra.items():
        if value is DROP:
            kwargs.pop(name, None)
        else:
            kwargs[name] = value
    config = cls(**kwargs)
    _quiet(config, cls)
    return config


def _quiet(config: Any, cls: type) -> None:
    """Layer drop off (dropout stays on); special token ids inside the vocabulary."""
    from ppzoo.dropout import LAYER_DROP

    vocab = getattr(config, "vocab_size", None)
    for name in _fields(cls):
        try:
            value = getattr(config, name, None)
        except Exception:  # noqa: BLE001 - e.g. a per-layer attribute that refuses a global read
            continue
        if isinstance(value, float) and not isinstance(value, bool) and name in LAYER_DROP:
            setattr(config, name, 0.0)
        if name in ("pad_token_id", "bos_token_id", "eos_token_id") and isinstance(vocab, int):
            if isinstance(value, int) and value >= vocab:
                setattr(config, name, _TOKEN_IDS[name])
            elif isinstance(value, list):
                setattr(config, name, [v if v < vocab else 2 for v in value])


def tiny_config(model_type: str) -> Any:
    """A tiny config of ``model_type``: the class defaults (dropout included), shrunk, layer drop
    off, :data:`FIXES` applied (or, for :data:`UNSHRUNK` types, the defaults with layer drop off).
    A variant's name (:data:`VARIANTS`) gives its model type's tiny config with its settings.

    Raises:
        KeyError: ``model_type`` is not a config type of the installed transformers nor a variant.
        Exception: whatever the config class raises for the shrunk settings.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    variant: dict[str, Any] = {}
    if model_type in VARIANTS:
        model_type, variant, _ = VARIANTS[model_type]
    cls = CONFIG_MAPPING[model_type]
    if model_type in UNSHRUNK:
        config = cls(**variant)
        _quiet(config, cls)
        return config
    extra, _ = FIXES.get(model_type, ({}, ""))
    return _shrunk(cls, {**extra, **variant})


def _causal_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _encoder_decoder(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    cls = CONFIG_MAPPING[model_type]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # NOTE: defaults warn about token ids outside their vocabularies
    try:
        return bool(getattr(cls(), "is_encoder_decoder", False))
    except Exception:  # noqa: BLE001 - a default that does not build (its class default decides)
        fields = {f.name: f.default for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        return fields.get("is_encoder_decoder") is True
    finally:
        hf_logging.set_verbosity(verbosity)


def decoder_model_types() -> list[str]:
    """The installed transformers' causal-LM model types, less the encoder-decoder ones."""
    return [t for t in _causal_types() if not _encoder_decoder(t)]


def encoder_decoder_model_types() -> list[str]:
    """The causal-LM model types whose configs are encoder-decoder (their decoders alone)."""
    return [t for t in _causal_types() if _encoder_decoder(t)]
