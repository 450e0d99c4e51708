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

#: model type -> the tiny config the zoo's second table checks it with, where the class defaults do
#: not shrink into one; unlike :data:`VISION_TYPES`, nothing is claimed for these (the zoo reports
#: what it finds: Llama 4's vision-language forward fails in transformers itself, so ppzoo refuses it)
_ZOO_CONFIGS = {
    "llama4": _llama4,
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
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
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


#: families whose ``get_image_features`` returns one entry per row of the batch (all its images'
#: features), not one per image
_FEATURES_BY_ROW = frozenset({"idefics2", "idefics3", "smolvlm"})

#: model type -> the builder of its image inputs from the images per row, where :func:`_pixels`'
#: default is not what its processor gives
_PIXEL_BUILDERS = {
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
        for what, batch in (("images", image_batch(reference)), ("text", _text_only(image_batch(reference)))):
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


def _text_only(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with every image token made a text token and no image inputs."""
    keep = {"input_ids", "attention_mask", "labels"}
    text = {k: v.clone() for k, v in batch.items() if k in keep}
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
        return config
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


#: model type -> what the zoo's generic tiny config of the type changes, in ``cls(**kwargs)``'s
#: keyword arguments, for a model that runs on tiny images
_ZOO_FIXES = {
    "aria": _aria_queries,
    "llava_next_video": _small_grids,
    "lighton_ocr": _pixtral_heads,
    "vipllava": _feature_layers,
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
