"""Tiny vision-language models and image batches, for checking ppzoo's vision path.

Each tiny config keeps its family's structure (the vision tower's kind, the projector, how image
features are merged, the language model's attention) at sizes that run in seconds on a CPU. An
image batch holds token ids with each image expanded to as many image tokens as the model's own
``get_image_features`` returns features for it, the family's per-token inputs, and labels that
ignore the image tokens, as a processor and a fine-tuning recipe would give them.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

__all__ = [
    "VISION_RESULTS",
    "VISION_TYPES",
    "VisionResult",
    "image_batch",
    "render_vision",
    "save_tiny_vision_model",
    "tiny_vision_config",
    "vision_model_types",
    "vision_step_problems",
    "vision_zoo",
]

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


def _pixels(config: Any, images: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One family's pixel inputs for ``images`` images, as its image processor lays them out."""
    vision = config.vision_config
    if hasattr(vision, "temporal_patch_size"):  # NOTE: Qwen2-VL: every image's patches, flattened
        grid = torch.tensor([[1, 4, 4]] * images)
        channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", 3)  # NOTE: MiniMax-M3-VL
        width = channels * vision.temporal_patch_size * vision.patch_size**2
        return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), width, generator=gen), "image_grid_thw": grid}
    channels = getattr(vision, "num_channels", 3)
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    return {"pixel_values": torch.randn(images, channels, size, size, generator=gen)}


