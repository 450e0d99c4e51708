"""Tiny vision-language configs written by hand, for checking ppzoo's vision path.

Each tiny config keeps its family's structure (the vision tower's kind, the projector, how image
features are merged, the language model's attention) at sizes that run in seconds on a CPU:
:data:`VISION_TYPES`, the families checked exact with images, and ``_ZOO_CONFIGS``, the types the
zoo's second table (:mod:`ppzoo.testing.vision_census`) checks with a config of their own.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VISION_TYPES", "tiny_vision_config"]


_TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
#: image (and image-block) token ids in the tiny vocabulary
_IMAGE, _START, _END, _VIDEO = 95, 93, 94, 92


def _llava() -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(**_VISION, image_size=8, patch_size=4, projection_dim=32)
    return LlavaConfig(vision_config=vision, text_config={"model_type": "llama", **_TEXT}, image_token_id=_IMAGE)


def _gemma3() -> Any:
    from transformers import Gemma3Config

    text = {
        "model_type": "gemma3_text",
        **_TEXT,
        "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "final_logit_softcapping": 30.0,
    }
    vision = {"model_type": "siglip_vision_model", **_VISION, "image_size": 16, "patch_size": 4}
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_id=_IMAGE,
        boi_token_id=_START,
        eoi_token_id=_END,
    )


def _qwen2_vl(model_type: str = "qwen2_vl") -> Any:
    from transformers import AutoConfig

    text = {
        "model_type": f"{model_type}_text",
        **_TEXT,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    }
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 32,
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if model_type == "qwen2_vl":
        vision["mlp_ratio"] = 2
    else:
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        image_token_id=_IMAGE,
        video_token_id=_VIDEO,
        vision_start_token_id=_START,
        vision_end_token_id=_END,
        bos_token_id=1,
        eos_token_id=2,
    )


def _llava_next(model_type: str = "llava_next") -> Any:
    """LLaVA-NeXT's family: anyres tiles of 8 pixels on grids of up to 2 x 2 tiles, and the base
    model's own ``image_newline`` (the image side, ``ppzoo.architectures.native.direct``)."""
    from transformers import AutoConfig

    onevision = model_type == "llava_onevision"  # NOTE: SigLIP tower and Qwen2, as released
    vision = {"model_type": "siglip_vision_model" if onevision else "clip_vision_model", **_VISION}
    vision.update(image_size=8, patch_size=4, **({} if onevision else {"projection_dim": 32}))
    text = {"model_type": "qwen2" if onevision else "llama", **_TEXT}
    return AutoConfig.for_model(
        model_type,
        vision_config=vision,
        text_config=text,
        image_token_id=_IMAGE,
        image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]],
    )


def _paligemma() -> Any:
    """PaliGemma: SigLIP and Gemma; the projector's width is ``projection_dim``, which must be the
    language model's (the class defaults' 2048 is not the shrunk language model's)."""
    from transformers import PaliGemmaConfig

    text = {"model_type": "gemma", **_TEXT}
    vision = {"model_type": "siglip_vision_model", **_VISION, "image_size": 8, "patch_size": 4}
    return PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=_TEXT["hidden_size"],
        hidden_size=_TEXT["hidden_size"],
        vocab_size=_TEXT["vocab_size"],
        image_token_id=_IMAGE,
    )


def _mistral3() -> Any:
    """Mistral 3: Pixtral (2D RoPE over each image's own patch grid) and a patch merger of 2 x 2
    patches, so an image of 16 pixels in patches of 4 takes 4 tokens, one of 8 x 16 pixels 2."""
    from transformers import Mistral3Config

    vision = {"model_type": "pixtral", **_VISION, "head_dim": 8, "image_size": 16, "patch_size": 4}
    return Mistral3Config(
        text_config={"model_type": "mistral", **_TEXT, "sliding_window": None},
        vision_config=vision,
        spatial_merge_size=2,
        image_token_id=_IMAGE,
    )


def _llama4() -> Any:
    """Llama 4: its vision model ends in a pixel shuffle (16 patches, 4 tokens an image) and an MLP
    whose widths are tied to the tower's (``intermediate_size`` is 4 x ``hidden_size`` after the
    shuffle); the language model interleaves dense and MoE layers and chunks attention. The config
    names the vision-language class, as released checkpoints do."""
    from transformers import Llama4Config

    text = {
        "model_type": "llama4_text",
        **_TEXT,
        "intermediate_size_mlp": 64,
        "num_local_experts": 4,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": 16,
        "no_rope_layer_interval": 2,
    }
    width = _VISION["hidden_size"]
    vision = {
        "model_type": "llama4_vision_model",
        **_VISION,
        "intermediate_size": 4 * width,
        "image_size": 16,
        "patch_size": 4,
        "projector_input_dim": width,
        "projector_output_dim": width,
        "vision_output_dim": width,
    }
    return Llama4Config(
        text_config=text,
        vision_config=vision,
        image_token_id=_IMAGE,
        boi_token_id=_START,
        eoi_token_id=_END,
        architectures=["Llama4ForConditionalGeneration"],
    )


