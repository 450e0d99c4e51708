"""Checkpoint keys through transformers' own conversion rules: released layouts load per stage and save back.

Each checkpoint is written by transformers' own ``save_pretrained`` of a tiny model, which writes
the released layout (EXAONE's original names, NeoX's ``embed_out``, per-expert MoE tensors, one
fused ``in_proj``); the GPT-2 one then loses its ``transformer.`` prefix, as hub GPT-2 files have
none. Stages built by ppzoo must equal ``from_pretrained`` of the whole model, parameter for
parameter, and read exactly their own tensors (under FSDP, a rank's block of fused experts reads
only those experts); ppzoo's ``save_pretrained`` must write what transformers writes, so
``from_pretrained`` reads it back bit-exactly. An adapter's key map decides where it says more
than the identity.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import ppzoo
from ppzoo import KeyMap, registry
from ppzoo.architectures.llama import LlamaAdapter
from ppzoo.checkpoint import INDEX_FILE, Checkpoint, CheckpointError
from ppzoo.checkpoint.conversion import loading_plan, saving_groups
from ppzoo.config import load_config
from ppzoo.meta import meta_model
from ppzoo.stage import build_stage
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import load_reference, save_tiny_model, tiny
from ppzoo.testing.tiny_configs import tiny_config


@dataclass(frozen=True)
class Case:
    """A released checkpoint layout: how to make its config, and what to expect of its keys."""

    config: str  # "zoo:<model_type>" (the zoo's tiny config) or an adapter name (its tiny config)
    released: str  # a key only the released layout has
    converted: str  # the parameter that key becomes
    inputs: tuple[str, ...]  # released keys read by the first stage (besides layers)
    strip: str = ""  # a prefix hub checkpoints leave out

    def make_config(self):
        kind, _, name = self.config.rpartition(":")
        return tiny_config(name) if kind == "zoo" else tiny(name)[1]


CASES = {
    "exaone": Case(
        "zoo:exaone",
        "transformer.h.0.attn.attention.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        ("transformer.wte.weight",),
    ),
    "gpt2-unprefixed": Case(
        "zoo:gpt2",
        "h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.weight",
        ("wte.weight", "wpe.weight"),
        "transformer.",
    ),
    "gpt_neox": Case("zoo:gpt_neox", "embed_out.weight", "lm_head.weight", ("gpt_neox.embed_in.weight",)),
    "mixtral": Case(
        "mixtral",
        "model.layers.0.block_sparse_moe.experts.3.w3.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
        ("model.embed_tokens.weight",),
    ),
    "qwen2_moe": Case(
        "qwen2_moe",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.1.mlp.experts.down_proj",
        ("model.embed_tokens.weight",),
    ),
    # one fused checkpoint tensor split into four parameters (transformers' ``Split``)
    "lara_mini-fused": Case(
        "zoo:lara_mini",
        "model.layers.0.linear_attn.in_proj.weight",
        "model.layers.0.linear_attn.in_proj_qkv.weight",
        ("model.embed_tokens.weight",),
    ),
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def _released(case: Case, directory: Path) -> Path:
    """transformers' own save of a tiny model, sharded, in the layout hub checkpoints have."""
    config = case.make_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # NOTE: norms and biases start constant: random values expose mix-ups
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 0.1)
    model.save_pretrained(directory, max_shard_size="20KB")
    if case.strip:
        index = json.loads((directory / INDEX_FILE).read_text())
        for shard in set(index["weight_map"].values()):
            tensors = load_file(directory / shard)
            save_file({k.removeprefix(case.strip): v for k, v in tensors.items()}, directory / shard, {"format": "pt"})
        index["weight_map"] = {k.removeprefix(case.strip): v for k, v in index["weight_map"].items()}
        (directory / INDEX_FILE).write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module", params=list(CASES))
def released(request, tmp_path_factory):
    case = CASES[request.param]
    directory = _released(case, tmp_path_factory.mktemp(request.param))
    return request.param, case, directory, load_reference(directory)


class Recording(Checkpoint):
    """A checkpoint that records every tensor read, whole or in part."""

    def __init__(self, directory):
        super().__init__(directory)
        self.reads: list[str] = []

    def _get_tensor(self, handle, key):
        self.reads.append(key)
        return super()._get_tensor(handle, key)

    def _get_slice(self, handle, key, part):
        self.reads.append(key)
        return super()._get_slice(handle, key, part)


def _expected(case: Case, key: str, stage, last: bool, tied_head: bool) -> bool:
    """Whether ``stage`` owns the released ``key``: by layer number, else inputs first, outputs last."""
    m = _LAYER.search(key)
    if m is not None:
        return int(m[1]) in stage.layers
    if key in case.inputs:
        return stage.is_first or (last and tied_head and key == case.inputs[0])
    return last


