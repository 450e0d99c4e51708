"""The loop each ``ppzoo train`` worker runs: pipeline steps, accumulation, evaluation, metrics, saves.

Every rank reads the same packed data (:class:`ppzoo.data.PackedData`) and computes the global
batch of each step from the step number alone; a data-parallel rank passes its own rows of it to
``pipe.step``. So a resumed run trains on exactly the batches the uninterrupted run would.

Gradient accumulation keeps the loss a mean over every learnt token of the optimizer step:
``pipe.step`` divides each batch's summed token loss by that batch's token count ``n_i``, so batch
``i``'s gradients are weighted by ``n_i / N`` (``N`` the step's total) before they are added up.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from ppzoo.data import PackedData
from ppzoo.loss import causal_lm_loss, count_label_tokens
from ppzoo.metrics import (
    MetricsWriter,
    device_peak_tflops,
    format_metrics,
    mfu,
    peak_memory_bytes,
    train_flops_per_token,
)

__all__ = ["accumulate", "data_parallel_rows", "evaluate", "run"]


def data_parallel_rows(pipe: Any, batch_size: int) -> slice:
    """This rank's rows of a global batch of ``batch_size``: its data-parallel rank's share."""
    mesh = pipe.mesh
    shard, replicate = mesh["dp_shard"], mesh["dp_replicate"]
    dp = shard.size() * replicate.size()
    index = replicate.get_local_rank() * shard.size() + shard.get_local_rank()
    per_rank = batch_size // dp
    return slice(index * per_rank, (index + 1) * per_rank)


def accumulate(pipe: Any, batches: list[dict[str, torch.Tensor]], rows: slice) -> float:
    """Pipeline steps over ``batches`` whose gradients add up to one batch's; returns the step's loss.

    The loss is the mean over all the batches' learnt tokens (plus any auxiliary loss, weighted
    alike). A batch with no token to learn is skipped.
    """
    counts = [count_label_tokens(batch["labels"]) for batch in batches]
    total = sum(counts)
    if total == 0:
        raise ValueError("the step's batches hold no token to learn (every label is -100)")
    params = list(pipe.parameters())
    summed: dict[int, torch.Tensor] = {}
    loss = 0.0
    for batch, count in zip(batches, counts):
        if count == 0:
            continue
        part = pipe.step(
            batch["input_ids"][rows], labels=batch["labels"][rows], position_ids=batch["position_ids"][rows]
        )
        weight = count / total
        loss += part.item() * weight
        if len(batches) == 1:
            break
        # NOTE: each batch's gradients are weighted on their own, then summed: scaling a running
        # sum instead would round differently from the one-batch step.
        for param in params:
            if param.grad is None:
                continue
            grad, param.grad = param.grad, None
            grad.mul_(weight)
            if id(param) in summed:
                summed[id(param)].add_(grad)
            else:
                summed[id(param)] = grad
    if summed:
        for param in params:
            if id(param) in summed:
                param.grad = summed[id(param)]
    return loss


@torch.no_grad()
def evaluate(pipe: Any, data: PackedData, *, batch_size: int, rows: slice) -> tuple[float, int]:
    """Loss (mean over learnt tokens) and token count of ``data``, through ``pipe.eval``.

    The last stage's ranks (one per data-parallel rank) sum their rows' token losses; the sums go
    to every rank. The last batch is filled up with rows that teach nothing.
    """
    from ppzoo.loss import IGNORE_INDEX

    mesh = pipe.mesh
    counts = torch.zeros(2, dtype=torch.float64)
    speaks = pipe.holds_last and mesh["tp"].get_local_rank() == 0 and mesh["cp"].get_local_rank() == 0
    for index in range(-(-data.rows // batch_size)):
        batch = data.batch(index, batch_size, seed=None)
        beyond = torch.arange(index * batch_size, (index + 1) * batch_size) >= data.rows
        labels = batch["labels"].masked_fill(beyond[:, None], IGNORE_INDEX)[rows]
        logits = pipe.eval(batch["input_ids"][rows], position_ids=batch["position_ids"][rows])
        if logits is not None and speaks:
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            counts[0] += causal_lm_loss(logits, labels, 1).double().item()
            counts[1] += count_label_tokens(labels)
    counts = counts.to(pipe.device)
    dist.all_reduce(counts)
    total, tokens = counts.tolist()
    return total / max(tokens, 1), int(tokens)


def _build(job: Any, device: torch.device) -> Any:
    import ppzoo

    return ppzoo.pipeline(
        job.model,
        pp=job.pp,
        schedule=job.schedule,
        microbatches=job.microbatches,
        dtype=job.dtype,
        device=device,
        seq_len=job.seq_len,
        dp_shard=job.dp_shard,
        dp_replicate=job.dp_replicate,
        tp=job.tp,
        # NOTE: every rank computes its batches itself; the content check catches ranks that differ
        check_batch=True,
        **dict(job.pipeline_flags),
    )


def _sample(pipe: Any, job: Any) -> str:
    """A greedy completion of the sample prompt (``--sample-every``), as text (collective)."""
    from ppzoo.data import Tokenizer

    ids = pipe.generate(torch.tensor([job.sample_ids]), max_new_tokens=job.sample_tokens)
    new = ids[0, len(job.sample_ids) :].tolist()
    tokenizer = Tokenizer(pipe.source, vocab_size=int(pipe.adapter.text_config(pipe.config).vocab_size))
    if tokenizer.hf is None:
        return bytes(t for t in new if t < 256).decode("utf-8", errors="replace")
    return tokenizer.hf.decode(new, skip_special_tokens=True)


def adamw(parameters: Any, **options: Any) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter's device has one, else its default.

    The fused kernel updates every parameter in one call instead of a loop of element-wise ops:
    on a CPU about five times faster (docs/benchmarks.md §13), the step the pipeline's busiest
    rank runs after its last backward. It computes the same update (float rounding aside).
    """
    params = list(parameters)
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices() for p in params
    )
    return torch.optim.AdamW(params, fused=fused or None, **options)