#: model type -> its tiny config; every type here is checked exact with images
VISION_TYPES = {
    "llava": _llava,
    "gemma3": _gemma3,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": lambda: _qwen2_vl("qwen2_5_vl"),
    "llava_next": _llava_next,
    "llava_onevision": lambda: _llava_next("llava_onevision"),
    "paligemma": _paligemma,
    "mistral3": _mistral3,
}


def _cosmos3_edge() -> Any:
    """Cosmos3 Edge: its language model's M-RoPE sections must fill half a head (8 wide: 2, 1, 1),
    and its own text config does not shrink alone; SigLIP 2's learned positions on a 4 x 4 grid."""
    from transformers import AutoConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return AutoConfig.for_model(
        "cosmos3_edge",
        text_config={**_TEXT, "num_key_value_heads": 4, "rope_parameters": rope},
        vision_config={**_VISION, "patch_size": 4, "num_patches": 16},
        projector_hidden_size=32,
        image_token_id=_IMAGE,
        video_token_id=_VIDEO,
        vision_start_token_id=_START,
        vision_end_token_id=_END,
    )


def _mistral4() -> Any:
    """Mistral 4's image-text-to-text class is ``Mistral4ForCausalLM``, a text-only model whose
    config is its text config: shrunk whole, as the first table's. It has no vision tower, so the
    zoo finds no images to give it (its images run through Mistral 3's class, type ``mistral3``)."""
    from ppzoo.testing.tiny_configs import tiny_config

    return tiny_config("mistral4")


def _ernie4_5_vl_moe() -> Any:
    """ERNIE 4.5 VL MoE: its text config takes one expert width per modality (text, images) and
    does not shrink alone; M-RoPE sections that fill half a head (8 wide: 1, 1, 2)."""
    from transformers import AutoConfig

    text = {
        **_TEXT,
        "moe_intermediate_size": [32, 32],
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_num_shared_experts": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    }
    vision = {"depth": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4, "intermediate_size": 64}
    return AutoConfig.for_model(
        "ernie4_5_vl_moe",
        text_config=text,
        vision_config=vision,
        image_token_id=_IMAGE,
        video_token_id=_VIDEO,
        image_start_token_id=_START,
        image_end_token_id=_END,
        video_start_token_id=90,
        video_end_token_id=91,
    )


def _glm5_next() -> Any:
    """GLM-5 Next: MLA with as many key-value heads as heads (its rule), no RoPE in the indexed
    attention, an indexer that keeps 16 of the tokens (in pools of 4), KDA linear attention on
    three of four layers, and the released hyper-connections; its text config does not shrink
    alone."""
    from transformers import AutoConfig

    text = {
        **_TEXT,
        "num_key_value_heads": 4,
        "moe_intermediate_size": 32,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "v_head_dim": 8,
        "qk_nope_head_dim": 8,
        "index_topk": 16,
        "index_head_dim": 8,
        "index_n_heads": 2,
        "index_kpool": 4,
        "linear_head_dim": 8,
        "linear_num_heads": 4,
        "pad_token_id": 0,
    }
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, image_size=16, patch_size=4)
    vision.update(out_hidden_size=32, projection_intermediate_size=64)
    return AutoConfig.for_model(
        "glm5_next",
        text_config=text,
        vision_config=vision,
        image_token_id=_IMAGE,
        video_token_id=_VIDEO,
        image_start_token_id=_START,
        image_end_token_id=_END,
    )


#: model type -> the tiny config the zoo's second table checks it with, where the class defaults do
#: not shrink into one; unlike :data:`VISION_TYPES`, nothing is claimed for these (the zoo reports
#: what it finds: Llama 4's vision-language forward fails in transformers itself, so ppzoo refuses it)
_ZOO_CONFIGS = {
    "llama4": _llama4,
    "cosmos3_edge": _cosmos3_edge,
    "ernie4_5_vl_moe": _ernie4_5_vl_moe,
    "glm5_next": _glm5_next,
    "mistral4": _mistral4,
}


def tiny_vision_config(model_type: str) -> Any:
    """The tiny config of vision-language ``model_type`` (one of :data:`VISION_TYPES`)."""
    config = VISION_TYPES[model_type]()
    config._attn_implementation = "eager"
    return config
