"""The zoo's second table: image-text-to-text models, refused by ppzoo's rules or run with images
on 2 ranks against the unsplit model (``ppzoo zoo``, docs/zoo.md)."""

from __future__ import annotations

import dataclasses

import torch

from ppzoo.testing.image_batches import image_batch
from ppzoo.testing.vision_step import _save_config_model, vision_step_problems
from ppzoo.testing.vision_zoo_configs import zoo_vision_config

__all__ = ["VISION_RESULTS", "VisionResult", "render_vision", "vision_model_types", "vision_zoo"]


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