def _anyres_pixels(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LLaVA-NeXT's anyres inputs: per image, its base tile and the tiles of its best grid
    (padded to the most tiles of any image, ``(images, tiles, channels, size, size)``), and its size."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    images = sum(counts)
    size = config.vision_config.image_size
    pinpoints = config.image_grid_pinpoints
    # NOTE: sizes that pick each grid, and that unpad a row or a column of features away
    choices = [[2 * size, size], [size + 1, 2 * size - 1], [size, size], [2 * size - 2, 2 * size]]
    sizes = torch.tensor([choices[i % len(choices)] for i in range(images)])
    tiles = max(image_size_to_num_patches(s, pinpoints, size) for s in sizes)
    pixels = torch.randn(images, tiles, getattr(config.vision_config, "num_channels", 3), size, size, generator=gen)
    return {"pixel_values": pixels, "image_sizes": sizes}


def _pixtral_pixels(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Pixtral's inputs (Mistral 3): images of their own sizes, each padded to the batch's largest
    (``(images, channels, size, size)``), and each image's size."""
    size = config.vision_config.image_size
    images = sum(counts)
    # NOTE: a square, a wide and a tall image: each takes its own number of tokens
    choices = [[size, size], [size // 2, size], [size, size // 2]]
    sizes = torch.tensor([choices[i % len(choices)] for i in range(images)])
    pixels = torch.zeros(images, getattr(config.vision_config, "num_channels", 3), size, size)
    for i, (height, width) in enumerate(sizes.tolist()):
        pixels[i, :, :height, :width] = torch.randn(pixels.shape[1], height, width, generator=gen)
    return {"pixel_values": pixels, "image_sizes": sizes}


def _siglip2_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """SigLIP 2's inputs (LFM2-VL): each image's patches flattened, padded to the batch's most
    (``(images, patches, channels x patch x patch)``), its patch grid and which patches are real.
    The grids are multiples of the projector's ``downsample_factor``, as the processor makes them."""
    vision, factor = config.vision_config, getattr(config, "downsample_factor", 1)
    images = sum(counts)
    choices = [[2 * factor, 2 * factor], [factor, 3 * factor], [3 * factor, factor], [2 * factor, factor]]
    shapes = torch.tensor([choices[i % len(choices)] for i in range(images)])
    most = int(shapes.prod(-1).max())
    width = vision.num_channels * vision.patch_size**2
    real = torch.arange(most)[None] < shapes.prod(-1)[:, None]
    patches = torch.randn(images, most, width, generator=gen) * real[..., None]
    return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": real}


def _masked_pixels(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Images with a pixel mask (Aria): every other image's right half is padding."""
    size = config.vision_config.image_size
    images = sum(counts)
    pixels = torch.randn(images, getattr(config.vision_config, "num_channels", 3), size, size, generator=gen)
    mask = torch.ones(images, size, size, dtype=torch.long)
    mask[1::2, :, size // 2 :] = 0
    return {"pixel_values": pixels * mask[:, None], "pixel_mask": mask}


def _row_pixels(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Idefics3's inputs: each row's images, padded with all-zero images to the most of any row
    (``(rows, images, channels, size, size)``), and a pixel mask in which one image's right
    quarter is padding."""
    size = config.vision_config.image_size
    channels = getattr(config.vision_config, "num_channels", 3)
    pixels = torch.zeros(len(counts), max(max(counts), 1), channels, size, size)
    mask = torch.zeros(pixels.shape[:2] + (size, size), dtype=torch.long)
    for row, count in enumerate(counts):
        pixels[row, :count] = torch.randn(count, channels, size, size, generator=gen)
        mask[row, :count] = 1
    padded = next((row, count - 1) for row, count in enumerate(counts) if count)
    mask[padded][:, size - size // 4 :] = 0
    pixels[padded] *= mask[padded]
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


def _packed_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Packed patches (Cosmos3 Edge's SigLIP 2, Dots 3 Note): every image's patches flattened, with no temporal
    patch (``(patches, channels x patch x patch)``), and each image's grid, 4 x 4 patches."""
    vision = config.vision_config
    grid = torch.tensor([[1, 4, 4]] * sum(counts))
    width = vision.num_channels * vision.patch_size**2
    return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), width, generator=gen), "image_grid_thw": grid}


def _sized_images(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Apertus 1.5's inputs: images padded to the tokenizer's ``resolution`` and each image's true
    size (it tokenizes each image at its own size): a square image and a half-height one."""
    vision = config.vision_config
    size, images = vision.resolution, sum(counts)
    choices = [[size, size], [size // 2, size]]
    sizes = torch.tensor([choices[i % len(choices)] for i in range(images)])
    pixels = torch.zeros(images, vision.in_channels, size, size)
    for i, (height, width) in enumerate(sizes.tolist()):
        pixels[i, :, :height, :width] = torch.randn(vision.in_channels, height, width, generator=gen)
    return {"pixel_values": pixels, "image_sizes": sizes}


def _pooled_crops(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Molmo2's inputs: each image as one crop of flattened patches (``(images, crops, patches,
    channels x patch x patch)``), the patches each image token pools (2 x 2 neighbours, indices
    into every crop's patches), and each image's token grid."""
    vision = config.vision_config
    side, images = vision.image_size[0] // vision.patch_size, sum(counts)
    width = vision.num_channels * vision.patch_size**2
    pixels = torch.randn(images, 1, side * side, width, generator=gen)
    row, col, down, right = torch.meshgrid(*(torch.arange(n) for n in (side // 2, side // 2, 2, 2)), indexing="ij")
    one = ((2 * row + down) * side + 2 * col + right).reshape(-1, 4)
    pooling = torch.cat([one + i * side * side for i in range(images)])
    grids = torch.tensor([[side // 2, side // 2, 0, 0]] * images)
    return {"pixel_values": pixels, "image_token_pooling": pooling, "image_grids": grids}


def _glimmer_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Muse Glimmer's inputs: every image's patches flattened, as Qwen2-VL's, but the temporal
    patch is ``patch_temporal`` (and always 3 channels); a 4 x 4 grid of patches an image."""
    vision = config.vision_config
    grid = torch.tensor([[1, 4, 4]] * sum(counts))
    width = vision.patch_temporal * 3 * vision.patch_size**2
    return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), width, generator=gen), "image_grid_thw": grid}


def _grid_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Patches of single-frame images, every image's flattened in one tensor, and each image's
    grid of 4 x 4 patches (``image_grid_thw``), as Kimi K2.5's and VideoLLaMA 3's processors give
    them; VideoLLaMA 3's also gives each image's merge size (1 for images)."""
    vision = config.vision_config
    images = sum(counts)
    grid = torch.tensor([[1, 4, 4]] * images)
    shape = (getattr(vision, "num_channels", 3), vision.patch_size, vision.patch_size)
    inputs = {"pixel_values": torch.randn(int(grid.prod(-1).sum()), *shape, generator=gen), "image_grid_thw": grid}
    if config.model_type == "video_llama_3":
        inputs["pixel_values"] = inputs["pixel_values"].flatten(1)
        inputs["image_merge_sizes"] = torch.ones(images, dtype=torch.long)
    return inputs


def _navit_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """MiniCPM-V 4.6's inputs: every image's patches side by side in one row of patches
    (``(1, channels, patch, patches x patch)``), and each image's patch grid (``target_sizes``),
    whose sides are multiples of 4 (its two 2 x 2 merges)."""
    vision = config.vision_config
    choices = [[8, 8], [4, 8], [8, 4]]
    sizes = torch.tensor([choices[i % len(choices)] for i in range(sum(counts))], dtype=torch.int32)
    patch = vision.patch_size
    pixels = torch.randn(1, vision.num_channels, patch, int(sizes.prod(-1).sum()) * patch, generator=gen)
    return {"pixel_values": pixels, "target_sizes": sizes}


def _soft_token_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Gemma 4 Unified's inputs: each image's merged pixel patches, padded to the batch's most
    (``(images, patches, 3 x side x side)``), and each patch's (x, y) position, (-1, -1) on padding."""
    vision = config.vision_config
    choices = [(2, 2), (3, 1), (1, 2)]  # NOTE: (width, height) in merged patches: each image its own count
    grids = [choices[i % len(choices)] for i in range(sum(counts))]
    most = max(w * h for w, h in grids)
    pixels = torch.zeros(len(grids), most, 3 * vision.model_patch_size**2)
    positions = torch.full((len(grids), most, 2), -1, dtype=torch.long)
    for i, (width, height) in enumerate(grids):
        xy = torch.stack(torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy"), -1).reshape(-1, 2)
        positions[i, : len(xy)] = xy
        pixels[i, : len(xy)] = torch.randn(len(xy), pixels.shape[-1], generator=gen)
    return {"pixel_values": pixels, "image_position_ids": positions}


def _fuyu_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Fuyu's inputs: each image's patches flattened (``(images, patches, patch x patch x channels)``),
    which the model projects linearly, one token a patch."""
    patches = (config.image_size // config.patch_size) ** 2
    width = config.patch_size**2 * config.num_channels
    return {"pixel_values": torch.randn(sum(counts), patches, width, generator=gen)}


def _radio_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Nemotron-H Omni's inputs: every image's patches flattened in one tensor
    (``(patches, channels x patch x patch)``), and each image's patch grid (``image_grid_hw``)."""
    vision = config.vision_config
    grid = torch.tensor([[4, 4]] * sum(counts))
    width = vision.num_channels * vision.patch_size**2
    return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), width, generator=gen), "image_grid_hw": grid}


def _inkling_patches(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Inkling's inputs: patches of two frames, channels last (``(patches, frames, patch, patch,
    channels)``), four an image; its tower makes one token of each."""
    vision = config.vision_config
    shape = (vision.temporal_patch_size, vision.patch_size, vision.patch_size, vision.num_channels)
    return {"pixel_values": torch.randn(4 * sum(counts), *shape, generator=gen)}


#: families whose ``get_image_features`` returns one entry per row of the batch (all its images'
#: features), not one per image
_FEATURES_BY_ROW = frozenset({"idefics2", "idefics3", "smolvlm"})


def _two_resolutions(config: Any, counts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """DeepSeek-VL hybrid's inputs: each image at its low-resolution tower's size and at its SAM tower's."""
    images = sum(counts)
    low, high = config.vision_config, config.high_res_vision_config
    return {
        "pixel_values": torch.randn(images, 3, low.image_size, low.image_size, generator=gen),
        "high_res_pixel_values": torch.randn(images, 3, high.image_size, high.image_size, generator=gen),
    }


#: model type -> the builder of its image inputs from the images per row, where :func:`_pixels`'
#: default is not what its processor gives
_PIXEL_BUILDERS = {
    "deepseek_vl_hybrid": _two_resolutions,
    "lfm2_vl": _siglip2_patches,
    "aria": _masked_pixels,
    "idefics2": _row_pixels,
    "idefics3": _row_pixels,
    "smolvlm": _row_pixels,
    "mistral3": _pixtral_pixels,
    "lighton_ocr": _pixtral_pixels,
    "llava_next": _anyres_pixels,
    "llava_onevision": _anyres_pixels,
    "llava_next_video": _anyres_pixels,
    "muse_glimmer": _glimmer_patches,
    "muse_spark": _glimmer_patches,
    "cosmos3_edge": _packed_patches,
    "apertus1p5": _sized_images,
    "dots3_note": _packed_patches,
    "molmo2": _pooled_crops,
    "kimi_k25": _grid_patches,
    "video_llama_3": _grid_patches,
    "minicpmv4_6": _navit_patches,
    "minicpmv4_7": _navit_patches,
    "minicpm_ocr": _navit_patches,
    "gemma4_unified": _soft_token_patches,
    "fuyu": _fuyu_patches,
    "nemotron_h_omni": _radio_patches,
    "inkling_mm_model": _inkling_patches,
}


def image_batch(
    model: torch.nn.Module, *, batch_size: int = 4, seq_len: int = 24, images_per_row=(1, 0, 2, 1), seed: int = 0
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` and the family's image inputs.

    Row ``r`` holds ``images_per_row[r]`` images (rows without images are text-only), left
    padding of uneven length, and labels of ``-100`` on padding and image tokens. The tokens an
    image takes are counted with ``model``'s own ``get_image_features``. A prefix-LM family
    (PaliGemma) labels each row's suffix only (``_prefix_lm``).
    """
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    counts = [images_per_row[r % len(images_per_row)] for r in range(batch_size)]
    builder = _PIXEL_BUILDERS.get(config.model_type)
    inputs = builder(config, counts, gen) if builder is not None else _pixels(config, sum(counts), gen)
    owner = model.base_model if hasattr(model.base_model, "language_model") else model
    sizes = inspect.signature(owner.get_image_features).parameters.get("image_sizes")
    if sizes is not None and sizes.default is inspect.Parameter.empty and "image_sizes" not in inputs:
        # NOTE: Mistral 3 needs them
        inputs["image_sizes"] = torch.tensor([list(inputs["pixel_values"].shape[-2:])] * sum(counts))
    with torch.no_grad():
        out = owner.get_image_features(**inputs)
    pooled = getattr(out, "pooler_output", out)
    if pooled is None:  # NOTE: Llama 4's forward projects the vision model's last hidden state itself
        pooled = out.last_hidden_state
    if isinstance(pooled, torch.Tensor):  # NOTE: every image's features in one tensor: equal counts
        total = pooled.reshape(-1, pooled.shape[-1]).shape[0]
        per_image = [total // sum(counts)] * sum(counts)
    else:
        per_image = [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in pooled]
    if config.model_type in _FEATURES_BY_ROW:  # NOTE: a row's images take equal shares of its features
        per_image = [n // c for n, c in zip(per_image, counts) for _ in range(c)]
    needed = max(r % 3 + 2 + sum(per_image[:c]) + 3 * c for r, c in enumerate(counts))
    seq_len = max(seq_len, needed)
    ids = torch.randint(3, _VIDEO, (batch_size, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    image = 0
    for row, count in enumerate(counts):
        pad = row % 3
        ids[row, :pad], mask[row, :pad] = 0, 0
        at = pad + 1
        for _ in range(count):
            n = per_image[image]
            ids[row, at - 1], ids[row, at : at + n], ids[row, at + n] = _START, _IMAGE, _END
            at += n + 3
            image += 1
        if at > seq_len:
            raise ValueError(f"seq_len {seq_len} is too short for {count} images of {per_image} tokens in row {row}")
    labels = ids.clone()
    labels[(mask == 0) | (ids == _IMAGE)] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, **inputs}
    forward = inspect.signature(type(owner).forward).parameters
    for name in ("token_type_ids", "mm_token_type_ids"):
        if name in forward:
            batch[name] = (ids == _IMAGE).long()
    if config.model_type in _PREFIX_LM:
        _prefix_lm(batch)
    return batch


#: families whose ``token_type_ids`` mark a prefix (images and prompt, attended to both ways) and
#: the suffix the labels cover, as PaliGemma's processor gives them
_PREFIX_LM = frozenset({"paligemma"})


def _prefix_lm(batch: dict[str, torch.Tensor]) -> None:
    """A prefix-LM batch: each row's images and two prompt tokens after them (or after its padding)
    are the prefix, token type 0 and no labels; the rest is the suffix, token type 1."""
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1])
    last_image = torch.where(ids == _END, positions, -1).amax(-1)
    padding = (batch["attention_mask"] == 0).sum(-1)
    start = (torch.maximum(last_image + 1, padding) + 2).clamp(max=ids.shape[1] - 1)
    suffix = positions >= start.unsqueeze(-1)
    batch["token_type_ids"] = suffix.long()
    batch["labels"] = torch.where(suffix, batch["labels"], -100)


def save_tiny_vision_model(model_type: str, directory: str, *, seed: int = 0) -> Any:
    """Save the randomly initialised tiny ``model_type`` (sharded, as released checkpoints are); its config."""
    config = tiny_vision_config(model_type)
    _save_config_model(config, directory, seed=seed)
    return config


def vision_step_problems(
    rank: int, world_size: int, directories: dict[str, str], schedule: str = "1F1B"
) -> dict[str, list[str]]:
    """Run on each of ``world_size`` ranks: for each tiny model saved in ``directories``, a step with
    images, one text-only, and ``eval`` against the unsplit model; the differences found, by type."""
    import ppzoo
    from ppzoo.testing.reference import grad_mismatches, load_reference

    found: dict[str, list[str]] = {}
    for model_type, directory in directories.items():
        problems = found.setdefault(model_type, [])
        reference = load_reference(directory)
        pipe = ppzoo.pipeline(
            directory,
            pp=world_size,
            microbatches=2,
            schedule=schedule,
            dtype=torch.float32,
            attn_implementation="eager",
        )
        text = _text_only(image_batch(reference), reference.config.model_type)
        for what, batch in (("images", image_batch(reference)), ("text", text)):
            # NOTE: train mode against train mode: the vision tower runs whole, before the schedule, on
            # the first stage's rank, so its dropout (drop path) draws what the unsplit model's does
            # when every rank seeds torch alike before the step
            reference.train()
            reference.zero_grad()
            torch.manual_seed(_STEP_SEED)
            expected = reference(**batch)
            expected.loss.backward()
            reference.eval()
            with torch.no_grad():
                evaluated = reference(**batch).logits
            for p in pipe.parameters():
                p.grad = None
            ids, labels = batch.pop("input_ids"), batch.pop("labels")
            # NOTE: eval before and after the step: each must set the tower's mode (dropout) itself
            for when in ("before", "after"):
                if when == "after":
                    torch.manual_seed(_STEP_SEED)
                    loss = float(pipe.step(ids, labels=labels, **batch))
                    if abs(loss - expected.loss.item()) > 1e-5 * max(1.0, abs(loss)):
                        problems.append(f"{what}: loss {loss} != {expected.loss.item()}")
                    tied = pipe.adapter.tied_weights(pipe.config)
                    problems += [f"{what}: {b}" for b in grad_mismatches(pipe.named_parameters(), reference, tied=tied)]
                logits = pipe.eval(ids, **batch)
                if logits is not None and not torch.allclose(logits, evaluated, rtol=1e-5, atol=1e-5):
                    diff = (logits - evaluated).abs().max().item()
                    problems.append(f"{what}: eval logits {when} the step differ by {diff:.3e}")
    return found


#: the seed every rank and the reference give torch before a step (the vision tower's dropout)
_STEP_SEED = 1234
#: families whose forward refuses to train without ``mm_token_type_ids``, even on text (Molmo2)
_TOKEN_TYPES_REQUIRED = frozenset({"molmo2"})


def _text_only(batch: dict[str, torch.Tensor], model_type: str = "") -> dict[str, torch.Tensor]:
    """The same rows with every image token made a text token and no image inputs (but all-zero
    token types for a family whose forward requires them, as its processor gives them)."""
    keep = {"input_ids", "attention_mask", "labels"}
    text = {k: v.clone() for k, v in batch.items() if k in keep}
    if model_type in _TOKEN_TYPES_REQUIRED:
        text["mm_token_type_ids"] = torch.zeros_like(text["input_ids"])
    text["input_ids"][text["input_ids"] == _IMAGE] = 7
    text["labels"] = torch.where(text["attention_mask"] == 0, -100, text["input_ids"])
    return text


# -- the zoo's second table: image-text-to-text models ---------------------------------------------

#: verdicts of :func:`vision_zoo`: exact (images, text and eval equal the unsplit model on 2 ranks),
#: refused (ppzoo's rules, with the reason), wrong, error, and unchecked (no tiny model with images
#: could be built for the type, so ppzoo claims nothing for it)
VISION_RESULTS = ("exact", "refused", "wrong", "error", "unchecked")


@dataclasses.dataclass
class VisionResult:
    model_type: str
    result: str
    detail: str = ""
    adapter: str = ""


def vision_model_types() -> list[str]:
    """The installed transformers' image-text-to-text model types, less the encoder-decoder ones."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from ppzoo.testing.tiny_configs import _encoder_decoder

    found = []
    for model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        try:
            if not _encoder_decoder(model_type):
                found.append(model_type)
        except KeyError:
            continue
    return found


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
#: the most parameters a tiny model may have: a config the shrinking misses is not built for real
_TINY_PARAMETERS = 8_000_000


def vision_zoo(types: list[str] | None = None, *, progress=None, timeout_s: float = 900.0) -> list[VisionResult]:
    """Check each image-text-to-text type: refused by ppzoo's rules, or run with images on 2 ranks."""
    import tempfile

    from ppzoo import registry
    from ppzoo.testing.census import _one_line, _quiet, crash_summary
    from ppzoo.testing.distributed import DistributedFailure, run_distributed
    from ppzoo.testing.reference import load_reference

    types = vision_model_types() if types is None else types
    results: dict[str, VisionResult] = {}
    to_run: dict[str, str] = {}
    root = tempfile.mkdtemp(prefix="ppzoo-vision-zoo-")
    for model_type in types:
        with _quiet():
            try:
                config = zoo_vision_config(model_type)
                adapter = registry.adapter_for(config)
                problems = adapter.validate(config)
            except Exception as exc:  # noqa: BLE001 - a config that does not build is reported
                results[model_type] = VisionResult(model_type, "unchecked", _one_line(f"{type(exc).__name__}: {exc}"))
                continue
            if problems:
                codes = ", ".join(sorted({p.code for p in problems}))
                detail = _one_line(f"{codes}: {problems[0].message}")
                results[model_type] = VisionResult(model_type, "refused", detail, adapter.name)
                continue
            try:
                from ppzoo.meta import meta_model

                size = sum(p.numel() for p in meta_model(config).parameters())
                if size > _TINY_PARAMETERS:
                    raise ValueError(f"the shrunk config still has {size:,} parameters")
                directory = f"{root}/{model_type}"
                _save_config_model(config, directory)
                reference = load_reference(directory)
                with torch.no_grad():  # NOTE: the unsplit model runs with images, or there is nothing to equal
                    reference(**image_batch(reference))
            except Exception as exc:  # noqa: BLE001 - no tiny model with images: nothing claimed
                detail = _one_line(f"no tiny model with images ({type(exc).__name__}: {exc})")
                results[model_type] = VisionResult(model_type, "unchecked", detail, adapter.name)
                continue
            to_run[model_type] = directory
            results[model_type] = VisionResult(model_type, "error", "not run", adapter.name)
    for model_type, directory in to_run.items():
        try:
            found = run_distributed(vision_step_problems, 2, {model_type: directory}, "1F1B", timeout_s=timeout_s)
            problems = found[0][model_type] + found[1][model_type]
            verdict = "exact" if not problems else "wrong"
            results[model_type].result, results[model_type].detail = verdict, _one_line("; ".join(problems))
        except DistributedFailure as exc:
            results[model_type].result = "error"
            results[model_type].detail = _one_line(crash_summary(str(exc)))
        if progress is not None:
            progress(results[model_type])
    return [results[t] for t in types]


def _save_config_model(config: Any, directory: str, *, seed: int = 0) -> None:
    """Save a randomly initialised model of ``config``'s class, in shards of 40 KB."""
    from ppzoo.meta import model_class
    from ppzoo.testing.reference import perturb_zero_init

    torch.manual_seed(seed)
    model = model_class(config).from_config(config, dtype=torch.float32)
    perturb_zero_init(model, seed)
    model.save_pretrained(directory, max_shard_size="40KB")


def render_vision(results: list[VisionResult], *, markdown: bool = False) -> str:
    """The second table of ``ppzoo zoo``: one row per image-text-to-text type, and the totals."""
    counts = {r: sum(1 for x in results if x.result == r) for r in VISION_RESULTS}
    head = f"image-text-to-text: {counts['exact']} of {len(results)} exact with images, " + ", ".join(
        f"{n} {r}" for r, n in counts.items() if r != "exact"
    )
    if not markdown:
        rows = [f"{r.model_type:<28} {r.result:<10} {r.adapter:<8} {r.detail}" for r in results]
        return "\n".join([head, *rows])
    rows = [
        f"| {r.model_type} | {r.adapter or '-'} | {r.result} | {r.detail.replace('|', '/') or '-'} |" for r in results
    ]
    return "\n".join([head, "", "| model type | adapter | with images | detail |", "|---|---|---|---|", *rows])
