"""``ppzoo train``: pipeline-parallel training from one command.

The launching process merges the options (command line over ``--config`` file over defaults),
checks every one of them, prepares the model directory and the packed data (:mod:`ppzoo.data`),
and starts one worker per rank through torch's elastic launcher (what ``torchrun`` runs). Each
worker runs :func:`train_worker`: ``ppzoo.pipeline``, AdamW under a learning-rate schedule
(:mod:`ppzoo.lr_schedule`), gradient accumulation, evaluation and metrics (:mod:`ppzoo.metrics`).

With no ``--model`` the job trains a small Llama-style model built from a config with random
weights; it is saved as safetensors first, so the workers load it the way they load any checkpoint.
Its tokens are bytes (vocabulary 256). A checkpoint with tokenizer files is tokenised with its own
tokenizer.

The default corpus, ``ppzoo/corpus/stdlib_docstrings.txt``, is prose from the docstrings of the
Python standard library (PSF License).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ppzoo.lr_schedule import LRSchedule
from ppzoo.train_options import (
    DEFAULT_CORPUS,
    DEFAULTS,
    PIPELINE_FLAGS,
    add_arguments,
    check_model,
    check_options,
    resolve_options,
)

__all__ = [
    "DEFAULTS",
    "DEFAULT_CORPUS",
    "TrainJob",
    "add_arguments",
    "build_model",
    "main",
    "resolve_options",
    "train_worker",
]

#: the built-in model: small enough that a CPU run of the defaults takes seconds
BUILTIN_MODEL = dict(
    vocab_size=256,
    hidden_size=96,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
#: steps averaged for the first and last loss of the summary
_SUMMARY_WINDOW = 5


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, checked and resolved by the launching process."""

    model: str
    data_path: str
    pp: int = 1
    schedule: str = "1F1B"
    microbatches: int = 1
    steps: int = 1
    lr: float = 3e-3
    seq_len: int = 128
    batch_size: int = 1
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    log_every: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    tp: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_accum: int = 1
    max_grad_norm: float | None = None
    pipeline_flags: tuple[tuple[str, Any], ...] = ()
    eval_path: str | None = None
    eval_every: int | None = None
    sample_every: int | None = None
    sample_ids: tuple[int, ...] = ()
    sample_tokens: int = 32
    metrics: str | None = None
    tensorboard: str | None = None
    peak_tflops: float | None = None
    save: str | None = None
    save_every: int | None = None
    resume: str | None = None
    stop_at: int | None = None

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_shard * self.dp_replicate * self.tp

    @property
    def schedule_lr(self) -> LRSchedule:
        return LRSchedule(
            self.lr_schedule,
            lr=self.lr,
            steps=self.steps,
            warmup_steps=self.warmup_steps,
            min_lr=self.min_lr,
            decay_steps=self.decay_steps,
        )


