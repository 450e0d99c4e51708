"""Reading safetensors checkpoints: the index, and tensors or parts of them read straight into storage."""

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

import ppzoo.checkpoint.reading
from ppzoo.architectures.llama import TINY
from ppzoo.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError


def test_directory_without_safetensors(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    message = (
        f"no {SINGLE_FILE} or {INDEX_FILE} in {str(tmp_path)!r}; ppzoo loads safetensors checkpoints "
        "(save with save_pretrained(safe_serialization=True))"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        Checkpoint(tmp_path)


def test_index_without_a_weight_map(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}}))
    message = (
        f"{str(tmp_path / INDEX_FILE)!r} has no 'weight_map' object mapping each tensor to its shard file "
        "(found keys ['metadata']); the index is damaged or not a safetensors index"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        Checkpoint(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps([]))
    with pytest.raises(
        CheckpointError, match=re.escape("has no 'weight_map' object") + ".*" + re.escape("(found list)")
    ):
        Checkpoint(tmp_path)


# -- reads straight into storage -------------------------------------------------------------------


class Preads:
    """Records the calls of the in-place path and the element ranges each ``pread`` fetched."""

    def __init__(self, monkeypatch):
        self.into_storage, self.get_tensor, self.get_slice, self.safe_open, self.calls = [], [], [], [], []
        read_into, pread_into = Checkpoint._read_into_storage, ppzoo.checkpoint.reading._pread_into
        get_tensor, get_slice = Checkpoint._get_tensor, Checkpoint._get_slice

        def recording_read_into(checkpoint, reader, key, out, part):
            self.into_storage.append((key, part))
            return read_into(checkpoint, reader, key, out, part)

        def recording_pread(fd, buffer, offset):
            self.calls.append((offset, len(buffer)))
            return pread_into(fd, buffer, offset)

        def recording_get_tensor(checkpoint, handle, key):
            self.get_tensor.append(key)
            return get_tensor(checkpoint, handle, key)

        def recording_get_slice(checkpoint, handle, key, part):
            self.get_slice.append((key, part))
            return get_slice(checkpoint, handle, key, part)

        monkeypatch.setattr(Checkpoint, "_read_into_storage", recording_read_into)
        monkeypatch.setattr(ppzoo.checkpoint.reading, "_pread_into", recording_pread)
        monkeypatch.setattr(Checkpoint, "_get_tensor", recording_get_tensor)
        monkeypatch.setattr(Checkpoint, "_get_slice", recording_get_slice)
        monkeypatch.setattr(
            ppzoo.checkpoint.reading, "safe_open", lambda *a, **k: self.safe_open.append(a) or safe_open(*a, **k)
        )

    def elements(self, path, key, itemsize):
        """The element indices of ``key`` that the ``pread`` calls fetched, in the order fetched."""
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            begin = 8 + length + json.loads(f.read(length))[key]["data_offsets"][0]
        fetched = []
        for offset, n in self.calls:
            assert (offset - begin) % itemsize == 0 and n % itemsize == 0, (offset, n)
            fetched.extend(range((offset - begin) // itemsize, (offset - begin + n) // itemsize))
        return fetched


SHAPES = {"matrix": (5, 6), "vector": (5,), "cube": (3, 4, 5), "scalar": ()}

#: (key, part): FSDP's dim-0 shards (5 rows over 2 and 3 ranks, an empty one), parts of a 1-D
#: tensor, a row-wise TP shard (columns), and a part cut in two dimensions
PARTS = [
    ("matrix", (slice(0, 3), slice(0, 6))),
    ("matrix", (slice(3, 5), slice(0, 6))),
    ("matrix", (slice(4, 5), slice(0, 6))),
    ("matrix", (slice(5, 5), slice(0, 6))),
    ("vector", (slice(0, 3),)),
    ("vector", (slice(3, 5),)),
    ("cube", (slice(2, 3), slice(0, 4), slice(0, 5))),
    ("matrix", (slice(0, 5), slice(3, 6))),
    ("cube", (slice(1, 3), slice(0, 4), slice(1, 4))),
]
CASTS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
]


def contiguous_rows(shape, part):
    """Whether ``part`` is one byte range of the stored tensor: a row block, every later dim whole."""
    cut = [d for d, (s, n) in enumerate(zip(part, shape, strict=True)) if (s.start, s.stop) != (0, n)]
    return all(d == 0 for d in cut)


@pytest.fixture(scope="module")
def small_tensors(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    generator = torch.Generator().manual_seed(0)
    tensors = {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}
    for dtype in (torch.float32, torch.bfloat16):
        (directory / str(dtype)).mkdir()
        save_file({k: t.to(dtype) for k, t in tensors.items()}, directory / str(dtype) / SINGLE_FILE)
    return directory


@pytest.mark.parametrize("file_dtype, dtype", CASTS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("key, part", PARTS, ids=[f"{k}{[(s.start, s.stop) for s in p]}" for k, p in PARTS])
def test_a_part_is_read_straight_into_its_shard(small_tensors, key, part, file_dtype, dtype, monkeypatch):
    """Only the part's own elements come from the file, each once, into the shard's storage; a
    row block is one read when no cast is needed; no whole tensor is read."""
    monkeypatch.setattr(ppzoo.checkpoint.reading, "_BLOCK_BYTES", 8)  # a staging buffer of 2 or 4 elements
    directory = small_tensors / str(file_dtype)
    stored = load_file(directory / SINGLE_FILE)[key]
    checkpoint = Checkpoint(directory)
    preads = Preads(monkeypatch)
    reader = checkpoint.open("cpu")
    local = torch.full([s.stop - s.start for s in part], float("nan"), dtype=dtype)
    assert reader.read(key, part, into=local) is local
    reader.close()
    assert torch.equal(local, stored[part].to(dtype))
    assert preads.into_storage == [(key, part)] and preads.get_slice == [(key, part)]
    assert preads.get_tensor == [] and preads.safe_open == []
    indices = torch.arange(stored.numel()).view(stored.shape)[part].flatten().tolist()
    assert preads.elements(directory / SINGLE_FILE, key, file_dtype.itemsize) == indices
    if contiguous_rows(stored.shape, part) and file_dtype == dtype and local.numel():
        assert len(preads.calls) == 1
    assert reader.files == {}


@pytest.mark.parametrize("file_dtype, dtype", CASTS, ids=lambda d: str(d).removeprefix("torch."))
def test_whole_tensors_are_read_straight_into_their_targets(small_tensors, file_dtype, dtype, monkeypatch):
    monkeypatch.setattr(ppzoo.checkpoint.reading, "_BLOCK_BYTES", 12)
    directory = small_tensors / str(file_dtype)
    stored = load_file(directory / SINGLE_FILE)
    checkpoint = Checkpoint(directory)
    preads = Preads(monkeypatch)
    reader = checkpoint.open("cpu")
    for key, shape in SHAPES.items():
        local = torch.full(shape, float("nan"), dtype=dtype)
        reader.read(key, into=local)
        assert torch.equal(local, stored[key].to(dtype)), key
    reader.close()
    assert [key for key, _ in preads.into_storage] == preads.get_tensor == list(SHAPES)
    assert preads.safe_open == []
    assert len(preads.calls) == (
        len(SHAPES)
        if file_dtype == dtype
        else sum(-(-math.prod(shape) * file_dtype.itemsize // 12) for shape in SHAPES.values())
    )


def test_a_target_that_cannot_take_a_read_in_place_is_copied(small_tensors, monkeypatch):
    """A non-contiguous target (and any on a GPU) is read through safetensors, then copied."""
    directory = small_tensors / str(torch.bfloat16)
    stored = load_file(directory / SINGLE_FILE)["matrix"]
    checkpoint = Checkpoint(directory)
    preads = Preads(monkeypatch)
    reader = checkpoint.open("cpu")
    local = torch.empty(6, 5).t()
    part = (slice(0, 5), slice(3, 6))
    assert reader.read("matrix", part, into=local[:, 3:]).data_ptr() == local[:, 3:].data_ptr()
    reader.read("matrix", into=local)
    reader.close()
    assert torch.equal(local, stored.float())
    assert preads.into_storage == [] and preads.calls == [] and len(preads.safe_open) == 1
