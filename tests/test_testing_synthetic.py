"""Synthetic checkpoints (``ppzoo.testing.synthetic``): what the benchmarks and large-model tests load."""

import json

import pytest
import torch
from transformers import LlamaConfig

from ppzoo.testing.synthetic import checkpoint_files, generate_checkpoint


def tiny_config():
    """A small Llama (4 layers of width 64, vocabulary 512): several 100 KB shards in bf16."""
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return generate_checkpoint(
        tmp_path_factory.mktemp("tiny-bf16"), tiny_config(), dtype="bfloat16", shard_bytes=100_000
    )


def test_generated_checkpoint_is_a_sharded_hf_checkpoint(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = checkpoint_files(tiny_checkpoint)
    assert len(shards) > 1
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in shards) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    assert model.model.norm.weight.eq(1).all()
    std = model.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02
    # reused as it is when asked again for the same config
    stamp = (tiny_checkpoint / shards[0].name).stat().st_mtime_ns
    generate_checkpoint(tiny_checkpoint, tiny_config(), dtype="bfloat16", shard_bytes=100_000)
    assert (tiny_checkpoint / shards[0].name).stat().st_mtime_ns == stamp