def test_the_checkpoints_are_in_the_released_layout(released):
    name, case, directory, reference = released
    keys = set(Checkpoint(directory).weight_map)
    assert case.released in keys, sorted(keys)[:8]
    assert case.converted not in keys and case.converted in dict(reference.named_parameters())
    if case.strip:
        assert not any(k.startswith(case.strip) for k in keys)


@pytest.mark.parametrize("pp", [2, 3])
def test_stages_equal_from_pretrained_and_read_only_their_tensors(released, pp):
    name, case, directory, reference = released
    config = load_config(directory)
    adapter = registry.adapter_for(config)
    the_plan = ppzoo.plan(directory, pp=pp)
    want = reference.state_dict()
    everything = set(Checkpoint(directory).weight_map)
    tied_head = bool(adapter.tied_weights(config)) and not any(k.endswith("lm_head.weight") for k in everything)
    read_by_any: set[str] = set()
    for stage in the_plan.stages:
        checkpoint = Recording(directory)
        built = build_stage(config, adapter, the_plan, stage.index, checkpoint=checkpoint, attn_implementation="eager")
        got = built.state_dict()
        assert got, f"stage {stage.index} holds nothing"
        wrong = [fqn for fqn, t in got.items() if not torch.equal(t, want[fqn])]
        assert wrong == [], f"{name} pp={pp} stage {stage.index}: differs from from_pretrained: {wrong}"
        last = stage.index == the_plan.num_stages - 1
        own = {k for k in everything if _expected(case, k, stage, last, tied_head)}
        assert sorted(k for k in set(checkpoint.reads) if checkpoint.reads.count(k) > 1) == []
        assert sorted(set(checkpoint.reads) - own) == [], f"stage {stage.index} read other stages' tensors"
        assert sorted(own - set(checkpoint.reads)) == [], f"stage {stage.index} did not read its own tensors"
        shards = {checkpoint.weight_map[k] for k in checkpoint.reads}
        assert set(checkpoint.files_opened) == shards, "opened a shard that holds none of its tensors"
        read_by_any |= set(checkpoint.reads)
    assert read_by_any == everything


def test_a_fused_parameter_reads_exactly_the_tensors_it_is_made_of(tmp_path):
    case = CASES["mixtral"]
    directory = _released(case, tmp_path)
    config = load_config(directory)
    plan = loading_plan(
        meta_model(config), Checkpoint(directory).weight_map, ["model.layers.2.mlp.experts.gate_up_proj"]
    )
    group = plan["model.layers.2.mlp.experts.gate_up_proj"]
    gates = [f"model.layers.2.block_sparse_moe.experts.{e}.w1.weight" for e in range(4)]
    ups = [f"model.layers.2.block_sparse_moe.experts.{e}.w3.weight" for e in range(4)]
    assert group.keys == gates + ups
    assert list(plan) == ["model.layers.2.mlp.experts.gate_up_proj"]


def test_the_saved_layout_is_what_transformers_saves(released):
    """What ppzoo's save writes for each parameter group is transformers' own save, key for key and bit for bit."""
    name, case, directory, reference = released
    if case.strip:
        pytest.skip("transformers saves GPT-2 with its prefix; the unprefixed checkpoint is the hub's, not a save")
    saved = {}
    for shard in set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()):
        saved.update(load_file(directory / shard))
    state = reference.state_dict()
    tied = registry.adapter_for(load_config(directory)).tied_weights(reference.config)
    ours = {}
    for group in saving_groups(reference, [fqn for fqn in state if fqn not in tied]):
        ours.update(group.convert(state, model=reference))
    assert sorted(ours) == sorted(saved)
    assert [k for k in saved if not torch.equal(ours[k], saved[k])] == []


