"""Quantized checkpoints: dequantized on load exactly as transformers dequantizes them, or refused.

A checkpoint whose config carries a ``quantization_config`` stores some weights in a packed form
beside their scales. Two released formats are read and dequantized to the stage's dtype:

- ``fp8`` (DeepSeek-V3, block-scaled): an ``F8_E4M3`` ``weight`` and a float32 ``weight_scale_inv``
  per ``weight_block_size`` block;
- ``mxfp4`` (GPT-OSS): the experts' ``gate_up_proj_blocks`` / ``down_proj_blocks`` (two FP4 values a
  byte) and ``*_scales`` (an E8M0 exponent per 32 values).

NOTE: nothing here computes a weight. transformers' own quantizer, built from the config with
``dequantize=True`` (what ``from_pretrained`` does on a CPU, or when asked), adds its weight
converters to the model's conversion rules (``update_weight_conversions``); ppzoo's loader
(:mod:`ppzoo.checkpoint.conversion`) drives those rules per stage, so a stage reads its own
weights and their scales, and each value is transformers' ``Fp8Dequantize`` / ``Mxfp4Dequantize``
result, cast to the dtype of the stage's parameter as ``from_pretrained`` casts it.

Every other method is refused by a validation rule (:func:`quantization_problems`), so
``ppzoo.plan`` and ``ppzoo.pipeline`` stop before any tensor is read. A dequantized stage holds
plain tensors: ``save_pretrained`` writes them in the stage's dtype, without ``quantization_config``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ppzoo.validation import Problem

__all__ = ["DEQUANTIZED", "dequantizer", "packed", "quant_method", "quantization_problems", "unquantized_config"]

#: the quantization methods ppzoo dequantizes on load, with the transformers config class that
#: dequantizes them in ``from_pretrained`` (named in the how-to of a refusal)
DEQUANTIZED: dict[str, str] = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}


def _settings(config: Any) -> Any:
    """The config's ``quantization_config`` (top level, else the text config's), or None."""
    found = getattr(config, "quantization_config", None)
    if not found and hasattr(config, "get_text_config"):
        try:
            text = config.get_text_config(decoder=True)
        except Exception:  # noqa: BLE001 - a config transformers cannot serialise (other rules name it)
            text = None
        found = getattr(text, "quantization_config", None)
    return found or None


def quant_method(config: Any) -> str | None:
    """The ``quant_method`` of the config's ``quantization_config``; None when the weights are plain.

    bitsandbytes configs that name no method (``load_in_4bit`` / ``load_in_8bit``) read as
    ``"bitsandbytes"``.
    """
    found = _settings(config)
    if found is None:
        return None
    get = found.get if isinstance(found, dict) else lambda k, d=None: getattr(found, k, d)
    method = get("quant_method")
    if method is None and (get("load_in_4bit") or get("load_in_8bit")):
        method = "bitsandbytes"
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    return str(method) if method is not None else "unknown"


def quantization_problems(config: Any) -> list[Problem]:
    """A ``quantized-unsupported`` problem when the config's weights are quantized in a way ppzoo
    does not dequantize; empty for plain weights and for :data:`DEQUANTIZED` methods."""
    method = quant_method(config)
    if method is None or method in DEQUANTIZED:
        return []
    return [
        Problem(
            "quantized-unsupported",
            f"the checkpoint ships weights quantized with quant_method={method!r}, which ppzoo cannot dequantize "
            f"(it dequantizes {', '.join(sorted(DEQUANTIZED))}); get a bf16 checkpoint: the unquantized release "
            "of the model if there is one, or load it with transformers and save it plain "
            "(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), then model.dequantize() where the "
            "method supports it, then model.save_pretrained(out)), and pass that directory",
        )
    ]


def dequantizer(config: Any) -> Any:
    """transformers' quantizer for the config's pre-quantized weights, set to dequantize; None for plain weights.

    Its ``update_weight_conversions`` adds the dequantizing converters to a model's conversion rules.

    Raises:
        ValueError: the method is not one of :data:`DEQUANTIZED` (the rules refuse it before loading).
    """
    found = _settings(config)
    if found is None:
        return None
    method = quant_method(config)
    if method not in DEQUANTIZED:
        raise ValueError(quantization_problems(config)[0].message)
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    settings = AutoQuantizationConfig.from_dict(dict(found)) if isinstance(found, dict) else copy.deepcopy(found)
    settings.dequantize = True
    quantizer = AutoHfQuantizer.from_config(settings, pre_quantized=True)
    if method == "fp8":
        operations = quantizer.get_load_operations()
        operations["dequantize"] = _fp8_dequantize_class()
        quantizer.get_load_operations = lambda: operations
    return quantizer


def _fp8_dequantize_class() -> type:
    """transformers' ``Fp8Dequantize``, taught the last, partial block of a side the block size
    does not divide.

    NOTE: DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows: 5 blocks of 128, the last one partial,
    as in DeepSeek's own ``weight_dequant`` and in transformers' ``FP8Linear`` (its scale grid is
    ``ceil(rows / 128)``). ``Fp8Dequantize`` refuses such a shape; here it is zero-padded to whole
    blocks, dequantized by ``Fp8Dequantize`` itself and cut back, so every element is still
    transformers' ``weight * scale`` in float32, cast once.
    """
    import torch
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    class PartialBlockFp8Dequantize(Fp8Dequantize):
        def _dequantize_one(self, quantized, scales, output_dtype=None):
            block = getattr(self.hf_quantizer.quantization_config, "weight_block_size", None)
            if block is None or quantized.dtype == torch.int8 or scales.dim() < 2 or quantized.dim() < 2:
                return super()._dequantize_one(quantized, scales, output_dtype)
            rows, cols = quantized.shape[-2:]
            grid = (-(-rows // block[0]), -(-cols // block[1]))
            if (rows, cols) == (grid[0] * block[0], grid[1] * block[1]) or tuple(scales.shape[-2:]) != grid:
                return super()._dequantize_one(quantized, scales, output_dtype)
            whole = quantized.new_zeros(
                *quantized.shape[:-2], grid[0] * block[0], grid[1] * block[1], dtype=torch.float32
            )
            whole[..., :rows, :cols] = quantized.to(torch.float32)
            return super()._dequantize_one(whole, scales, output_dtype)[..., :rows, :cols]

    return PartialBlockFp8Dequantize


def packed(key: str, has: Callable[[str], bool]) -> bool:
    """Whether checkpoint tensor ``key`` is stored quantized (or is a scale), ``has`` telling which
    keys the checkpoint holds: such a tensor is only meaningful through a dequantizing converter."""
    return key.endswith(("_blocks", "_scales", "_scale_inv")) or has(f"{key}_scale_inv")


def unquantized_config(config: Any) -> Any:
    """A copy of ``config`` without ``quantization_config``: what a dequantized model saves."""
    plain = copy.deepcopy(config)
    for cfg in {id(plain): plain, id(text := plain.get_text_config(decoder=True)): text}.values():
        if getattr(cfg, "quantization_config", None) is not None:
            del cfg.quantization_config
    return plain
