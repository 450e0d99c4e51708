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
import ppzoo.config
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


def _index(directory, weight_map):
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "name",
    ["../outside/x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""],
    ids=["parent", "absolute", "subdirectory", "dotdot", "empty"],
)
def test_a_shard_name_outside_the_directory_is_refused(tmp_path, name):
    directory = tmp_path / "model"
    directory.mkdir()
    _index(directory, {"a": "model-1.safetensors", "b": name})
    message = (
        f"shard {name!r} listed in {str(directory / INDEX_FILE)!r} is not a plain file name inside the directory; "
        "an index lists shard files by their bare names; repair the index or the checkpoint directory"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        Checkpoint(directory)


def test_a_shard_linked_outside_the_directory_is_refused_before_any_read(tmp_path, monkeypatch):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.ones(2)}, outside)
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model-1.safetensors").symlink_to(outside)
    _index(directory, {"a": "model-1.safetensors"})
    opened = []
    monkeypatch.setattr(ppzoo.checkpoint.reading.os, "open", lambda *a, **k: opened.append(a) or 0)
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"shard 'model-1.safetensors' listed in {str(directory / INDEX_FILE)!r} is a link to ")
        + re.escape(f"{str(outside.resolve())!r}, outside the directory"),
    ):
        Checkpoint(directory)
    assert opened == []


def test_a_link_inside_the_directory_or_into_a_hub_cache_is_followed(tmp_path):
    blobs = tmp_path / "models--org--m" / "blobs"
    snapshot = tmp_path / "models--org--m" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file({"a": torch.arange(3.0)}, blobs / "0123")
    save_file({"b": torch.ones(2)}, snapshot / "real.safetensors")
    (snapshot / "model-1.safetensors").symlink_to("../../blobs/0123")
    (snapshot / "model-2.safetensors").symlink_to("real.safetensors")
    _index(snapshot, {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    reader = Checkpoint(snapshot).open()
    try:
        assert torch.equal(reader.read("a", into=torch.empty(3)), torch.arange(3.0))
        assert torch.equal(reader.read("b", into=torch.empty(2)), torch.ones(2))
    finally:
        reader.close()


def test_an_index_that_is_not_json(tmp_path):
    (tmp_path / INDEX_FILE).write_text('{"weight_map": ')
    with pytest.raises(
        CheckpointError,
        match="^"
        + re.escape(f"{str(tmp_path / INDEX_FILE)!r} is not valid JSON (")
        + ".*"
        + re.escape("); the index is damaged: download or save it again")
        + "$",
    ):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content, problem",
    [
        ((10**12).to_bytes(8, "little") + b"{}", "its header says 1000000000000 bytes, but only 2 follow"),
        (b"\x01\x00", "it has 2 bytes, fewer than the 8 of a header length"),
        ((5).to_bytes(8, "little") + b"{nope", "its header is not JSON ("),
        ((2).to_bytes(8, "little") + b"[]", "its header is a JSON list, not an object"),
    ],
    ids=["length-past-the-end", "too-short", "not-json", "not-an-object"],
)
def test_a_damaged_shard_header_names_the_file(tmp_path, content, problem, monkeypatch):
    (tmp_path / "model-1.safetensors").write_bytes(content)
    _index(tmp_path, {"a": "model-1.safetensors"})
    reads = []
    pread = ppzoo.checkpoint.reading.os.pread
    monkeypatch.setattr(ppzoo.checkpoint.reading.os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    reader = Checkpoint(tmp_path).open()
    try:
        with pytest.raises(
            CheckpointError,
            match="^"
            + re.escape(f"'model-1.safetensors' in {str(tmp_path)!r} is not a safetensors file: {problem}")
            + ".*"
            + re.escape("the file is damaged or truncated: download or save it again")
            + "$",
        ):
            reader.read("a", into=torch.empty(1))
    finally:
        reader.close()
    assert all(n <= len(content) for n in reads)


def test_a_damaged_single_file_names_the_file(tmp_path):
    (tmp_path / SINGLE_FILE).write_bytes((10**12).to_bytes(8, "little") + b"{}")
    message = f"{SINGLE_FILE!r} in {str(tmp_path)!r} is not a safetensors file: "
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + ".*download or save it again$"):
        Checkpoint(tmp_path)


def test_shards_are_downloaded_with_the_metadata_hub_arguments(tmp_path, monkeypatch):
    import huggingface_hub

    shard = tmp_path / "cache" / "model-1.safetensors"
    shard.parent.mkdir()
    save_file({"a": torch.ones(2)}, shard)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    _index(snapshot, {"a": "model-1.safetensors"})
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(shard)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    hub = {"revision": "v1.2", "token": "secret", "cache_dir": str(tmp_path / "cache")}
    checkpoint = Checkpoint(snapshot, repo_id="org/model", hub_kwargs=hub)
    assert checkpoint.file_of("a") == shard
    assert calls == [("org/model", "model-1.safetensors", hub)]


@pytest.mark.parametrize("path", ["./nope", "/abs/nope", "nope/", "~/nope-ppzoo", "a/b/c"])
def test_a_missing_local_path_is_not_looked_up_on_the_hub(path, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up on the hub"))
    message = f"no directory {path!r}; pass a Hugging Face model directory or hub id"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(message) + "$"):
        ppzoo.checkpoint.reading.resolve(path)
    with pytest.raises(FileNotFoundError, match="^" + re.escape(message) + "$"):
        ppzoo.config.load_config(path)


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