def test_a_missing_expert_names_its_key_and_the_fused_parameter(tmp_path):
    directory = _released(CASES["qwen2_moe"], tmp_path)
    index = json.loads((directory / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.2.up_proj.weight"]
    (directory / INDEX_FILE).write_text(json.dumps(index))
    config = load_config(directory)
    the_plan = ppzoo.plan(directory, pp=1)
    with pytest.raises(CheckpointError) as caught:
        build_stage(config, registry.adapter_for(config), the_plan, 0, checkpoint=Checkpoint(directory))
    assert str(caught.value).startswith(
        "tensor 'model.layers.1.mlp.experts.2.up_proj.weight' (needed for 'model.layers.1.mlp.experts.gate_up_proj') "
        f"is not in '{INDEX_FILE}'"
    )


class _NormKeys(KeyMap):
    """A layout transformers does not describe: the final norm stored as ``final_norm.weight``."""

    def sources(self, fqn, available):
        return ["final_norm.weight"] if fqn == "model.norm.weight" else [fqn]

    def split(self, fqn, tensor):
        return {"final_norm.weight" if fqn == "model.norm.weight" else fqn: tensor}


class _RenamedNorm(LlamaAdapter):
    name = "renamed-norm"

    def key_map(self, config):
        return _NormKeys()


def test_an_adapter_key_map_decides_where_it_says_more_than_the_identity(tmp_path):
    adapter = _RenamedNorm()
    directory = save_tiny_model(adapter, tmp_path, max_shard_size=None)
    tensors = load_file(directory / "model.safetensors")
    tensors["final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    config = load_config(directory)
    the_plan = ppzoo.plan(config, pp=2)
    last = Recording(directory)
    stage = build_stage(config, adapter, the_plan, 1, checkpoint=last)
    assert torch.equal(stage.get_parameter("model.norm.weight"), tensors["final_norm.weight"])
    assert "final_norm.weight" in last.reads and "model.norm.weight" not in last.reads
    # everything else through transformers' rules (here: the identity)
    assert all(torch.equal(t, tensors[k]) for k, t in stage.state_dict().items() if k != "model.norm.weight")


# -- save_pretrained → from_pretrained, and FSDP reads -------------------------------------------------
def _distributed_cases(rank, world_size, cases, fsdp_sources):
    """Each rank builds its stage of each source and saves; then, for each FSDP source (pp=1,
    dp_shard=2), returns the checkpoint keys this rank read and the parameters that differ from
    from_pretrained."""
    for source, target in cases:
        pipe = ppzoo.pipeline(source, pp=2, device="cpu", attn_implementation="eager", microbatches=2)
        pipe.save_pretrained(target)
    return [_fsdp_reads(source) for source in fsdp_sources]


def _fsdp_reads(source):
    """Build ``source`` under FSDP on this rank: the checkpoint keys read, the parameters that differ."""
    reads = []
    whole, part = Checkpoint._get_tensor, Checkpoint._get_slice
    Checkpoint._get_tensor = lambda self, handle, key: reads.append(key) or whole(self, handle, key)
    Checkpoint._get_slice = lambda self, handle, key, where: reads.append(key) or part(self, handle, key, where)
    try:
        pipe = ppzoo.pipeline(source, pp=1, dp_shard=2, device="cpu", attn_implementation="eager", microbatches=2)
    finally:
        Checkpoint._get_tensor, Checkpoint._get_slice = whole, part
    # NOTE: names, not tensors, go back: a tensor leaves a spawned process through a descriptor
    reference = load_reference(source).state_dict()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in pipe.named_parameters()}
    return reads, [k for k, v in full.items() if not torch.equal(v.detach(), reference[k])]


@pytest.mark.distributed
def test_save_pretrained_round_trips_and_fsdp_reads_only_its_experts(tmp_path):
    sources = {name: _released(case, tmp_path / name) for name, case in CASES.items()}
    targets = {name: tmp_path / f"{name}-saved" for name in CASES}
    results = run_distributed(
        _distributed_cases,
        2,
        [(str(sources[n]), str(targets[n])) for n in CASES],
        [str(sources["mixtral"]), str(sources["gpt_neox"])],  # NOTE: NeoX's rule is found by class name
    )
    for name, case in CASES.items():
        want, got = load_reference(sources[name]), load_reference(targets[name])
        got_state = got.state_dict()
        wrong = [k for k, t in want.state_dict().items() if not torch.equal(t, got_state[k])]
        assert wrong == [], f"{name}: from_pretrained of ppzoo's save differs in {wrong}"
        saved = set(json.loads((targets[name] / INDEX_FILE).read_text())["weight_map"])
        released_keys = set(Checkpoint(sources[name]).weight_map)
        # NOTE: transformers saves GPT-2 under its own names (with the prefix), as ppzoo does
        assert saved == {case.strip + k for k in released_keys}, name
    # FSDP shards each fused expert parameter [4 experts, ...] in blocks of two: rank r reads only its two experts
    everything = set(Checkpoint(sources["mixtral"]).weight_map)
    expert = re.compile(r"\.experts\.(\d+)\.")
    for rank, ((reads, wrong), (_, neox_wrong)) in enumerate(results):
        assert neox_wrong == [], f"rank {rank}: FSDP NeoX parameters differ from from_pretrained: {neox_wrong}"
        assert sorted(k for k in set(reads) if reads.count(k) > 1) == []
        experts = {int(m[1]) for k in reads if (m := expert.search(k))}
        assert experts == {2 * rank, 2 * rank + 1}, (rank, experts)
        theirs = {k for k in everything if (m := expert.search(k)) and int(m[1]) // 2 != rank}
        assert set(reads) == everything - theirs
        assert wrong == [], f"rank {rank}: FSDP parameters differ from from_pretrained: {wrong}"