def main(args: argparse.Namespace) -> int:
    """Run ``ppzoo train``: merge and check the options, prepare model and data, launch the workers, summarise.

    Args:
        args: the parsed options (see :func:`add_arguments`).

    Returns:
        0 on success, 1 when a worker failed (its error is printed).

    Raises:
        ValueError: an option is invalid or does not suit the model or the data; raised before
            any worker starts.
    """
    from ppzoo.data import Tokenizer, load_data

    started = time.perf_counter()
    args = resolve_options(args)
    check_options(args)
    with tempfile.TemporaryDirectory(prefix="ppzoo-train-") as scratch:
        if args.model is None and args.resume is not None:
            model = str(Path(args.resume) / "model")
        elif args.model is None:
            model_dir = Path(args.model_dir) if args.model_dir else Path(scratch) / "model"
            build_model(model_dir, layers=max(4, 2 * args.pp), seq_len=args.seq_len, seed=args.seed)
            model = str(model_dir)
        else:
            model = args.model
        config, local_dir, the_plan = check_model(model, args)
        tokenizer = Tokenizer(local_dir, vocab_size=config.vocab_size)
        data_path = Path(args.data) if args.data else Path(str(resources.files("ppzoo") / "corpus" / DEFAULT_CORPUS))
        data = load_data(data_path, tokenizer, seq_len=args.seq_len)
        data.save(Path(scratch) / "data.pt")
        _record_data_order(data, args)
        eval_note = ""
        if args.eval_data:
            held_out = load_data(args.eval_data, tokenizer, seq_len=args.seq_len, flag="--eval-data")
            held_out.save(Path(scratch) / "eval.pt")
            eval_note = f"; eval: {held_out.rows} sequences"
        job = TrainJob(
            model=model,
            data_path=str(Path(scratch) / "data.pt"),
            eval_path=str(Path(scratch) / "eval.pt") if args.eval_data else None,
            pp=args.pp,
            dp_shard=args.dp_shard,
            dp_replicate=args.dp_replicate,
            tp=args.tp,
            schedule=args.schedule,
            microbatches=args.microbatches,
            steps=args.steps,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            min_lr=args.min_lr,
            decay_steps=args.decay_steps,
            betas=tuple(args.betas),
            weight_decay=args.weight_decay,
            grad_accum=args.grad_accum,
            max_grad_norm=args.max_grad_norm,
            pipeline_flags=tuple((k, getattr(args, k)) for k in PIPELINE_FLAGS if getattr(args, k)),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
            log_every=args.log_every or max(1, args.steps // 10),
            eval_every=args.eval_every,
            sample_every=args.sample_every,
            sample_ids=tuple(tokenizer.encode(args.sample_prompt)) if args.sample_every else (),
            sample_tokens=args.sample_tokens,
            metrics=args.metrics or (str(Path(args.save) / "metrics.jsonl") if args.save else None),
            tensorboard=args.tensorboard or (str(Path(args.save) / "tensorboard") if args.save else None),
            peak_tflops=args.peak_tflops,
            save=args.save,
            save_every=args.save_every,
            stop_at=args.stop_at,
            resume=args.resume,
        )
        origin = f"built-in, random init, saved in {model}" if args.model is None and not args.resume else model
        degrees = ", ".join(
            f"{name}={getattr(job, name)}"
            for name in ("pp", "dp_shard", "dp_replicate", "tp")
            if getattr(job, name) > 1
        )
        print(
            f"ppzoo train: {config.model_type} with {the_plan.total_params / 1e6:.2f}M parameters ({origin}); "
            f"{data_path.name}: {data.rows} sequences of {job.seq_len} from {data.documents} documents, "
            f"{data.tokens:,} {tokenizer.kind} tokens to learn{eval_note}; {degrees or 'pp=1'}, {job.schedule}, "
            f"{job.microbatches} microbatches of {job.batch_size // job.microbatches} x {job.seq_len} tokens"
            + (f", {job.grad_accum} accumulated" if job.grad_accum > 1 else "")
            + f", {job.steps} steps",
            flush=True,
        )
        summary = _launch(job, args)
    if summary is None:
        return 1
    if summary.get("losses") is not None:
        _print_summary(summary, wall_s=time.perf_counter() - started)
    return 0


#: what fixes the batch of every step, kept in ``--save DIR`` and compared on ``--resume``
DATA_ORDER_FILE = "data_order.json"


def _record_data_order(data: Any, args: argparse.Namespace) -> None:
    """Warn when a resumed run's batches differ from the saved run's; note this run's for the next."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for tensor in (data.input_ids, data.labels, data.position_ids):
        digest.update(tensor.numpy().tobytes())
    order = {
        "data": digest.hexdigest(),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "seed": args.seed,
    }
    saved_file = Path(args.resume) / DATA_ORDER_FILE if args.resume else None
    if saved_file is not None and saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        changed = [key for key in order if saved.get(key) != order[key]]
        if changed:
            what = ", ".join(
                "the data" if key == "data" else f"--{key.replace('_', '-')} {order[key]} (saved: {saved.get(key)})"
                for key in changed
            )
            print(
                f"ppzoo train: warning: {what} differ from the run saved in {args.resume}: from here on the "
                "batches are not the ones the saved run would have seen",
                file=sys.stderr,
                flush=True,
            )
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        (Path(args.save) / DATA_ORDER_FILE).write_text(json.dumps(order, indent=1) + "\n")


def build_model(directory: str | os.PathLike, *, layers: int = 4, seq_len: int = 128, seed: int = 0) -> Path:
    """Save the built-in model: a small Llama-style model with random weights, as safetensors.

    Args:
        directory: where ``config.json`` and ``model.safetensors`` go (created if missing).
        layers: decoder layers (at least the number of pipeline stages).
        seq_len: the longest sequence it will see; sets ``max_position_embeddings``.
        seed: seed of the random init.

    Returns:
        The directory.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**BUILTIN_MODEL, num_hidden_layers=layers, max_position_embeddings=max(seq_len, 512))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with _quiet_progress_bars():
        model.save_pretrained(directory)
    return Path(directory)


