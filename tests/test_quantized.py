"""Quantized checkpoints (``ppzoo.checkpoint.quantized``): FP8 block scales and MXFP4 experts
dequantized on load as transformers dequantizes them, every other method refused before a read.

The FP8 reference is computed here from the format's definition (each ``block × block`` tile of
the ``F8_E4M3`` weight times its ``weight_scale_inv``); the MXFP4 reference is transformers'
``from_pretrained`` with ``Mxfp4Config(dequantize=True)``.
"""

from __future__ import annotations

import json
import math
import traceback

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig, Mxfp4Config

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.checkpoint.quantized import dequantizer, quant_method, unquantized_config
from ppzoo.config import load_config
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.distributed import run_distributed
from ppzoo.validation import ValidationError

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
BLOCK = 16


class RecordingCheckpoint(Checkpoint):
    """A checkpoint that records the key of every tensor read (whole or in part)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys: list[str] = []

    def _get_tensor(self, handle, key):
        self.keys.append(key)
        return super()._get_tensor(handle, key)

    def _get_slice(self, handle, key, part):
        self.keys.append(key)
        return super()._get_slice(handle, key, part)


def quantize_fp8(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepSeek-V3 layout of ``weight``: F8_E4M3 values and a float32 ``weight_scale_inv`` per
    ``block × block`` tile (the last tile of a side partial when ``block`` does not divide it)."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    scale_inv = torch.empty(grid, dtype=torch.float32)
    values = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            scale_inv[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            values[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale_inv[i, j]).to(
                torch.float8_e4m3fn
            )
    return values, scale_inv


def dequantize_fp8(values: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    """The format's definition: each tile's values times its scale, in float32."""
    rows, cols = values.shape
    scale = scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return values.float() * scale


def stage_keys(checkpoint_keys, stage) -> set[str]:
    """The checkpoint keys of the modules a stage holds (their weights, scales and biases)."""
    return {k for k in checkpoint_keys if any(k.startswith(m + ".") for m in stage.modules)}


def fp8_checkpoint(directory, *, intermediate_size=128):
    """A tiny Llama saved as DeepSeek-V3 saves FP8 weights; returns the dequantized float32 state dict.

    Every projection of every layer is FP8 with its scales; embedding, norms and head stay plain,
    as in the released checkpoint. ``intermediate_size`` not a multiple of the block gives partial blocks.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    tensors, reference = {}, {}
    for key, value in model.state_dict().items():
        if ".layers." in key and key.endswith("proj.weight"):
            values, scale_inv = quantize_fp8(value, BLOCK)
            tensors[key], tensors[key + "_scale_inv"] = values, scale_inv
            reference[key] = dequantize_fp8(values, scale_inv, BLOCK)
        else:
            tensors[key] = reference[key] = value.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.quantization_config = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [BLOCK, BLOCK],
    }
    config.save_pretrained(directory)
    return reference


