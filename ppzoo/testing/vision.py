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


#: model type -> its tiny config; every type here is checked exact with images
VISION_TYPES = {
    "llava": _llava,
    "gemma3": _gemma3,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": lambda: _qwen2_vl("qwen2_5_vl"),
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


def image_batch(
    model: torch.nn.Module, *, batch_size: int = 4, seq_len: int = 24, images_per_row=(1, 0, 2, 1), seed: int = 0
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` and the family's image inputs.

    Row ``r`` holds ``images_per_row[r]`` images (rows without images are text-only), left
    padding of uneven length, and labels of ``-100`` on padding and image tokens. The tokens an
    image takes are counted with ``model``'s own ``get_image_features``.
    """
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    counts = [images_per_row[r % len(images_per_row)] for r in range(batch_size)]
    inputs = _pixels(config, sum(counts), gen)
    owner = model.base_model if hasattr(model.base_model, "language_model") else model
    sizes = inspect.signature(owner.get_image_features).parameters.get("image_sizes")
    if sizes is not None and sizes.default is inspect.Parameter.empty:  # NOTE: Mistral 3 needs them
        inputs["image_sizes"] = torch.tensor([list(inputs["pixel_values"].shape[-2:])] * sum(counts))
    with torch.no_grad():
        out = owner.get_image_features(**inputs)
    pooled = getattr(out, "pooler_output", out)
    if isinstance(pooled, torch.Tensor):  # NOTE: every image's features in one tensor: equal counts
        total = pooled.reshape(-1, pooled.shape[-1]).shape[0]
        per_image = [total // sum(counts)] * sum(counts)
    else:
        per_image = [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in pooled]
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
    return batch


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
            reference.zero_grad()
            expected = reference(**batch)
            expected.loss.backward()
            for p in pipe.parameters():
                p.grad = None
            ids, labels = batch.pop("input_ids"), batch.pop("labels")
            loss = float(pipe.step(ids, labels=labels, **batch))
            if abs(loss - expected.loss.item()) > 1e-5 * max(1.0, abs(loss)):
                problems.append(f"{what}: loss {loss} != {expected.loss.item()}")
            bad = grad_mismatches(pipe.named_parameters(), reference, tied=pipe.adapter.tied_weights(pipe.config))
            problems += [f"{what}: {b}" for b in bad]
            logits = pipe.eval(ids, **batch)
            if logits is not None and not torch.allclose(logits, expected.logits.detach(), rtol=1e-5, atol=1e-5):
                problems.append(f"{what}: eval logits differ by {(logits - expected.logits).abs().max().item():.3e}")
    return found


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
    """The tiny config the zoo checks ``model_type`` with: :data:`VISION_TYPES`' own, else the
    shrunk class defaults (:func:`ppzoo.testing.tiny_configs.tiny_config`) with small images."""
    if model_type in VISION_TYPES:
        return tiny_vision_config(model_type)
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
    config = cls(**kwargs)
    config._attn_implementation = "eager"
    return config


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
_TINY_PARAMETERS = 5_000_000


def vision_zoo(types: list[str] | None = None, *, progress=None, timeout_s: float = 900.0) -> list[VisionResult]:
    """Check each image-text-to-text type: refused by ppzoo's rules, or run with images on 2 ranks."""
    import tempfile

    from ppzoo import registry
    from ppzoo.testing.census import _one_line, _quiet
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
                image_batch(load_reference(directory))
            except Exception as exc:  # noqa: BLE001 - no tiny model with images: nothing claimed
                detail = _one_line(f"no tiny image batch ({type(exc).__name__}: {exc})")
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
            results[model_type].detail = _one_line(str(exc).strip().splitlines()[-1])
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