@contextlib.contextmanager
def _quiet_progress_bars():
    # NOTE: a one-file save needs no progress bar between the job's own lines.
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def train_worker(job: TrainJob) -> dict[str, Any] | None:
    """One rank's training loop; run by the launcher in every worker (see :mod:`ppzoo.training_loop`)."""
    from ppzoo.training_loop import run

    return run(job)


def _launch(job: TrainJob, args: argparse.Namespace) -> dict[str, Any] | None:
    """Run :func:`train_worker` on this machine's ranks; global rank 0's result (``{}`` on other
    machines), or None if a worker failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if args.nnodes == 1:
        # NOTE: the settings of ``torchrun --standalone``: a c10d rendezvous on a free local port.
        rendezvous = dict(run_id=str(uuid.uuid4()), rdzv_backend="c10d", rdzv_endpoint="localhost:0")
    elif args.node_rank is not None:
        # NOTE: ``torchrun --node-rank R --master-addr HOST --master-port PORT``: fixed machine ranks.
        rendezvous = dict(
            run_id="ppzoo-train",
            rdzv_backend="static",
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_configs={"rank": args.node_rank},
        )
    else:
        rendezvous = dict(run_id="ppzoo-train", rdzv_backend="c10d", rdzv_endpoint=args.rdzv_endpoint)
    config = LaunchConfig(
        min_nodes=args.nnodes,
        max_nodes=args.nnodes,
        nproc_per_node=job.world_size // args.nnodes,
        max_restarts=0,
        start_method="spawn",
        **rendezvous,
    )
    try:
        results = elastic_launch(config, train_worker)(job)
    except ChildFailedError as exc:
        # NOTE: the launcher runs the worker under torch's ``record``, which writes the worker's
        # error to a file it reads back into ``failure.message``.
        rank, failure = exc.get_first_failure()
        detail = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        print(f"ppzoo train: error: worker rank {rank} failed (exit code {failure.exitcode})", file=sys.stderr)
        if detail:
            print(detail, file=sys.stderr)
        return None
    return next((r for r in results.values() if r is not None), {})


def _print_summary(summary: dict[str, Any], *, wall_s: float) -> None:
    losses = summary["losses"]
    window = max(1, min(_SUMMARY_WINDOW, len(losses) // 2))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    evaluated = f", eval loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else ""
    print(
        f"done: {len(losses)} steps, loss {first:.4f} -> {last:.4f} (mean of the first and last {window}){evaluated}, "
        f"{summary['tokens'] / summary['train_s']:,.0f} tokens/s, "
        f"training {summary['train_s']:.1f}s, wall time {wall_s:.1f}s",
        flush=True,
    )
