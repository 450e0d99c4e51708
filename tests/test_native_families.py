"""Families the native adapter runs by carrying more than the hidden states across a stage boundary.

Gemma 3n and Gemma 4 give every decoder layer a per-layer input computed from the token ids and
the embeddings, Gemma 3n's later layers reuse the keys and values an earlier layer stored, and
its AltUp hidden states are four streams deep; the native adapter carries all of it across the
boundary (``ppzoo.architectures.native.boundary``). Each is checked as the zoo checks a type
(the stage chain against the unsplit model, dropout included), and through the 2-rank pipeline;
so is Gemma 4's unified text model, whose config holds its head size per layer.
"""

import pytest

import ppzoo
from ppzoo import registry
from ppzoo.architectures.native import NativeAdapter, keys, layout, prefix
from ppzoo.testing import census
from ppzoo.testing.tiny_configs import tiny_config
from ppzoo.validation import ValidationError

#: model type -> what crosses its stage boundary besides the hidden states
CARRIED = {
    "gemma4_text": "per-layer inputs",
    "gemma3n_text": "per-layer inputs, shared keys and values, AltUp's stacked hidden states",
}
#: model type -> what the native adapter reads per layer instead of from the config
PER_LAYER_SIZES = {"gemma4_unified_text": "head_dim, which its config holds per layer (per_layer_config)"}


@pytest.mark.parametrize("model_type", sorted({**CARRIED, **PER_LAYER_SIZES}))
def test_the_zoo_finds_these_families_exact(model_type):
    (result,) = census.zoo([model_type], isolate=False)
    assert (result.adapter, result.result) == ("native", "exact"), result.detail


def test_the_boundary_carries_what_later_layers_read():
    adapter = NativeAdapter()
    gemma3n = tiny_config("gemma3n_text")
    boundary = layout.discover(gemma3n).boundary
    layers = gemma3n.num_hidden_layers
    per_layer = [s for s in boundary.slots if s.kind == "argument"]
    assert [s.uses for s in per_layer] == [((i, "per_layer_input", 2),) for i in range(layers)]
    states = [s for s in boundary.slots if s.kind == "state"]
    assert states and {s.name for s in states} == {"shared_kv_states"}
    assert {s.element for s in states} == {0, 1}  # keys and values
    hidden = gemma3n.altup_num_inputs * gemma3n.hidden_size
    width = hidden + layers * gemma3n.hidden_size_per_layer_input + sum(s.packing.width for s in states)
    assert adapter.boundary_width(gemma3n) == width
    # Gemma 4 stores keys and values for readers outside the model: with no layer reusing them,
    # nothing but the per-layer inputs is carried
    gemma4 = tiny_config("gemma4_text")
    width = gemma4.hidden_size + gemma4.num_hidden_layers * gemma4.hidden_size_per_layer_input
    assert adapter.boundary_width(gemma4) == width
    # a model whose layers read only the hidden states hands on (batch, seq, hidden_size)
    gpt2 = tiny_config("gpt2")
    assert not layout.discover(gpt2).boundary.carries
    assert adapter.boundary_width(gpt2) == gpt2.hidden_size


# -- hybrid families: linear attention with MLA, and a transformer block several layers share --------
#: model type -> what it mixes; the CPU runs transformers' torch paths (no fla, mamba_ssm or causal_conv1d kernels)
HYBRID = {
    "kimi_linear": "Kimi delta attention (torch chunk_kda) and MLA full-attention layers, dense then MoE",
    "bailing_hybrid": "linear-attention and MLA layers, group-limited MoE routing",
    "zamba2": "Mamba-2 layers and one shared transformer block (with per-use LoRA adapters) that hybrid layers reuse",
}