def run(job: Any) -> dict[str, Any] | None:
    """One rank's training loop (``job`` is a :class:`ppzoo.train.TrainJob`).

    Returns:
        On global rank 0, the losses, eval loss and timings for the summary; None elsewhere.
    """
    if job.device == "cpu":
        # NOTE: workers share the machine's cores; more threads per worker only contend.
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(job.seed)
    pipe = _build(job, device)
    data = PackedData.load(job.data_path)
    held_out = PackedData.load(job.eval_path) if job.eval_path else None
    optimizer = adamw(pipe.parameters(), lr=job.lr, betas=tuple(job.betas), weight_decay=job.weight_decay)
    schedule = job.schedule_lr
    start = pipe.load_state(Path(job.resume) / "state", optimizer) if job.resume else 0
    for group in optimizer.param_groups:  # NOTE: this run's settings, not the saved run's
        group.update(betas=tuple(job.betas), weight_decay=job.weight_decay)
    talk = dist.get_rank() == 0
    writer = MetricsWriter(job.metrics, tensorboard=job.tensorboard) if talk else None
    if talk and job.resume:
        print(f"resuming from {job.resume} at step {start}", flush=True)
    rows = data_parallel_rows(pipe, job.batch_size)
    tokens_per_step = job.batch_size * job.seq_len * job.grad_accum
    flops = train_flops_per_token(pipe.plan)
    peak = job.peak_tflops or device_peak_tflops(device)
    losses: list[float] = []
    eval_loss = None
    train_s = 0.0
    window_s, window_steps = 0.0, 0
    last = min(job.steps, job.stop_at or job.steps)
    for step in range(start + 1, last + 1):
        began = time.perf_counter()
        lr = schedule.apply(optimizer, step)
        first = (step - 1) * job.grad_accum
        batches = [data.batch(first + i, job.batch_size, seed=job.seed) for i in range(job.grad_accum)]
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(pipe, batches, rows)
        # NOTE: without --max-grad-norm the norm is only measured (scaling by 1 changes nothing)
        grad_norm = float(pipe.clip_grad_norm_(job.max_grad_norm if job.max_grad_norm is not None else math.inf))
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - began
        train_s += took
        window_s += took
        window_steps += 1
        losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or use --dtype float32")
        record: dict[str, Any] = {}
        if step % job.log_every == 0 or step == last:
            memory = torch.tensor([peak_memory_bytes(device)], dtype=torch.float64, device=pipe.device)
            gathered = [torch.zeros_like(memory) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, memory)
            speed = tokens_per_step * window_steps / window_s
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens_per_s": speed,
                "mfu": mfu(speed, flops, peak_tflops=peak, devices=dist.get_world_size()),
                "peak_memory_bytes": [int(m.item()) for m in gathered],
                "eta_s": train_s / (step - start) * (last - step),
            }
            window_s, window_steps = 0.0, 0
        if held_out is not None and (step == job.steps or (job.eval_every and step % job.eval_every == 0)):
            eval_loss, eval_tokens = evaluate(pipe, held_out, batch_size=job.batch_size, rows=rows)
            record = {"step": step, **record, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700))}
        if job.sample_every and step % job.sample_every == 0:
            text = _sample(pipe, job)
            if talk:
                print(f"sample at step {step}: {text!r}", flush=True)
        if job.save and (step == last or (job.save_every and step % job.save_every == 0)):
            pipe.save_pretrained(Path(job.save) / "model")
            pipe.save_state(Path(job.save) / "state", optimizer, step=step)
        if talk and record:
            print(format_metrics(record, steps=job.steps), flush=True)
            writer.write(record)
    if writer is not None:
        writer.close()
    dist.destroy_process_group()
    if not talk:
        return None
    return {"losses": losses, "eval_loss": eval_loss, "train_s": train_s, "tokens": tokens_per_step * len(losses)}
