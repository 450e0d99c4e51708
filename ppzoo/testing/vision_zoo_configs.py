"""The tiny config the zoo's second table checks each image-text-to-text type with.

:data:`~ppzoo.testing.tiny_vision_configs.VISION_TYPES`' own or ``_ZOO_CONFIGS``', else the class
defaults shrunk with small images (``_VISION_SHRINK``), changed by the type's ``_ZOO_FIXES`` entry
for a model that runs on tiny images.
"""

from __future__ import annotations

from typing import Any

from ppzoo.testing.tiny_vision_configs import (
    _END,
    _IMAGE,
    _START,
    _VISION,
    _ZOO_CONFIGS,
    VISION_TYPES,
    tiny_vision_config,
)

__all__ = ["zoo_vision_config"]


def zoo_vision_config(model_type: str) -> Any:
    """The tiny config the zoo checks ``model_type`` with: :data:`VISION_TYPES`' own or
    ``_ZOO_CONFIGS``', else the shrunk class defaults (:func:`ppzoo.testing.tiny_configs.tiny_config`)
    with small images, changed by the type's ``_ZOO_FIXES`` entry where it has one."""
    if model_type in VISION_TYPES:
        return tiny_vision_config(model_type)
    if model_type in _ZOO_CONFIGS:
        config = _ZOO_CONFIGS[model_type]()
        config._attn_implementation = "eager"
        return _without_router_loss(config)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ppzoo.testing.tiny_configs import tiny_config

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    kwargs: dict[str, Any] = {}
    text = default.get_text_config()
    if text is not default:
        kwargs["text_config"] = {"model_type": text.model_type, **tiny_config(text.model_type).to_diff_dict()}
    vision = getattr(default, "vision_config", None)
    if vision is not None:
        small = {k: v for k, v in _VISION_SHRINK.items() if hasattr(vision, k)}
        kwargs["vision_config"] = {**vision.to_dict(), **small}
    for name in ("image_token_id", "image_token_index"):
        if isinstance(getattr(default, name, None), int):
            kwargs[name] = _IMAGE
    if model_type in _ZOO_FIXES:
        _ZOO_FIXES[model_type](kwargs)
    config = cls(**kwargs)
    config._attn_implementation = "eager"
    return _without_router_loss(config)


def _without_router_loss(config: Any) -> Any:
    """The router aux loss off: the unsplit model's one term over the whole batch is not what a
    pipeline trains with (a term per stage and microbatch, ``ppzoo.architectures.moe``); the first
    table's 2-rank step checks that term against a reference built for it, and this table the
    image path."""
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(part, "output_router_logits", False):
            part.output_router_logits = False
    return config


