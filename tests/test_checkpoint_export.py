"""save_pretrained from pipeline ranks: Hugging Face layout, shard names and sizes, exact round trips.

One spawned 2-rank gloo group runs every round trip; each case returns its problems instead of
raising, so one failure does not leave the peer rank blocked.
"""

from __future__ import annotations

import fnmatch
import json
import re
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import INDEX_FILE, SIDE_FILES, parse_size
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, load_reference, save_tiny_model

HEAD = "lm_head.weight"
#: files a source checkpoint ships besides its weights; the first three must be copied, notes.md not
SOURCE_SIDE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 128}\n',
    "special_tokens_map.json": '{"bos_token": "<s>"}\n',
    "chat_template.jinja": "{{ messages }}\n",
    "notes.md": "not part of a checkpoint\n",
}
#: case → (source model, split saved from, dtype, how the saved checkpoint is reloaded); the pp=1
#: cases hold DTensor stages (FSDP2 or tensor parallel over the two ranks), gathered on save
ROUND_TRIPS = {
    "llama": ("llama", dict(schedule="1F1B"), "float32", dict(schedule="ZBVZeroBubble")),
    "llama-tied": ("llama-tied", dict(schedule="1F1B"), "float32", dict(schedule="ZBVZeroBubble")),
    "gemma": ("gemma", dict(schedule="ZBVZeroBubble"), "float32", dict(schedule="1F1B")),
    "mixtral": ("mixtral", dict(schedule="1F1B"), "float32", dict(schedule="Interleaved1F1B")),
    "qwen2_moe": ("qwen2_moe", dict(schedule="Interleaved1F1B"), "float32", dict(schedule="GPipe", microbatches=2)),
    "llama-bf16": ("llama", dict(schedule="GPipe"), "bfloat16", dict(schedule="Interleaved1F1B", layers_per_stage=2)),
    "mixtral-fsdp": ("mixtral", dict(pp=1, dp_shard=2, microbatches=2), "float32", dict(schedule="1F1B")),
    "llama-tied-tp": ("llama-tied", dict(pp=1, tp=2, microbatches=2), "float32", dict(schedule="1F1B")),
    "llama-small-shards": ("llama", dict(schedule="Interleaved1F1B"), "float32", dict(schedule="1F1B")),
}
#: case → save_pretrained keywords
SAVE_OPTIONS = {"llama-small-shards": dict(max_shard_size=40_000)}


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _round_trip_case(source, saved, split, dtype, reload, save_options):
    dtype = getattr(torch, dtype)
    split = {"pp": 2, "microbatches": 4, **split}
    pipe = ppzoo.pipeline(source, device="cpu", dtype=dtype, attn_implementation="eager", **split)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    ids, mask, labels = batch(pipe.config.vocab_size, batch_size=4)
    if split.get("dp_shard", 1) > 1:  # each data-parallel rank passes its half of the batch
        ids, mask, labels = (t.chunk(2)[dist.get_rank()] for t in (ids, mask, labels))
    pipe.step(ids, labels=labels, attention_mask=mask)
    opt.step()
    pipe.save_pretrained(saved, **save_options)
    named = [(name, _full(param).detach()) for name, param in pipe.named_parameters()]
    problems = []
    original = load_reference(source).to(dtype)
    if all(torch.equal(p, original.get_parameter(n)) for n, p in named):
        problems.append("the optimizer step changed nothing on this rank: the round trip would prove nothing")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype, attn_implementation="eager")
    for name, param in named:
        want = reference.get_parameter(name)
        if want.dtype != param.dtype or not torch.equal(param, want):
            problems.append(f"from_pretrained: {name} differs from the pipeline's")
    again = ppzoo.pipeline(
        saved, pp=2, device="cpu", dtype=dtype, attn_implementation="eager", **{"microbatches": 4, **reload}
    )
    for name, param in again.named_parameters():
        if not torch.equal(param, reference.get_parameter(name)):
            problems.append(f"reloaded with {reload}: {name} differs from the saved weights")
    return {"problems": problems, "kinds": sorted({type(p).__name__ for p in pipe.parameters()})}