def test_a_block_shared_by_layers_is_tied_across_stages():
    # Zamba ties every parameter of layer 3's shared block to layer 1's (and the head to the embedding)
    config = tiny_config("zamba")
    assert registry.adapter_for(config).validate(config) == []
    found = layout.discover(config)
    shared = {c: s for c, s in found.tied.items() if ".shared_transf." in c}
    assert len(shared) == 9 and found.tied["lm_head.weight"] == "model.embed_tokens.weight"
    assert all(c.startswith("model.layers.3.") and s == c.replace(".3.", ".1.", 1) for c, s in shared.items())


def _two_stages_against_the_reference(directory, model_type: str) -> dict:
    """Save the tiny ``model_type``, run it unsplit and as two stages in one process (loss with
    the router aux loss, backward on both), check logits and loss agree; what the checks need."""
    import torch

    from ppzoo.checkpoint import Checkpoint
    from ppzoo.loss import causal_lm_loss
    from ppzoo.stage import build_stage, run_chain
    from ppzoo.testing.reference import batch, load_reference, save_tiny_model

    source = save_tiny_model(NativeAdapter(), directory, config=tiny_config(model_type))
    reference = load_reference(source)
    config = reference.config
    adapter = registry.adapter_for(config)
    assert adapter.name == "native"
    ids, mask, labels = batch(config.vocab_size)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    the_plan = ppzoo.plan(source, pp=2)
    stages = [
        build_stage(config, adapter, the_plan, i, checkpoint=Checkpoint(source), attn_implementation="eager")
        for i in range(2)
    ]
    logits = run_chain(stages, ids, attention_mask=mask)
    aux = adapter.aux_loss(config, stages, attention_mask=mask)
    loss = causal_lm_loss(logits, labels) + (0 if aux is None else aux)
    loss.backward()
    assert torch.allclose(logits, out.logits, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, out.loss, rtol=1e-5, atol=0)
    return dict(
        source=source, reference=reference, config=config, adapter=adapter, stages=stages, out=out, loss=loss, aux=aux
    )


@pytest.mark.parametrize("model_type", sorted(HYBRID))
def test_hybrid_families_split_exactly(tmp_path, model_type):
    """Two stages against Hugging Face: logits, loss (with the router aux loss where the forward
    adds one) and every gradient, the shared block's copies' gradients summed as the pipeline sums them."""
    from ppzoo.testing.chain_checks import _sync_tied_grads
    from ppzoo.testing.reference import grad_mismatches

    chain = _two_stages_against_the_reference(tmp_path, model_type)
    stages, reference = chain["stages"], chain["reference"]
    _sync_tied_grads(stages, chain["adapter"].tied_weights(chain["config"]))
    named = [(k, p) for s in stages for k, p in s.named_parameters(remove_duplicate=False)]
    assert grad_mismatches(named, reference) == []


def _shared_block_rank(rank, world_size, directory, saved):
    """A 2-rank pipeline of Zamba 2 under 1F1B and ZBVZeroBubble: every gradient (the shared
    block's copies on both ranks) against the unsplit model's, then ``save_pretrained``."""
    import torch

    from ppzoo.loss import causal_lm_loss
    from ppzoo.testing.reference import batch, grad_mismatches, load_reference

    problems = []
    for schedule in ("1F1B", "ZBVZeroBubble"):
        reference = load_reference(directory)
        ids, mask, labels = batch(reference.config.vocab_size, batch_size=4)
        pipe = ppzoo.pipeline(
            directory, pp=2, schedule=schedule, microbatches=2, device="cpu", attn_implementation="eager"
        )
        rows = [slice(0, 2), slice(2, 4)]
        outs = [reference(input_ids=ids[r], attention_mask=mask[r]) for r in rows]
        want = causal_lm_loss(torch.cat([o.logits for o in outs]), labels)
        want.backward()
        loss = pipe.step(ids, labels=labels, attention_mask=mask)
        if not torch.allclose(loss, want, rtol=1e-5, atol=0):
            problems.append(f"{schedule}: loss {float(loss)} != {want.item()}")
        named = list(pipe.named_parameters())
        shared = [n for n, _ in named if ".shared_transformer." in n]
        if not shared:
            problems.append(f"{schedule}: rank {rank} holds no copy of the shared block")
        problems += [f"{schedule}: {m}" for m in grad_mismatches(named, reference)]
        if schedule == "1F1B":
            pipe.save_pretrained(saved)
    return problems


