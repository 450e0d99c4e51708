"""One dtype parser: every entry point accepts the same spellings and refuses the same way."""

import pytest
import torch

import ppzoo
from ppzoo.dtypes import parse_dtype
from ppzoo.testing.reference import tiny


@pytest.mark.parametrize(
    "spelling, dtype",
    [
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        (torch.float32, torch.float32),
        (None, torch.float32),
    ],
)
def test_spellings(spelling, dtype):
    assert parse_dtype(spelling) is dtype


def test_default_is_used_for_none():
    assert parse_dtype(None, default=torch.bfloat16) is torch.bfloat16


def test_plan_and_pipeline_refuse_a_misspelled_dtype_alike(tmp_path):
    """``pipeline(dtype=...)`` raises the very error ``plan()`` raises, before any process group."""
    _, config = tiny("llama")
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as from_plan:
        ppzoo.plan(tmp_path, pp=2, dtype="bfloat61")
    with pytest.raises(ValueError) as from_pipeline:
        ppzoo.pipeline(tmp_path, pp=2, dtype="bfloat61", device="cpu")
    assert str(from_plan.value) == str(from_pipeline.value)
    assert "'bfloat61' is not a torch dtype" in str(from_plan.value)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("bad", ["nn", "float33", 3])
def test_non_dtypes_are_refused(bad):
    with pytest.raises(ValueError, match=f"dtype {bad!r} is not a torch dtype"):
        parse_dtype(bad)


@pytest.mark.parametrize("bad", ["int64", torch.bool])
def test_parameters_need_a_floating_dtype(bad):
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        parse_dtype(bad)
