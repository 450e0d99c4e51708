"""Per-stage loading: a stage reads only its own tensors, and equals ``from_pretrained``."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

import ppzoo
import ppzoo.checkpoint.reading
from ppzoo import registry
from ppzoo.architectures.llama import TINY
from ppzoo.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError
from ppzoo.config import load_config
from ppzoo.stage import build_stage
from ppzoo.testing.reference import load_reference, save_tiny_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    directory = save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("sharded"))
    assert (directory / INDEX_FILE).is_file()
    return directory


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    directory = save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("single"), max_shard_size=None)
    assert (directory / SINGLE_FILE).is_file() and not (directory / INDEX_FILE).exists()
    return directory


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": True})
    return save_tiny_model(registry.adapters()["llama"], tmp_path_factory.mktemp("tied"), config=config)


class Reads:
    """Records every tensor read (``Checkpoint._get_tensor``), every read straight into storage
    (``Checkpoint._read_into_storage``), and every shard file the loader opens (with ``safe_open``,
    also kept apart, or for ``pread``)."""

    def __init__(self, monkeypatch):
        self.keys, self.files, self.into_storage, self.safe_open = [], [], [], []
        get_tensor, read_into = Checkpoint._get_tensor, Checkpoint._read_into_storage
        safe_open, shard_file = ppzoo.checkpoint.reading.safe_open, ppzoo.checkpoint.reading._ShardFile
        files = self.files

        def recording_get_tensor(checkpoint, handle, key):
            self.keys.append(key)
            return get_tensor(checkpoint, handle, key)

        def recording_read_into(checkpoint, reader, key, out, part):
            self.into_storage.append((key, part))
            return read_into(checkpoint, reader, key, out, part)

        def recording_safe_open(path, *args, **kwargs):
            self.files.append(str(path).rsplit("/", 1)[-1])
            self.safe_open.append(self.files[-1])
            return safe_open(path, *args, **kwargs)

        class RecordingShardFile(shard_file):
            def __init__(self, path):
                files.append(path.name)
                super().__init__(path)

        monkeypatch.setattr(Checkpoint, "_get_tensor", recording_get_tensor)
        monkeypatch.setattr(Checkpoint, "_read_into_storage", recording_read_into)
        monkeypatch.setattr(ppzoo.checkpoint.reading, "safe_open", recording_safe_open)
        monkeypatch.setattr(ppzoo.checkpoint.reading, "_ShardFile", RecordingShardFile)


def build(directory, pp, index, **kwargs):
    config = load_config(directory)
    plan = ppzoo.plan(config, pp=pp)
    return build_stage(config, registry.adapter_for(config), plan, index, checkpoint=Checkpoint(directory), **kwargs)


def assert_equal_to(stage, reference):
    ref_state = reference.state_dict()
    for name, tensor in stage.state_dict().items():
        assert tensor.dtype == ref_state[name].dtype, name
        assert torch.equal(tensor, ref_state[name]), name
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in stage.named_buffers():
        assert buffer.dtype == ref_buffers[name].dtype, name
        assert torch.equal(buffer, ref_buffers[name]), name


@pytest.mark.parametrize("index", range(4))
def test_a_stage_of_four_reads_only_its_own_tensors(sharded, index, monkeypatch):
    weight_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    reads = Reads(monkeypatch)
    stage = build(sharded, 4, index)
    own = set(stage.state_dict())
    assert own, "the stage holds parameters"
    assert sorted(reads.keys) == sorted(own)  # each of its tensors once, nothing else
    assert sorted(reads.files) == sorted({weight_map[k] for k in own})  # only the shards that hold them
    assert len(set(reads.files)) < len(set(weight_map.values()))
    assert_equal_to(stage, load_reference(sharded))


def test_stage_keeps_original_fqns(sharded):
    stage = build(sharded, 4, 2)
    assert list(stage.model.layers.keys()) == ["4", "5"]
    assert stage.model.embed_tokens is None and stage.model.norm is None and stage.lm_head is None
    reference = load_reference(sharded)
    assert {n for n, _ in stage.named_parameters()} == {
        n for n, _ in reference.named_parameters() if n.startswith(("model.layers.4.", "model.layers.5."))
    }


class _Allocations(TorchDispatchMode):
    """Counts the elements of every real (non-meta) tensor allocated by ``empty``-like operators."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "empty" in func.__name__:
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                    self.elements += leaf.numel()
        return out


def test_a_stage_allocates_only_its_own_tensors(sharded):
    """Built on meta and pruned before anything is materialised: one stage of four, one stage's memory."""
    with _Allocations() as allocations:
        stage = build(sharded, 4, 1)
    own = sum(t.numel() for t in stage.parameters()) + sum(t.numel() for t in stage.buffers())
    assert allocations.elements == own
    assert own < ppzoo.plan(sharded, pp=4).total_params / 3