@pytest.mark.distributed
def test_a_shared_block_trains_and_saves_through_the_pipeline(tmp_path):
    """Both ranks hold a copy of Zamba 2's shared block (its hybrid layers 1 and 3 on two stages);
    their gradients are the unsplit model's, and ``save_pretrained`` writes what
    ``from_pretrained`` loads back bit for bit (the block under layer 1's keys only, as transformers saves it)."""
    import torch

    from ppzoo.checkpoint import Checkpoint
    from ppzoo.testing.distributed import run_distributed
    from ppzoo.testing.reference import load_reference, save_tiny_model

    source = save_tiny_model(NativeAdapter(), tmp_path / "source", config=tiny_config("zamba2"))
    saved = tmp_path / "saved"
    results = run_distributed(_shared_block_rank, 2, str(source), str(saved), timeout_s=600)
    assert [p for r in results for p in r] == []
    assert set(Checkpoint(saved).weight_map) == set(Checkpoint(source).weight_map)
    assert not any(".layers.3.shared_transformer." in k for k in Checkpoint(saved).weight_map)
    want, got = load_reference(source).state_dict(), load_reference(saved).state_dict()
    assert [k for k, t in want.items() if not torch.equal(t, got[k])] == []


def test_a_value_one_layer_hands_the_next_stays_refused():
    # GLM-MoE-DSA's indexer hands its top-k token indices to the next layer
    problems = NativeAdapter().validate(tiny_config("glm_moe_dsa"))
    assert [p.code for p in problems] == ["native-layer-input"]
    assert "'prev_topk_indices' is computed from layer 0" in problems[0].message


def test_a_zero_bubble_schedule_is_refused_where_torch_cannot_split_the_backward():
    # Gemma 3n's AltUp router runs in each layer's prediction and again, on a value computed
    # with it, in its correction; torch's weight pass cannot take that gradient apart
    config = tiny_config("gemma3n_text")
    assert ppzoo.plan(config, pp=2, schedule="1F1B").num_stages == 2
    with pytest.raises(ValidationError) as raised:
        ppzoo.plan(config, pp=2, schedule="ZBVZeroBubble")
    assert [p.code for p in raised.value.problems] == ["native-split-backward"]
    assert "altup.router_norm.weight" in str(raised.value) and "(1F1B, GPipe" in str(raised.value)


@pytest.mark.distributed
def test_carried_families_train_through_the_pipeline():
    from ppzoo.testing.step import distributed_step_problems

    gemma4 = [census.zoo_adapter(t) for t in ("gemma4_text", "gemma4_unified_text")]
    gemma3n = census.zoo_adapter("gemma3n_text")
    problems = distributed_step_problems(gemma4, schedules=("1F1B", "ZBVZeroBubble"))
    # Gemma 3n refuses zero-bubble schedules (above)
    problems |= distributed_step_problems([gemma3n], schedules=("1F1B",))
    assert problems == {a.name: [] for a in (*gemma4, gemma3n)}


def test_tensor_parallel_reads_a_per_layer_head_count_per_layer():
    from transformers import Gemma4TextConfig

    # Gemma 4's 26B and 31B checkpoints give their full-attention layers key/value heads of their own
    config = Gemma4TextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    with pytest.raises(ValidationError) as raised:
        ppzoo.plan(config, pp=2, tp=2)
    assert [str(p.message) for p in raised.value.problems] == [
        "tp=2 must divide num_key_value_heads=1; choose a tp that divides them"
    ]