def _aria_queries(kwargs: dict[str, Any]) -> None:
    """Aria's projector looks up each image's patch count in a table of the released image sizes
    (1225 and 4900 patches); the tiny images' count takes 4 queries."""
    vision = kwargs["vision_config"]
    kwargs["projector_patch_to_query_dict"] = {(vision["image_size"] // vision["patch_size"]) ** 2: 4}


def _small_grids(kwargs: dict[str, Any]) -> None:
    """LLaVA-NeXT's anyres grids, of up to 2 x 2 tiles of 8 pixels (the released tiles are of 336)."""
    size = kwargs["vision_config"]["image_size"] = 8
    kwargs["image_grid_pinpoints"] = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def _pixtral_heads(kwargs: dict[str, Any]) -> None:
    """Pixtral's ``head_dim`` is its own field (64 by default): the shrunk tower's heads are 8 wide."""
    vision = kwargs["vision_config"]
    vision["head_dim"] = vision["hidden_size"] // vision["num_attention_heads"]


def _feature_layers(kwargs: dict[str, Any]) -> None:
    """VipLLaVA concatenates the features of five tower layers (-2, -5, -8, -11, 6): the shrunk
    tower has two, so it takes both."""
    kwargs["vision_feature_layers"] = [-2, -1]


def _tower_layer_types(kwargs: dict[str, Any]) -> None:
    """The tower's ``layer_types`` list one entry per default layer (LFM3-VL's 14): left out, the
    config derives them for the shrunk tower's layers."""
    kwargs["vision_config"].pop("layer_types", None)


def _glimmer_widths(kwargs: dict[str, Any]) -> None:
    """Muse Glimmer: the tower's layer types and position table (32 x 32) for the shrunk tower, and
    the adapter's widths (its input is the tower's width after the 2 x 2 merge)."""
    vision = kwargs["vision_config"]
    vision.pop("layer_types", None)
    vision.update(pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16)
    kwargs["out_hidden_size"] = vision["hidden_size"] * vision["merge_size"] ** 2
    kwargs["projector_hidden_size"] = 32


def _spark_widths(kwargs: dict[str, Any]) -> None:
    """Muse Spark: Muse Glimmer's tower, a language model of few experts (the shrinking misses its
    ``moe_hidden_size``), and an audio tower whose output is as wide as the language model's."""
    _glimmer_widths(kwargs)
    text = kwargs["text_config"]
    text.update(moe_hidden_size=32, num_local_experts=4, num_experts_per_tok=2)
    kwargs["audio_config"] = {"hidden_sizes": [8, 8, 16, 16], "depths": [1] * 4, "out_hidden_size": text["hidden_size"]}


def _code_ranges(kwargs: dict[str, Any]) -> None:
    """Apertus 1.5 tokenizes images (and audio) into codes of the language model's own vocabulary:
    128 ids, of which 96-111 are the images' 16 codes and 112-127 the audio's. Its VQ tokenizer
    downsamples 16 pixels to 4 codes (GroupNorm needs 32 channels)."""
    kwargs["text_config"]["vocab_size"] = 128
    kwargs["vision_config"] = {
        "codebook_size": 16,
        "embed_dim": 8,
        "latent_channels": 32,
        "base_channels": 32,
        "channel_multiplier": [1, 1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "resolution": 16,
    }
    kwargs["audio_config"] = {
        "model_type": "wavtokenizer_encoder",
        "codebook_size": 16,
        "codebook_dim": 8,
        "hidden_size": 8,
        "num_filters": 4,
        "num_lstm_layers": 1,
        "upsampling_ratios": [2, 2],
    }
    kwargs.update(image_token_offset=96, audio_token_offset=112)


def _inkling2_widths(kwargs: dict[str, Any]) -> None:
    """Inkling 2: the tower's output is as wide as the language model's, and the head's unpadded
    vocabulary (200058 of the released 201024) is the shrunk vocabulary."""
    text = kwargs["text_config"]
    text["unpadded_vocab_size"] = text["vocab_size"]
    kwargs["vision_config"]["text_hidden_size"] = text["hidden_size"]


def _inkling2_loop(kwargs: dict[str, Any]) -> None:
    """Inkling 2 Loop: Inkling 2's widths, and its loop (layers 6 to 18 of blocks of 6, run three
    times as released) over the shrunk layers: layers 2 and 3, blocks of 2."""
    _inkling2_widths(kwargs)
    loop = dict(n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4, loop_gate_rank=4)
    kwargs["text_config"].update(loop)


def _molmo2_pooling(kwargs: dict[str, Any]) -> None:
    """Molmo2: images of 16 pixels as a list (4 x 4 patches, one learned position each), and its
    adapter (which pools patches into tokens) shrunk too: it concatenates both tower layers."""
    vision = kwargs["vision_config"]
    vision.update(image_size=[16, 16], num_position_embeddings=16, num_key_value_heads=4, head_dim=8)
    kwargs["adapter_config"] = {
        "vision_feature_layer": [-1, 0],
        "hidden_size": vision["hidden_size"],
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "intermediate_size": 64,
        "text_hidden_size": kwargs["text_config"]["hidden_size"],
    }


def _dots3_widths(kwargs: dict[str, Any]) -> None:
    """Dots 3 Note: the tower's experts come from a pyramid of expert counts by layer (25 dense
    layers, then sparse ones): one dense layer and one of 4 experts. The adapters (vision and
    audio) end at the language model's width, and the language model has few experts and a small
    indexer (the shrinking misses them)."""
    text = kwargs["text_config"]
    width = text["hidden_size"]
    text.update(
        n_routed_experts=4,
        num_experts_per_tok=2,
        shared_experts_intermediate_size=32,
        index_n_heads=4,
        index_head_dim=16,
    )
    vision = kwargs["vision_config"]
    vision.pop("mlp_layer_types", None)
    vision.pop("per_layer_config", None)
    vision.update(pyramid_num_routed=[-1, 4], num_local_experts=4, moe_intermediate_size=32)
    vision.update(adapter_in_dim=vision["hidden_size"], adapter_out_dim=width)
    kwargs["audio_config"] = {
        **_VISION,
        "downsample_hidden_size": 16,
        "adapter_input_size": _VISION["hidden_size"],
        "adapter_out_dim": width,
        "feature_size": 8,
    }


def _vision_class(name: str) -> Any:
    """A fix naming the vision-language class in ``architectures``, as released checkpoints do:
    the type's config maps to a text-only causal LM too (Qwen3.5's)."""

    def fix(kwargs: dict[str, Any]) -> None:
        kwargs["architectures"] = [name]

    return fix


def _exaone_tower(kwargs: dict[str, Any]) -> None:
    """EXAONE 4.5's tower groups its query heads over its own ``num_key_value_heads`` (8 by
    default, more than the shrunk tower's 4 heads), and attends in windows of 112 pixels."""
    vision = kwargs["vision_config"]
    vision.update(num_key_value_heads=2, window_size=16, fullatt_block_indexes=[1])


def _kimi_projector(kwargs: dict[str, Any]) -> None:
    """Kimi K2.5's projector normalises the tower's width under its own name
    (``projection_hidden_size``); its position table is 64 x 64 patches."""
    vision = kwargs["vision_config"]
    vision.update(pos_emb_height=8, pos_emb_width=8)
    kwargs["projection_hidden_size"] = vision["hidden_size"]


def _minimax_projector(kwargs: dict[str, Any]) -> None:
    """MiniMax-M3-VL's projector is ``projector_hidden_size`` wide (6144 by default)."""
    kwargs["projector_hidden_size"] = kwargs["vision_config"]["hidden_size"]


def _minicpm_merger(kwargs: dict[str, Any]) -> None:
    """MiniCPM-V 4.6's window merger runs after tower layer ``insert_layer_id`` (6: past the shrunk
    tower's 2), and its class defaults name no image token."""
    kwargs["vision_config"]["insert_layer_id"] = kwargs["insert_layer_id"] = 0
    kwargs["image_token_id"] = _IMAGE


def _gemma4_unified_embedder(kwargs: dict[str, Any]) -> None:
    """Gemma 4 Unified's vision side is optional (none by default): an embedder of pixel patches
    merged 2 x 2 from patches of 2 pixels, 32 wide, on a position table of 8 per axis."""
    kwargs["vision_config"] = {
        "patch_size": 2,
        "pooling_kernel_size": 2,
        "mm_embed_dim": 32,
        "mm_posemb_size": 8,
        "output_proj_dims": 32,
    }
    kwargs.update(image_token_id=_IMAGE, boi_token_id=_START, eoi_token_id=_END)


def _janus_vq(kwargs: dict[str, Any]) -> None:
    """Janus's image generator (a VQ-VAE, ``vq_config``) is not shrunk with the tower, and its tower
    takes ``num_image_tokens`` tokens an image (576: 16-pixel images of 4-pixel patches give 16)."""
    vision = kwargs["vision_config"]
    vision["num_image_tokens"] = (vision["image_size"] // vision["patch_size"]) ** 2
    kwargs["vq_config"] = {
        "embed_dim": 8,
        "num_embeddings": 32,
        "latent_channels": 32,  # NOTE: its group norms take 32 groups
        "base_channels": 32,
        "channel_multiplier": [1, 1],
        "num_res_blocks": 1,
        "num_patches": 4,
        "projection_dim": 32,
        "image_token_embed_dim": 32,
    }


def _fuyu_patches_size(kwargs: dict[str, Any]) -> None:
    """Fuyu has no vision tower: its patches (30 pixels) are projected linearly, sized at the top of its config."""
    kwargs.update(image_size=8, patch_size=4)


def _nemotron_omni_widths(kwargs: dict[str, Any]) -> None:
    """Nemotron-H Omni's projector widths are its own fields (``vision_hidden_size``,
    ``projector_hidden_size``), its RADIO tower's position table spans ``max_img_size`` pixels
    (2048), and its class defaults name no image token."""
    vision = kwargs["vision_config"]
    vision["max_img_size"] = vision["image_size"]
    kwargs.update(vision_hidden_size=vision["hidden_size"], projector_hidden_size=32, image_token_id=_IMAGE)


def _inkling_tower(kwargs: dict[str, Any]) -> None:
    """Inkling's tower counts its layers as ``n_layers`` (the shrink's ``num_hidden_layers`` is an
    alias its class defaults override): 24 layers of up to 6144 channels."""
    kwargs["vision_config"].pop("num_hidden_layers", None)
    kwargs["vision_config"]["n_layers"] = 2


def _sam_tower(kwargs: dict[str, Any]) -> None:
    """DeepSeek-VL hybrid's second, high-resolution tower (SAM) has its own config, which the
    shrink does not reach: 2 layers of width 32 on 32-pixel images of 4-pixel patches."""
    from transformers import AutoConfig

    high = AutoConfig.for_model("deepseek_vl_hybrid").high_res_vision_config.to_dict()
    high.update(
        hidden_size=32,
        output_channels=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_dim=64,
        image_size=32,
        patch_size=4,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=16,
    )
    kwargs["high_res_vision_config"] = high


#: model type -> what the zoo's generic tiny config of the type changes, in ``cls(**kwargs)``'s
#: keyword arguments, for a model that runs on tiny images
_ZOO_FIXES = {
    "deepseek_vl_hybrid": _sam_tower,
    "lfm3_vl": _tower_layer_types,
    "muse_glimmer": _glimmer_widths,
    "muse_spark": _spark_widths,
    "apertus1p5": _code_ranges,
    "dots3_note": _dots3_widths,
    "molmo2": _molmo2_pooling,
    "inkling2": _inkling2_widths,
    "inkling2_loop": _inkling2_loop,
    "aria": _aria_queries,
    "llava_next_video": _small_grids,
    "lighton_ocr": _pixtral_heads,
    "vipllava": _feature_layers,
    "qwen3_5": _vision_class("Qwen3_5ForConditionalGeneration"),
    "qwen3_5_moe": _vision_class("Qwen3_5MoeForConditionalGeneration"),
    "exaone4_5": _exaone_tower,
    "kimi_k25": _kimi_projector,
    "minimax_m3_vl": _minimax_projector,
    "minicpmv4_6": _minicpm_merger,
    "minicpmv4_7": _minicpm_merger,
    "minicpm_ocr": _minicpm_merger,
    "gemma4_unified": _gemma4_unified_embedder,
    "janus": _janus_vq,
    "fuyu": _fuyu_patches_size,
    "nemotron_h_omni": _nemotron_omni_widths,
    "inkling_mm_model": _inkling_tower,
}


#: a vision tower's sizes in the zoo's generic tiny configs (and 16-pixel images of 4-pixel patches)
_VISION_SHRINK = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "depth": 2,
    "embed_dim": 32,
    "out_hidden_size": 32,
    "projection_dim": 32,
    "image_size": 16,
    "patch_size": 4,
}