@pytest.mark.parametrize("index", range(3))
def test_non_persistent_buffers_equal_from_pretrained(sharded, index):
    stage = build(sharded, 3, index)
    reference = load_reference(sharded)
    buffers = dict(stage.named_buffers())
    assert set(buffers) == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    for name, buffer in reference.named_buffers():
        assert torch.equal(buffers[name], buffer), name
        assert buffers[name].dtype == buffer.dtype


def test_bfloat16_stages_equal_from_pretrained_bfloat16(sharded):
    reference = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16)
    for index in range(2):
        stage = build(sharded, 2, index, dtype=torch.bfloat16)
        assert {p.dtype for p in stage.parameters()} == {torch.bfloat16}
        assert_equal_to(stage, reference)


def test_non_sharded_checkpoint(single, monkeypatch):
    reference = load_reference(single)
    for index in range(4):
        reads = Reads(monkeypatch)
        stage = build(single, 4, index)
        assert sorted(reads.keys) == sorted(stage.state_dict())
        assert set(reads.files) == {SINGLE_FILE}
        assert_equal_to(stage, reference)


def test_tied_head_is_read_from_the_embedding(tied, monkeypatch):
    weight_map = json.loads((tied / INDEX_FILE).read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map
    reference = load_reference(tied)
    reads = Reads(monkeypatch)
    last = build(tied, 2, 1)
    assert "model.embed_tokens.weight" in reads.keys
    assert torch.equal(last.lm_head.weight, reference.model.embed_tokens.weight)
    # one stage holds both: they are one parameter, as in from_pretrained
    whole = build(tied, 1, 0)
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    assert_equal_to(whole, reference)


def test_stages_read_every_tensor_straight_into_their_parameters(sharded, monkeypatch):
    """Each stage's tensors go from the file into the parameters' storage, exactly, in the
    checkpoint's dtype as well as through the casting buffer."""
    monkeypatch.setattr(ppzoo.checkpoint.reading, "_BLOCK_BYTES", 1024)
    reads = Reads(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        reference = AutoModelForCausalLM.from_pretrained(sharded, dtype=dtype)
        for index in range(2):
            reads.into_storage.clear()
            stage = build(sharded, 2, index, dtype=dtype)
            assert_equal_to(stage, reference)
            assert sorted(key for key, _ in reads.into_storage) == sorted(stage.state_dict())
    assert reads.safe_open == []


# -- errors ----------------------------------------------------------------------------------------


def copy_of(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "copy")


def shard_of(directory, key):
    return json.loads((directory / INDEX_FILE).read_text())["weight_map"][key]


def test_missing_tensor_names_the_key_and_the_index(sharded, tmp_path):
    directory = copy_of(sharded, tmp_path)
    index = json.loads((directory / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.5.mlp.up_proj.weight"]
    (directory / INDEX_FILE).write_text(json.dumps(index))
    build(directory, 2, 0)  # the other stage does not need it
    message = (
        f"tensor 'model.layers.5.mlp.up_proj.weight' (needed for 'model.layers.5.mlp.up_proj.weight') is not in "
        f"'{INDEX_FILE}' in {str(directory)!r}; is it a checkpoint of this architecture?"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        build(directory, 2, 1)


def test_missing_tensor_in_a_single_file(single, tmp_path):
    directory = copy_of(single, tmp_path)
    tensors = load_file(directory / SINGLE_FILE)
    del tensors["model.norm.weight"]
    save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"tensor 'model.norm.weight' (needed for 'model.norm.weight') is not in '{SINGLE_FILE}'"),
    ):
        build(directory, 2, 1)


def test_missing_shard_names_the_shard_and_the_key(sharded, tmp_path):
    directory = copy_of(sharded, tmp_path)
    key = "model.layers.6.self_attn.q_proj.weight"
    shard = shard_of(directory, key)
    (directory / shard).unlink()
    holders = {k for k, v in json.loads((directory / INDEX_FILE).read_text())["weight_map"].items() if v == shard}
    build(directory, 2, 0)
    pattern = (
        re.escape(f"shard {shard!r} (holding '")
        + "(.+)"
        + re.escape(f"') is listed in {INDEX_FILE} but missing from {str(directory)!r}")
    )
    with pytest.raises(CheckpointError) as caught:
        build(directory, 2, 1)
    held = re.fullmatch(pattern, str(caught.value))
    assert held is not None, str(caught.value)
    assert held[1] in holders


def test_shape_mismatch_names_the_key_and_the_file(sharded, tmp_path):
    directory = copy_of(sharded, tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"
    shard = shard_of(directory, key)
    tensors = load_file(directory / shard)
    tensors[key] = torch.zeros(32, 63)
    save_file(tensors, directory / shard, metadata={"format": "pt"})
    message = (
        f"tensor {key!r} in {shard!r} has shape (32, 63), but {key!r} expects (32, 64); "
        "the config does not match the checkpoint"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        build(directory, 2, 0)