def mxfp4_checkpoint(directory):
    """A tiny GPT-OSS whose experts are stored as GPT-OSS ships them: ``*_blocks`` (two FP4 values a
    byte, 32 values a block) and ``*_scales`` (an E8M0 exponent a block), drawn at random."""
    torch.manual_seed(0)
    config = GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=96,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, fan_in, fan_out = value.shape
            tensors[key + "_blocks"] = torch.randint(0, 256, (experts, fan_out, fan_in // 32, 16), dtype=torch.uint8)
            tensors[key + "_scales"] = torch.randint(122, 130, (experts, fan_out, fan_in // 32), dtype=torch.uint8)
        else:
            tensors[key] = value.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.quantization_config = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    config.save_pretrained(directory)
    return set(tensors)


def build_all(directory, config, plan, dtype):
    """Every stage of ``plan``, each read through its own recording checkpoint."""
    adapter = registry.adapter_for(unquantized_config(config))
    stages, reads = [], []
    for index in range(plan.num_stages):
        checkpoint = RecordingCheckpoint(directory)
        stages.append(build_stage(config, adapter, plan, index, checkpoint=checkpoint, dtype=dtype))
        reads.append(checkpoint.keys)
    return stages, reads


# -- FP8 block scales ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("intermediate_size", [128, 120], ids=["whole-blocks", "partial-blocks"])
def test_fp8_block_scaled_weights_load_dequantized(tmp_path, dtype, intermediate_size):
    reference = fp8_checkpoint(tmp_path, intermediate_size=intermediate_size)
    config = load_config(tmp_path)
    assert quant_method(config) == "fp8"
    plan = ppzoo.plan(config, pp=2, schedule="Interleaved1F1B")
    stages, reads = build_all(tmp_path, config, plan, dtype)
    all_keys = set(Checkpoint(tmp_path).weight_map)
    for stage, module, read in zip(plan.stages, stages, reads, strict=True):
        assert sorted(read) == sorted(stage_keys(all_keys, stage)), stage.index  # each once, scales included
        for fqn, value in module.state_dict().items():
            assert value.dtype == dtype, fqn
            assert torch.equal(value, reference[fqn].to(dtype)), fqn
    expected = AutoModelForCausalLM.from_config(unquantized_config(config), dtype=dtype)
    expected.load_state_dict({k: v.to(dtype) for k, v in reference.items()})
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(run_chain(stages, ids), expected(ids).logits)


def test_fp8_dequantizer_is_transformers_own(tmp_path):
    """Whole blocks: ppzoo's values are transformers' ``Fp8Dequantize`` output, element for element."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    fp8_checkpoint(tmp_path)
    config = load_config(tmp_path)
    quantizer = dequantizer(config)
    op = quantizer.get_load_operations()["dequantize"](quantizer)
    assert isinstance(op, Fp8Dequantize)
    values, scale_inv = quantize_fp8(torch.randn(64, 48), BLOCK)
    theirs = Fp8Dequantize(quantizer)._dequantize_one(values, scale_inv, output_dtype=torch.bfloat16)
    assert torch.equal(op._dequantize_one(values, scale_inv, output_dtype=torch.bfloat16), theirs)


def test_a_key_map_that_reads_a_quantized_tensor_raw_is_refused(tmp_path):
    """A key map naming a stored FP8 weight that transformers' rules do not reach would read it
    without its scales: refused, never loaded as garbage."""
    from safetensors.torch import load_file

    from ppzoo.adapter import KeyMap
    from ppzoo.checkpoint import CheckpointError

    fp8_checkpoint(tmp_path)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["legacy.q.weight"], tensors["legacy.q.weight_scale_inv"] = (
        tensors.pop(q_proj),
        tensors.pop(q_proj + "_scale_inv"),
    )
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = load_config(tmp_path)
    plan = ppzoo.plan(config, pp=2)
    adapter = registry.adapter_for(config)

    class Legacy(KeyMap):
        def sources(self, fqn, available):
            return ["legacy.q.weight"] if fqn == q_proj else [fqn]

    adapter.key_map = lambda config: Legacy()
    with pytest.raises(CheckpointError, match=r"'legacy\.q\.weight' \(needed for .*q_proj.*\) is stored quantized"):
        build_stage(config, adapter, plan, 0, checkpoint=Checkpoint(tmp_path))


# -- MXFP4 experts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_experts_load_as_transformers_dequantizes_them(tmp_path, dtype):
    keys = mxfp4_checkpoint(tmp_path)
    config = load_config(tmp_path)
    assert quant_method(config) == "mxfp4"
    # NOTE: the split does not depend on how the weights are stored
    plan = ppzoo.plan(unquantized_config(config), pp=2)
    stages, reads = build_all(tmp_path, config, plan, dtype)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True)
    )
    expected = reference.state_dict()
    for stage, module, read in zip(plan.stages, stages, reads, strict=True):
        assert sorted(read) == sorted(stage_keys(keys, stage)), stage.index
        assert any(k.endswith("_blocks") for k in read) and any(k.endswith("_scales") for k in read)
        for fqn, value in module.state_dict().items():
            assert value.dtype == expected[fqn].dtype == dtype, fqn
            assert torch.equal(value, expected[fqn]), fqn
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(run_chain(stages, ids), reference(ids).logits)


def test_mxfp4_config_plans(tmp_path):
    mxfp4_checkpoint(tmp_path)
    plan = ppzoo.plan(tmp_path, pp=2)
    assert plan.adapter == registry.adapter_for(unquantized_config(load_config(tmp_path))).name


# -- other methods: refused before any read --------------------------------------------------------

REFUSED = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
    "bitsandbytes": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
}


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_other_methods_are_refused_before_any_read(tmp_path, monkeypatch, method):
    fp8_checkpoint(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    settings["quantization_config"] = REFUSED[method]
    (tmp_path / "config.json").write_text(json.dumps(settings))
    read = []
    for name in ("_get_tensor", "_get_slice", "_read_into_storage"):
        original = getattr(Checkpoint, name)
        monkeypatch.setattr(
            Checkpoint, name, lambda self, *a, _name=name, _original=original: read.append(a) or _original(self, *a)
        )
    with pytest.raises(ValidationError) as caught:
        ppzoo.pipeline(tmp_path, pp=2, device="cpu")
    assert caught.value.codes == ["quantized-unsupported"]
    message = str(caught.value)
    assert f"quant_method={method!r}" in message and "bf16 checkpoint" in message
    assert read == []
    with pytest.raises(ValidationError, match="quantized-unsupported|ppzoo cannot dequantize"):
        ppzoo.plan(tmp_path, pp=2)
    with pytest.raises(ValueError, match=f"quant_method={method!r}"):
        dequantizer(load_config(tmp_path))


# -- a dequantized pipeline, end to end: eval and save_pretrained ----------------------------------


def _pipeline_case(rank, world_size, source, saved):
    try:
        pipe = ppzoo.pipeline(source, pp=2, device="cpu", dtype=torch.bfloat16, attn_implementation="eager")
        ids = torch.arange(24).reshape(2, 12) % 96
        logits = pipe.eval(ids)
        pipe.save_pretrained(saved)
        return None, (logits.float() if logits is not None else None)
    except Exception:  # noqa: BLE001 - returned, so the peer rank is not left blocked
        return traceback.format_exc(), None


@pytest.mark.distributed
def test_pipeline_loads_fp8_and_saves_it_dequantized(tmp_path):
    source, saved = tmp_path / "fp8", tmp_path / "saved"
    source.mkdir()
    reference = fp8_checkpoint(source)
    results = run_distributed(_pipeline_case, 2, str(source), str(saved))
    for error, _ in results:
        assert error is None, error
    logits = next(x for _, x in results if x is not None)
    expected = AutoModelForCausalLM.from_config(
        unquantized_config(load_config(source)), dtype=torch.bfloat16, attn_implementation="eager"
    )
    expected.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.items()})
    ids = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad():
        assert torch.equal(logits, expected(ids).logits.float())
    # the saved checkpoint is plain bf16: no quantization_config, no scales, the dequantized values
    written = json.loads((saved / "config.json").read_text())
    assert "quantization_config" not in written and written["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    state = reloaded.state_dict()
    assert set(state) == set(reference)
    for fqn, value in state.items():
        assert torch.equal(value, reference[fqn].to(torch.bfloat16)), fqn
