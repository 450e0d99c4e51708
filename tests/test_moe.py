"""MoE adapters: expert key conversion both ways, both checkpoint layouts, cost, router aux loss
(read from transformers' code for any family), and the MoE zoo types the native adapter runs exactly."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import ppzoo
from ppzoo import registry
from ppzoo.architectures.moe import ExpertKeyMap, RouterLoss, record_router_logits, router_loss_of, router_modules
from ppzoo.capabilities import Capability
from ppzoo.checkpoint import Checkpoint
from ppzoo.config import load_config
from ppzoo.meta import meta_model
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing import census
from ppzoo.testing.chain_checks import check_stage_chain
from ppzoo.testing.reference import batch, load_reference, save_tiny_model, tiny
from ppzoo.testing.tiny_configs import tiny_config

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
#: the per-expert layouts :class:`ExpertKeyMap` reads (Mixtral's, with its renamed MoE block, and
#: the ``qwen2_moe`` pattern's); the built-in adapters load through transformers' rules instead
EXPERT_KEY_MAPS = {
    "mixtral": ExpertKeyMap(
        num_experts=4,
        fused={"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
        renames=(("mlp", "block_sparse_moe"),),
    ),
    "qwen": ExpertKeyMap(num_experts=4, fused={"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
}


@pytest.mark.parametrize(
    ("name", "fqn", "first_key"),
    [
        ("mixtral", "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.block_sparse_moe.experts.0.w1.weight"),
        ("mixtral", "model.layers.2.mlp.experts.down_proj", "model.layers.2.block_sparse_moe.experts.0.w2.weight"),
        ("qwen", "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.0.gate_proj.weight"),
        ("qwen", "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.0.down_proj.weight"),
    ],
)
def test_split_is_the_exact_inverse_of_combine(name, fqn, first_key):
    key_map = EXPERT_KEY_MAPS[name]
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


def test_an_expert_key_map_renames_the_moe_block_both_ways():
    key_map = EXPERT_KEY_MAPS["mixtral"]
    t = torch.randn(4, 32)
    assert list(key_map.split("model.layers.3.mlp.gate.weight", t)) == ["model.layers.3.block_sparse_moe.gate.weight"]
    assert key_map.sources(
        "model.layers.3.mlp.gate.weight", {"model.layers.3.block_sparse_moe.gate.weight"}.__contains__
    ) == ["model.layers.3.block_sparse_moe.gate.weight"]
    assert key_map.split("model.layers.3.self_attn.q_proj.weight", t) == {"model.layers.3.self_attn.q_proj.weight": t}


def test_an_expert_key_map_splits_as_save_pretrained_writes(model, tmp_path):
    adapter, config, hf = model
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    key_map = EXPERT_KEY_MAPS["mixtral" if adapter.name == "mixtral" else "qwen"]
    ours = {k: v for fqn, t in hf.state_dict().items() for k, v in key_map.split(fqn, t).items()}
    assert sorted(ours) == sorted(saved)
    assert [k for k in ours if not torch.equal(ours[k], saved[k])] == []


@pytest.mark.parametrize("layout", ["fused", "released"])
def test_stages_load_either_checkpoint_layout(model, layout, tmp_path):
    """transformers' fused parameter names, or the per-expert layout ``save_pretrained`` writes."""
    adapter, config, hf = model
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if layout == "fused":
        directory = write_checkpoint(tmp_path, config, state)
    else:
        hf.save_pretrained(tmp_path)
        directory = tmp_path
        assert not any(k.endswith("experts.gate_up_proj") for k in load_file(tmp_path / "model.safetensors"))
    ids, mask, _ = batch(config.vocab_size)
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, attention_mask=mask).logits
        stages, got = chain(directory, 2, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for stage in stages:
        for fqn, p in stage.named_parameters():
            assert torch.equal(p, state[fqn]), fqn


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


# -- the router aux loss of any family, read from transformers' code ---------------------------


def _classes_with_router_loss():
    """The causal-LM classes whose modeling module computes a load-balancing loss (read as text
    first, so that only those modules are imported)."""
    import importlib
    import importlib.util
    import pathlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes = {}
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        module = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
        if spec is not None and "load_balancing_loss_func(" in pathlib.Path(spec.origin).read_text():
            found = getattr(importlib.import_module(spec.name), name, None)
            if found is not None:
                classes[name] = found
    return classes


def test_every_family_router_loss_is_read_from_its_forward():
    import inspect

    read = {}
    for name, cls in _classes_with_router_loss().items():
        recipe = router_loss_of(cls)
        adds = "load_balancing_loss_func(" in inspect.getsource(cls.forward)
        assert isinstance(recipe, RouterLoss) == adds, (name, recipe)
        if adds:
            assert recipe.switch == "output_router_logits", name
            read[name] = recipe.source
    assert len(read) >= 20
    assert "self.aux_loss_coef * aux_loss" in read["JetMoeForCausalLM"]  # its own coefficient name
    assert "math.floor(math.sqrt(self.num_experts))" in read["DogeForCausalLM"]  # an extra argument
    from transformers import DeepseekV3ForCausalLM, LlamaForCausalLM

    assert router_loss_of(LlamaForCausalLM) is router_loss_of(DeepseekV3ForCausalLM) is None  # none added
    assert router_loss_of(AutoModelForCausalLM) is None  # no forward of its own


class _OddForCausalLM(torch.nn.Module):
    """A forward whose router loss also reads something a stage does not have."""

    def forward(self, input_ids, labels=None, output_router_logits=None):
        outputs = self.model(input_ids)
        loss = self.loss_function(outputs.logits, labels)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing(outputs.router_logits, outputs.hidden_states)  # noqa: F821
            loss += self.router_aux_loss_coef * aux_loss
        return loss


def test_a_router_loss_that_reads_other_outputs_is_refused(monkeypatch):
    reason = router_loss_of(_OddForCausalLM)
    assert isinstance(reason, str) and "outputs.hidden_states" in reason
    from ppzoo.architectures import native

    monkeypatch.setattr(native, "_causal_lm_class", lambda config: _OddForCausalLM)
    problems = native.NativeAdapter().validate(tiny_config("granitemoe"))
    assert [p.code for p in problems] == ["native-moe"] and "outputs.hidden_states" in problems[0].message


@pytest.mark.parametrize("model_type", ["granitemoe", "minimax", "llama4_text"])
def test_router_modules_are_what_transformers_records(model_type):
    """By class (GraniteMoE), by class and layer name (MiniMax), output index 1 (Llama 4)."""
    config = tiny_config(model_type)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    record_router_logits(model)
    ids, mask, _ = batch(config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert len(router_modules(model)) == len(out.router_logits) > 0
    assert all(a is b for a, b in zip(model.ppzoo_router_logits, out.router_logits, strict=True))


# -- MoE zoo types the native adapter runs exactly --------------------------------------------

#: MoE zoo types whose stage chain (1-4 stages, logits, loss and every gradient) the native adapter
#: must make Hugging Face's, router aux loss on, and whether the forward adds one: attention sinks
#: and biased experts (GPT-OSS), GraniteMoE, interleaved dense and MoE layers (Llama 4, no router loss)
NATIVE_EXACT = {"gpt_oss": True, "granitemoe": True, "llama4_text": False}


@pytest.mark.parametrize("model_type", sorted(NATIVE_EXACT))
def test_native_moe_types_are_exact_with_the_router_aux_loss(model_type):
    adapter = census.zoo_adapter(model_type)
    assert adapter.name == f"native[{model_type}]"
    config = adapter.tiny_config()
    assert config.output_router_logits is True  # the switch is on; Llama 4's forward adds no router loss
    adds = router_loss_of(AutoModelForCausalLM._model_mapping[type(config)])
    assert isinstance(adds, RouterLoss) is NATIVE_EXACT[model_type]
    if NATIVE_EXACT[model_type]:
        # NOTE: declared, the kit's stage chain also requires the aux loss to matter to the loss
        adapter.capabilities = adapter.capabilities | {Capability.ROUTER_AUX_LOSS}
    check_stage_chain(adapter)


def test_native_stage_terms_are_shares_of_the_routers(tmp_path):
    """Each stage's term is weighted by its share of the whole model's routers (docs/zoo.md)."""
    adapter = census.zoo_adapter("granitemoe")
    config = adapter.tiny_config()
    directory = save_tiny_model(adapter, tmp_path, config=config)
    ids, mask, _ = batch(config.vocab_size)
    with torch.no_grad():
        stages, _ = chain(directory, 2, ids, mask)
        assert [len(s.ppzoo_router_logits) for s in stages] == [2, 2]
        assert all(s._ppzoo_routers == config.num_hidden_layers for s in stages)
        same = stages[0].ppzoo_router_logits[0]
        for stage in stages:
            stage.ppzoo_router_logits = [same.clone() for _ in stage.ppzoo_router_logits]
        whole = adapter.aux_loss(config, stages, mask)
        parts = [adapter.aux_loss(config, [s], mask) for s in stages]
    torch.testing.assert_close(parts[0], whole / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=0)
