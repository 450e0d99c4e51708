"""save_pretrained from pipeline ranks: Hugging Face layout, exact round trips, atomic replacement.

One spawned 2-rank gloo group runs every case; each case returns its problems instead of raising,
so one failure does not leave the peer rank blocked. The last case kills rank 1 in the middle of
writing on purpose, which ends the group: so every rank first writes its results to a file, and
the fixture reads them from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import ppzoo
from ppzoo import registry
from ppzoo.save import SIDE_FILES, _check_target
from ppzoo.testing.distributed import DistributedFailure, run_distributed
from ppzoo.testing.reference import batch, load_reference, save_tiny_model
from ppzoo.weights import INDEX_FILE, CheckpointError

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


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f"{directory.name}."))


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
    again = ppzoo.pipeline(saved, pp=2, device="cpu", dtype=dtype, attn_implementation="eager",
                           **{"microbatches": 4, **reload})
    for name, param in again.named_parameters():
        if not torch.equal(param, reference.get_parameter(name)):
            problems.append(f"reloaded with {reload}: {name} differs from the saved weights")
    return {"problems": problems, "kinds": sorted({type(p).__name__ for p in pipe.parameters()})}


def _failed_save_case(source, saved):
    """Rank 1 fails in the middle of writing its shard: the earlier checkpoint at ``saved`` survives."""
    import ppzoo.save

    pipe = ppzoo.pipeline(source, pp=2, schedule="1F1B", microbatches=4, device="cpu", attn_implementation="eager")
    before = _digest(Path(saved))
    write = ppzoo.save._write_shard

    def failing(path, tensors):
        path.write_bytes(b"half a shard")
        raise OSError("No space left on device")

    if dist.get_rank() == 1:
        ppzoo.save._write_shard = failing
    try:
        pipe.save_pretrained(saved)
    except Exception as exc:  # noqa: BLE001 - the error each rank saw is the result
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    finally:
        ppzoo.save._write_shard = write
    dist.barrier()
    problems = []
    if _digest(Path(saved)) != before:
        problems.append("the failed save changed the earlier checkpoint")
    if _leftovers(Path(saved)):
        problems.append(f"the failed save left {_leftovers(Path(saved))}")
    dist.barrier()  # every rank has looked before the next save makes a new temporary directory
    # the group is still usable: the next save replaces the checkpoint
    pipe.save_pretrained(saved)
    reference = load_reference(saved)
    problems += [f"after the retry {n} differs" for n, p in pipe.named_parameters()
                 if not torch.equal(p, reference.get_parameter(n))]
    if _leftovers(Path(saved)):
        problems.append(f"replacing the checkpoint left {_leftovers(Path(saved))}")
    return {"problems": problems, "error": error}


def _refusal_case(source, scratch):
    pipe = ppzoo.pipeline(source, pp=2, schedule="1F1B", microbatches=4, device="cpu", attn_implementation="eager")
    scratch = Path(scratch)
    if dist.get_rank() == 0:
        scratch.mkdir()
        (scratch / "a-file").write_text("x")
        (scratch / "work").mkdir()
        (scratch / "work" / "thesis.tex").write_text("years of work")
    dist.barrier()
    errors = {}
    for name in ("a-file", "work"):
        try:
            pipe.save_pretrained(scratch / name)
        except CheckpointError as exc:
            errors[name] = str(exc)
    untouched = (scratch / "work" / "thesis.tex").read_text() == "years of work"
    return {"errors": errors, "untouched": untouched, "entries": sorted(p.name for p in scratch.iterdir())}


def _killed_save_case(source, saved, marker):
    """Rank 1 dies (``os._exit``) in the middle of writing; rank 0 must not rename anything."""
    import ppzoo.save

    pipe = ppzoo.pipeline(source, pp=2, schedule="1F1B", microbatches=4, device="cpu", attn_implementation="eager")
    dist.barrier()

    def dying(path, tensors):
        path.write_bytes(b"half a shard")
        Path(marker).write_text(str(path))
        os._exit(1)

    if dist.get_rank() == 1:
        ppzoo.save._write_shard = dying
    started = time.monotonic()
    try:
        pipe.save_pretrained(saved)
    except Exception as exc:  # noqa: BLE001 - rank 0 reports what it saw
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


def _rank_main(rank, world_size, sources, out):
    out = Path(out)
    results = {}
    cases = [
        (name, _round_trip_case, (sources[src], str(out / name), split, dtype, reload, SAVE_OPTIONS.get(name, {})))
        for name, (src, split, dtype, reload) in ROUND_TRIPS.items()
    ]
    cases += [
        ("failed", _failed_save_case, (sources["llama"], str(out / "llama"))),
        ("refusal", _refusal_case, (sources["llama"], str(out / "scratch"))),
    ]
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = {"problems": [traceback.format_exc()]}
    dist.barrier()
    if rank == 0:
        results["before-kill"] = _digest(out / "llama")
    with open(out / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)
    killed = _killed_save_case(sources["llama"], str(out / "llama"), str(out / "died-while-writing"))
    with open(out / f"rank{rank}.pkl", "wb") as f:
        pickle.dump({**results, "killed": killed}, f)
    return None


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
    # NOTE: the last case kills rank 1 on purpose, so the group always ends in a failure.
    with pytest.raises(DistributedFailure) as failure:
        run_distributed(_rank_main, 2, sources, str(out), timeout_s=300)
    if not all((out / f"rank{r}.pkl").is_file() for r in range(2)):
        raise AssertionError(f"the group ended before reporting:\n{failure.value}")
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    return results, out, str(failure.value)


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_is_exact(group, case):
    results, _, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank[case]["problems"] == [], f"rank {rank}"


@pytest.mark.parametrize("case", ["mixtral-fsdp", "llama-tied-tp"])
def test_sharded_stages_were_sharded(group, case):
    results, _, _ = group
    assert all("DTensor" in per_rank[case]["kinds"] for per_rank in results)


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_index_names_every_key_once_as_hugging_face_does(group, sources, case):
    _, out, _ = group
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


def test_shards_keep_under_max_shard_size_with_hugging_face_names(group):
    _, out, _ = group
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


def test_max_shard_size_accepts_hugging_face_sizes_and_names_bad_ones():
    from ppzoo.save import parse_size

    assert parse_size(1000) == 1000
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5mb") == 1_500_000
    assert parse_size(" 300 KiB ") == 300 * 1024
    for bad in ("five", "5XB", "", "-1GB"):
        with pytest.raises(ValueError, match=re.escape(f"max_shard_size {bad!r} is not a size; use bytes or a string like '5GB'")):
            parse_size(bad)
    for bad in (0, -5, True, "0GB"):
        with pytest.raises(ValueError, match=re.escape(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {bad!r}")):
            parse_size(bad)


def test_config_and_side_files_come_from_the_source(group, sources):
    _, out, _ = group
    saved, source = out / "llama", Path(sources["llama"])
    assert json.loads((saved / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (saved / name).read_bytes() == (source / name).read_bytes(), name
    assert not (saved / "notes.md").exists()
    assert json.loads((out / "llama-bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_rank_failing_mid_write_leaves_the_earlier_checkpoint(group):
    results, _, _ = group
    for rank, per_rank in enumerate(results):
        assert per_rank["failed"]["problems"] == [], f"rank {rank}"
    assert results[1]["failed"]["error"] == "OSError: No space left on device"
    assert results[0]["failed"]["error"] == (
        "CheckpointError: save_pretrained failed on rank 1: OSError: No space left on device"
    )


def test_a_rank_killed_mid_write_leaves_the_earlier_checkpoint(group):
    results, out, failure = group
    assert "rank 1 exited with code 1" in failure
    assert (out / "died-while-writing").is_file(), "rank 1 did not die while writing"
    killed = results[0]["killed"]
    assert killed["error"] is not None, "rank 0 finished a save that rank 1 never completed"
    assert killed["seconds"] < 60
    assert _digest(out / "llama") == results[0]["before-kill"]
    assert _leftovers(out / "llama") == []  # rank 0 removed the partial directory
    assert load_reference(out / "llama") is not None


def test_refuses_a_file_and_a_directory_that_is_no_checkpoint(group):
    results, out, _ = group
    for per_rank in results:
        got = per_rank["refusal"]
        assert got["untouched"]
        assert got["entries"] == ["a-file", "work"]
        assert got["errors"] == {
            "a-file": f"{str(out / 'scratch' / 'a-file')!r} is a file; pass a directory to save into",
            "work": f"{str(out / 'scratch' / 'work')!r} exists and does not look like a checkpoint (none of "
            "config.json, model.safetensors.index.json, model.safetensors, .metadata); a save replaces the "
            "whole directory, so pass a new or empty directory, or an earlier checkpoint",
        }


def test_check_target_accepts_new_empty_and_checkpoint_directories(tmp_path):
    _check_target(tmp_path / "new")
    _check_target(tmp_path)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="does not look like a checkpoint"):
        _check_target(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    _check_target(tmp_path)


def test_side_files_cover_tokenizers_and_generation_config():
    import fnmatch

    for name in ("generation_config.json", "tokenizer.json", "tokenizer.model", "merges.txt", "cl100k.tiktoken"):
        assert any(fnmatch.fnmatch(name, p) for p in SIDE_FILES), name
    for name in ("model.safetensors", INDEX_FILE, "config.json", "README.md"):
        assert not any(fnmatch.fnmatch(name, p) for p in SIDE_FILES), name