# -- the lookup on a real-size config ------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen3-next-80b-a3b", "jamba-v0.1"])
def test_the_key_check_on_fewer_experts_finds_what_the_full_model_does(monkeypatch, name):
    from test_real_size_plans import config_of

    config = config_of(name)
    checked = []
    check_keys = layout.checkpoint_renames

    def spy(model, kind, *, check=None):
        checked.append(check)
        return check_keys(model, kind, check=check)

    monkeypatch.setattr(layout, "checkpoint_renames", spy)
    shrunk = layout._discover(config)
    # NOTE: the whole model, watched whole (no cut to its first layers of each kind, native.prefix)
    monkeypatch.setattr(keys, "fewer_experts_model", lambda config: None)
    monkeypatch.setattr(prefix, "observe", lambda *args, **kwargs: None)
    full = layout._discover(config)
    assert checked[0] is not None and checked[1] is None  # the key check ran on fewer experts, then all
    assert isinstance(full, layout.NativeLayout)
    assert shrunk == full


def test_fewer_experts_changes_the_expert_count_only():
    from test_real_size_plans import config_of

    config = config_of("deepseek-v3")
    fewer = keys.fewer_experts(config)
    # the routing still works: 8 groups of 2, top-8 from the 4 groups kept
    assert fewer.n_routed_experts == 16 and config.n_routed_experts == 256
    assert {k: v for k, v in fewer.to_dict().items() if k != "n_routed_experts"} == {
        k: v for k, v in config.to_dict().items() if k != "n_routed_experts"
    }