def _rank_main(rank, world_size, sources, out):
    out = Path(out)
    results = {}
    for name, (src, split, dtype, reload) in ROUND_TRIPS.items():
        try:
            results[name] = _round_trip_case(
                sources[src], str(out / name), split, dtype, reload, SAVE_OPTIONS.get(name, {})
            )
        except Exception:
            results[name] = {"problems": [traceback.format_exc()]}
    return results


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    dirs = {}
    for name in ("llama", "llama-tied", "gemma", "mixtral", "qwen2_moe"):
        adapter = registry.adapters()[name.removesuffix("-tied")]
        config = adapter.tiny_config()
        if name.endswith("-tied"):
            config.tie_word_embeddings = True
        dirs[name] = save_tiny_model(adapter, tmp_path_factory.mktemp(name), config=config)
    for file, text in SOURCE_SIDE_FILES.items():
        (dirs["llama"] / file).write_text(text)
    return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(scope="module")
def group(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    return run_distributed(_rank_main, 2, sources, str(out), timeout_s=300), out


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_is_exact(group, case):
    results, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank[case]["problems"] == [], f"rank {rank}"


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["mixtral-fsdp", "llama-tied-tp"])
def test_sharded_stages_were_sharded(group, case):
    results, _ = group
    assert all("DTensor" in per_rank[case]["kinds"] for per_rank in results)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_index_names_every_key_once_as_hugging_face_does(group, sources, case):
    _, out = group
    saved, source = out / case, Path(sources[ROUND_TRIPS[case][0]])
    index = json.loads((saved / INDEX_FILE).read_text())
    hf_keys = set(json.loads((source / INDEX_FILE).read_text())["weight_map"])
    assert set(index["weight_map"]) == hf_keys  # MoE experts per expert, a tied head left out
    found: dict[str, str] = {}
    size = 0
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(saved / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert key not in found, f"{key} is in {found.get(key)} and {name}"
                found[key] = name
                tensor = f.get_tensor(key)
                assert tensor.dtype == getattr(torch, ROUND_TRIPS[case][2])
                size += tensor.numel() * tensor.element_size()
    assert found == index["weight_map"]
    assert index["metadata"]["total_size"] == size
    if case in ("llama-tied", "gemma"):
        assert HEAD not in index["weight_map"]


@pytest.mark.distributed
def test_shards_keep_under_max_shard_size_with_hugging_face_names(group):
    _, out = group
    saved = out / "llama-small-shards"
    limit = SAVE_OPTIONS["llama-small-shards"]["max_shard_size"]
    index = json.loads((saved / INDEX_FILE).read_text())
    names = sorted(set(index["weight_map"].values()))
    count = len(names)
    assert count > 4  # 4 stages, each more than one shard's worth
    assert names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(p.name for p in saved.glob("*.safetensors")) == names  # no part file left behind
    for name in names:
        with safe_open(str(saved / name), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            held = sum(torch.Size(shape).numel() * 4 for shape in sizes)
            assert held <= limit or len(sizes) == 1, (name, held)
            # a shard never mixes stages: Interleaved1F1B's stages here are layers 0-1, 2-3, 4-5, 6-7
            stages = {int(k.split(".")[2]) // 2 for k in f.keys() if k.startswith("model.layers.")}
            assert len(stages) <= 1, (name, stages)


@pytest.mark.distributed
def test_config_and_side_files_come_from_the_source(group, sources):
    _, out = group
    saved, source = out / "llama", Path(sources["llama"])
    assert json.loads((saved / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (saved / name).read_bytes() == (source / name).read_bytes(), name
    assert not (saved / "notes.md").exists()
    assert json.loads((out / "llama-bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_max_shard_size_accepts_hugging_face_sizes_and_names_bad_ones():
    assert parse_size(1000) == 1000
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5mb") == 1_500_000
    assert parse_size(" 300 KiB ") == 300 * 1024
    for bad in ("five", "5XB", "", "-1GB"):
        with pytest.raises(
            ValueError, match=re.escape(f"max_shard_size {bad!r} is not a size; use bytes or a string like '5GB'")
        ):
            parse_size(bad)
    for bad in (0, -5, True, "0GB"):
        with pytest.raises(
            ValueError,
            match=re.escape(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {bad!r}"),
        ):
            parse_size(bad)


def test_side_files_cover_tokenizers_and_generation_config():
    for name in ("generation_config.json", "tokenizer.json", "tokenizer.model", "merges.txt", "cl100k.tiktoken"):
        assert any(fnmatch.fnmatch(name, p) for p in SIDE_FILES), name
    for name in ("model.safetensors", INDEX_FILE, "config.json", "README.md"):
        assert not any(fnmatch.fnmatch(name, p) for p in SIDE_FILES), name
