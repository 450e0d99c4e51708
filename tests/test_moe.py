"""MoE adapters: expert key conversion both ways, both checkpoint layouts, cost, router aux loss."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.config import load_config
from ppzoo.meta import meta_model
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.reference import batch, load_reference, save_tiny_model, tiny

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module", params=MOE)
def model(request):
    """A tiny MoE model (fused parameters) with its adapter and config."""
    adapter, config = tiny(request.param)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return adapter, config, AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def write_checkpoint(directory, config, tensors):
    config.save_pretrained(directory)
    save_file(tensors, directory / "model.safetensors")
    return directory


def chain(directory, n, ids, mask):
    config = load_config(directory)
    adapter = registry.adapter_for(config)
    plan = ppzoo.plan(directory, pp=n, layers_per_stage=-(-config.num_hidden_layers // n))
    stages = [
        build_stage(config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(n)
    ]
    return stages, run_chain(stages, ids, attention_mask=mask)


# -- key map -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fqn", "first_key"),
    [
        ("mixtral", "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.block_sparse_moe.experts.0.w1.weight"),
        ("mixtral", "model.layers.2.mlp.experts.down_proj", "model.layers.2.block_sparse_moe.experts.0.w2.weight"),
        ("qwen2_moe", "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.0.gate_proj.weight"),
        ("qwen3_moe", "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.0.down_proj.weight"),
    ],
)
def test_split_is_the_exact_inverse_of_combine(name, fqn, first_key):
    adapter, config = tiny(name)
    key_map = adapter.key_map(config)
    experts, rows = 4, 32
    fused = torch.randn(experts, rows, 16)
    parts = key_map.split(fqn, fused)
    matrices = 2 if fqn.endswith("gate_up_proj") else 1
    assert len(parts) == experts * matrices and next(iter(parts)) == first_key
    assert all(t.shape == (rows // matrices, 16) and t.is_contiguous() for t in parts.values())
    sources = key_map.sources(fqn, parts.__contains__)
    assert sources == list(parts)
    assert torch.equal(key_map.combine(fqn, [parts[k] for k in sources]), fused)
    # expert e's gate is row block 0 of fused[e], its up the block after it
    if matrices == 2:
        gate, up = list(parts.values())[1], list(parts.values())[experts + 1]
        assert torch.equal(gate, fused[1, : rows // 2]) and torch.equal(up, fused[1, rows // 2 :])


def test_mixtral_renames_its_moe_block_both_ways():
    adapter, config = tiny("mixtral")
    key_map = adapter.key_map(config)
    t = torch.randn(4, 32)
    assert list(key_map.split("model.layers.3.mlp.gate.weight", t)) == ["model.layers.3.block_sparse_moe.gate.weight"]
    assert key_map.sources(
        "model.layers.3.mlp.gate.weight", {"model.layers.3.block_sparse_moe.gate.weight"}.__contains__
    ) == ["model.layers.3.block_sparse_moe.gate.weight"]
    assert key_map.split("model.layers.3.self_attn.q_proj.weight", t) == {"model.layers.3.self_attn.q_proj.weight": t}


def test_split_writes_what_save_pretrained_writes(model, tmp_path):
    adapter, config, hf = model
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    key_map = adapter.key_map(config)
    ours = {k: v for fqn, t in hf.state_dict().items() for k, v in key_map.split(fqn, t).items()}
    assert sorted(ours) == sorted(saved)
    assert [k for k in ours if not torch.equal(ours[k], saved[k])] == []


@pytest.mark.parametrize("layout", ["fused", "per-expert", "per-expert-renamed"])
def test_stages_load_either_checkpoint_layout(model, layout, tmp_path):
    adapter, config, hf = model
    key_map = adapter.key_map(config)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if layout == "fused":
        tensors = state
        assert any(k.endswith("experts.gate_up_proj") for k in tensors)
    else:
        tensors = {k: v for fqn, t in state.items() for k, v in key_map.split(fqn, t).items()}
        if layout == "per-expert-renamed":
            # transformers' own spelling after renaming, before fusing: mlp.experts.<e>.<matrix>
            tensors = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()}
        assert not any(k.endswith("experts.gate_up_proj") for k in tensors)
    directory = write_checkpoint(tmp_path, config, tensors)
    ids, mask, _ = batch(config.vocab_size)
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, attention_mask=mask).logits
        stages, got = chain(directory, 2, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for stage in stages:
        for fqn, p in stage.named_parameters():
            assert torch.equal(p, state[fqn]), fqn


def test_missing_expert_names_the_fused_parameter(tmp_path):
    adapter, config = tiny("qwen3_moe")
    hf = AutoModelForCausalLM.from_config(config)
    key_map = adapter.key_map(config)
    tensors = {k: v for fqn, t in hf.state_dict().items() for k, v in key_map.split(fqn, t).items()}
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    directory = write_checkpoint(tmp_path, config, tensors)
    from ppzoo.checkpoint import CheckpointError

    with pytest.raises(CheckpointError) as exc:
        chain(directory, 1, *batch(config.vocab_size)[:2])
    assert "'model.layers.0.mlp.experts.3.up_proj.weight'" in str(exc.value)
    assert "needed for 'model.layers.0.mlp.experts.gate_up_proj'" in str(exc.value)


# -- cost ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer", "routed"),
    [
        ("mixtral", 0, True),
        ("qwen2_moe", 1, True),
        ("qwen2_moe", 3, False),
        ("qwen3_moe", 2, False),
        ("qwen3_moe", 4, True),
    ],
)
def test_cost_counts_only_routed_experts(name, layer, routed):
    adapter, config = tiny(name)
    module = meta_model(config).model.layers[layer]
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = h * q + 2 * h * kv + q * h
    matrix = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
    if routed:
        experts = adapter.num_experts(config)
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = getattr(config, "shared_expert_intermediate_size", 0)
        want = attention + experts * h + config.num_experts_per_tok * 3 * inter * h
        want += (3 * shared * h + h) if shared else 0  # shared expert and its gate, in full
        assert want < matrix
    else:
        want = matrix  # a dense layer counts in full
        assert want == attention + 3 * config.intermediate_size * h
    assert adapter.active_matrix_params(config, module, matrix) == want


# -- router logits and aux loss ---------------------------------------------------------------


def test_stages_record_their_router_logits(tmp_path):
    adapter, config = tiny("qwen2_moe", output_router_logits=True)
    directory = save_tiny_model(adapter, tmp_path, config=config)
    reference = load_reference(directory)
    ids, mask, _ = batch(config.vocab_size)
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=mask)
        stages, _ = chain(directory, 3, ids, mask)
    moe_layers = adapter.moe_layers(config)
    assert moe_layers == [1, 5, 7]
    for stage in stages:
        held = [i for i in stage.ppzoo_stage.layers if i in moe_layers]
        assert len(stage.ppzoo_router_logits) == len(held)
    recorded = [t for s in stages for t in s.ppzoo_router_logits]
    assert len(recorded) == len(out.router_logits) == 3
    for got, want in zip(recorded, out.router_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a second forward replaces, never appends
    with torch.no_grad():
        run_chain(stages, ids, attention_mask=mask)
    assert len([t for s in stages for t in s.ppzoo_router_logits]) == 3


def test_the_tiny_configs_turn_the_router_aux_loss_on():
    """So that the conformance kit's stage chain and distributed step compare the aux loss too."""
    for name in MOE:
        _, config = tiny(name)
        assert config.output_router_logits is True and config.router_aux_loss_coef > 0, name


def test_aux_loss_is_none_without_output_router_logits(tmp_path):
    adapter, config = tiny("mixtral", output_router_logits=False)
    directory = save_tiny_model(adapter, tmp_path, config=config)
    stages, _ = chain(directory, 2, *batch(config.vocab_size)[:2])
    assert adapter.aux_loss(config, stages) is None


def test_stage_terms_add_up_when_every_layer_routes_alike(tmp_path):
    """The documented pipeline semantics: each stage's term is weighted by its share of MoE layers."""
    adapter, config = tiny("mixtral", output_router_logits=True)
    directory = save_tiny_model(adapter, tmp_path, config=config)
    ids, mask, _ = batch(config.vocab_size)
    with torch.no_grad():
        stages, _ = chain(directory, 3, ids, mask)
        same = stages[0].ppzoo_router_logits[0]
        for stage in stages:
            stage.ppzoo_router_logits = [same.clone() for _ in stage.ppzoo_router_logits]
        whole = adapter.aux_loss(config, stages, mask)
        parts = [adapter.aux_loss(config, [s], mask) for s in stages]
    assert [len(s.ppzoo_router_logits) for s in stages] == [3, 3, 2]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts[2], whole * 2 / 8, rtol=1e-6, atol=0)