def test_fewer_experts_keeps_the_routing_valid_and_the_layer_list_unique():
    from transformers import AutoConfig

    assert keys.fewer_experts(tiny_config("gpt2")) is None  # no experts
    mixtral = AutoConfig.for_model("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=4)
    assert keys.fewer_experts(mixtral).num_local_experts == 2
    # 2 experts would make a second list of num_hidden_layers modules
    mixtral = AutoConfig.for_model("mixtral", num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)
    assert keys.fewer_experts(mixtral).num_local_experts == 3
    few = AutoConfig.for_model("mixtral", num_local_experts=2, num_experts_per_tok=2, num_hidden_layers=6)
    assert keys.fewer_experts(few) is None  # no fewer to go to
    grouped = AutoConfig.for_model(
        "deepseek_v3", n_routed_experts=64, n_group=4, topk_group=2, num_experts_per_tok=6, num_hidden_layers=8
    )
    # 3 per group so that the 2 groups kept hold the top-6
    assert keys.fewer_experts(grouped).n_routed_experts == 12


def test_the_watched_forward_finds_the_tensors_pytree_finds():
    import torch
    from torch.utils._pytree import tree_flatten

    from ppzoo.architectures.native.trace import _tensors

    a, b, c = torch.ones(1), torch.ones(2), torch.ones(3)
    tree = ((a, [b, 2, None], "x"), {"out": c, "dim": 1}, torch.return_types.max((a, b)))
    assert [id(t) for t in _tensors(tree)] == [id(t) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


# -- mixtures of experts whose forward reads tensor values, and a layer list of blocks of sublayers --
#: model type -> why the meta device alone cannot read its layout
VALUE_READING = {
    "dbrx": "its experts loop over the experts hit (nonzero)",
    "jetmoe": "its experts split the tokens by counts read from the routing (tolist)",
    "longcat_flash": "its experts loop over the experts hit (item), and its layers are blocks of two sublayers",
}


@pytest.mark.parametrize("model_type", sorted(VALUE_READING))
def test_a_forward_that_reads_tensor_values_is_traced_on_constant_weights(monkeypatch, model_type):
    config = tiny_config(model_type)

    def no_copy(model):
        raise RuntimeError("no copy")

    monkeypatch.setattr(layout, "_CACHE", {})
    monkeypatch.setattr(layout, "_constant_copy", no_copy)
    assert [p.code for p in layout.discover(config)] == ["native-trace"]
    monkeypatch.undo()
    monkeypatch.setattr(layout, "_CACHE", {})
    found = layout.discover(config)
    assert not isinstance(found, list), found
    container = "transformer.blocks" if model_type == "dbrx" else "model.layers"
    assert (found.layout.layers, found.layout.num_layers) == (container, 4)
    assert not found.boundary.carries  # only the hidden states cross a stage boundary


def test_a_forward_that_reads_a_layer_outside_it_is_refused():
    # X-MOD picks its default language from layer 0's adapters, which a stand-in for the layer has not
    problems = layout.discover(tiny_config("xmod"))
    assert [p.code for p in problems] == ["native-layer-attribute"]
    assert "'output' of decoder layer 0" in problems[0].message


def test_a_forward_that_mixes_the_rows_of_a_batch_is_refused():
    # Doge's router views its logits (batch, seq, 2 * keys) as (2, batch * seq, keys): each token's
    # routing reads other rows' tokens, so no microbatched pipeline gives the whole batch's result
    problems = layout.discover(tiny_config("doge[moe]"))
    assert [p.code for p in problems] == ["native-batch-rows"]
    assert "(3, 7, 8) as (2, 21, 4)" in problems[0].message


def test_a_view_keeps_the_rows_apart_when_they_stay_its_outermost_dimension():
    from ppzoo.architectures.native.trace import _mixes_rows

    kept = [(21, 8), (3, 56), (3, 7, 2, 4), (42, 4), (1, 21, 8), (168,)]
    assert [_mixes_rows((3, 7, 8), after) for after in kept] == [False] * len(kept)
    assert _mixes_rows((3, 7, 8), (2, 21, 4)) and _mixes_rows((3, 7, 8), (7, 3, 8))
    assert not _mixes_rows((7, 3, 8), (2, 21, 4))  # not a (batch, sequence, ...) tensor


def test_the_layer_list_may_count_blocks_of_sublayers():
    # LongCat-Flash: num_hidden_layers (8) counts attention sublayers, two a block; the list holds num_layers blocks
    config = tiny_config("longcat_flash")
    assert (config.num_layers, config.num_hidden_layers) == (4, 8)
    found = layout.discover(config).layout
    assert (found.layers, found.num_layers) == ("model.layers", 4)
    assert found.inputs == ("model.embed_tokens",) and found.outputs == ("model.norm", "lm_head")


@pytest.mark.parametrize("model_type", sorted(VALUE_READING))
def test_value_reading_experts_split_exactly_and_save_back(tmp_path, model_type):
    """Two stages against Hugging Face: logits, loss with the router aux loss (DBRX, JetMoE), every
    gradient; loaded from transformers' own save (LongCat-Flash's experts per expert, merged at
    load), and converted back by ppzoo's save key for key and bit for bit."""
    import torch
    from safetensors.torch import load_file

    from ppzoo.checkpoint import Checkpoint
    from ppzoo.checkpoint.conversion import saving_groups
    from ppzoo.testing.reference import grad_mismatches

    chain = _two_stages_against_the_reference(tmp_path / "source", model_type)
    stages, reference, adapter, config = chain["stages"], chain["reference"], chain["adapter"], chain["config"]
    source, loss, aux, out = chain["source"], chain["loss"], chain["aux"], chain["out"]
    if model_type != "longcat_flash":  # its forward adds no router aux loss
        assert aux is not None and not torch.allclose(loss - aux, out.loss, rtol=1e-5, atol=0)
    named = [(k, p) for s in stages for k, p in s.named_parameters()]
    assert grad_mismatches(named, reference, tied=adapter.tied_weights(config)) == []

    # what ppzoo's save writes for each stage's tensors is what transformers wrote, key for key and bit for bit
    released = {}
    for shard in set(Checkpoint(source).weight_map.values()):
        released.update(load_file(source / shard))
    tied = adapter.tied_weights(config)
    ours = {}
    for stage in stages:
        state = {k: t for k, t in stage.state_dict().items() if k not in tied}
        for group in saving_groups(stage, list(state)):
            ours.update(group.convert(state, model=stage))
    assert sorted(ours) == sorted(released)
    assert [k for k, t in released.items() if not torch.equal(ours[k], t)] == []
