"""Image batches for the tiny vision-language models, each family's inputs as its processor lays them out.

An image batch holds token ids with each image expanded to as many image tokens as the model's own
``get_image_features`` returns features for it, the family's per-token inputs, and labels that
ignore the image tokens, as a processor and a fine-tuning recipe would give them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ppzoo.testing.tiny_vision_configs import _END, _IMAGE, _START, _VIDEO

__all__ = ["image_batch"]


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
