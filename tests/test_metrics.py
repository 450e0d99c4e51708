"""ppzoo.metrics: the FLOP count behind MFU, peak memory, progress lines, JSONL and TensorBoard output."""

import json

import pytest
import torch
from transformers import LlamaConfig

import ppzoo
from ppzoo.architectures.llama import TINY
from ppzoo.meta import meta_model
from ppzoo.metrics import (
    MetricsWriter,
    device_peak_tflops,
    format_metrics,
    mfu,
    peak_memory_bytes,
    train_flops_per_token,
)


def test_train_flops_are_three_forwards_of_the_plan():
    config = LlamaConfig(**TINY)
    plan = ppzoo.plan(config, pp=2, seq_len=64)
    forward = sum(stage.cost for stage in plan.stages)
    assert train_flops_per_token(plan) == pytest.approx(3 * forward)
    # a dense decoder costs at least 2 FLOPs per weight of its matrices, forward
    matrices = sum(p.numel() for p in meta_model(config).parameters() if p.dim() >= 2)
    assert forward >= 2 * (matrices - config.vocab_size * config.hidden_size)


def test_mfu_is_achieved_over_peak():
    assert mfu(1000.0, 6e9, peak_tflops=100.0, devices=4) == pytest.approx(1000 * 6e9 / (100e12 * 4))
    assert mfu(1000.0, 6e9, peak_tflops=None, devices=4) is None
    assert device_peak_tflops(torch.device("cpu")) is None


def test_peak_memory_is_this_process():
    assert peak_memory_bytes(torch.device("cpu")) > 10 * 2**20  # torch alone takes more than 10 MiB


def test_progress_line():
    record = {
        "step": 7,
        "loss": 2.5,
        "grad_norm": 0.75,
        "lr": 1e-3,
        "tokens_per_s": 12345.6,
        "mfu": 0.25,
        "peak_memory_bytes": [2**30, 3 * 2**30],
        "eta_s": 12.0,
        "eval_loss": 2.0,
        "eval_perplexity": 7.389,
    }
    line = format_metrics(record, steps=100)
    assert line == (
        "step   7/100  loss 2.5000  eval loss 2.0000 ppl 7.39  grad norm 0.750  lr 0.001  12,346 tokens/s  "
        "MFU 25.0%  peak mem 3.00 GiB  12s left"
    )
    assert format_metrics({"step": 3, "eval_loss": 1.0, "eval_perplexity": 2.718}, steps=9) == (
        "step 3/9  eval loss 1.0000 ppl 2.72"
    )


def test_writer_appends_json_lines(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write({"step": 1, "loss": 3.0, "peak_memory_bytes": [1, 2]})
    writer.close()
    writer = MetricsWriter(path)  # a resumed run continues the file
    writer.write({"step": 2, "loss": 2.0, "mfu": None})
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 3.0, "peak_memory_bytes": [1, 2]}, {"step": 2, "loss": 2.0, "mfu": None}]


def test_writer_feeds_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    writer = MetricsWriter(None, tensorboard=tmp_path / "tb")
    writer.write({"step": 1, "loss": 3.0, "peak_memory_bytes": [1, 2], "mfu": None})
    writer.close()
    assert any((tmp_path / "tb").iterdir())
