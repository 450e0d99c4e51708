"""``ppzoo train``: pipeline-parallel training from one command.

The launching process checks every option, prepares the model directory and the corpus tokens, and
starts one worker per pipeline rank through torch's elastic launcher (what ``torchrun`` runs). Each
worker runs :func:`train_worker`: ``ppzoo.pipeline`` and AdamW over seeded random windows of the
corpus, the same windows on every rank.

With no ``--model`` the job trains a small Llama-style model built from a config with random
weights; it is saved as safetensors first, so the workers load it the way they load any checkpoint.
Its tokens are bytes (vocabulary 256). A checkpoint with tokenizer files is tokenised with its own
tokenizer.

The default corpus, ``ppzoo/data/stdlib_docstrings.txt``, is prose from the docstrings of the
Python standard library (PSF License).
"""

from __future__ import annotations

import argparse
import contextlib
import math
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

from ppzoo.dtypes import TRAINING_DTYPES

__all__ = [
    "DEFAULT_CORPUS",
    "TrainJob",
    "add_arguments",
    "build_model",
    "load_tokens",
    "main",
    "sample_batch",
    "train_worker",
]

#: the corpus used when ``--data`` is not given
DEFAULT_CORPUS = "stdlib_docstrings.txt"
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
#: files whose presence says a checkpoint ships a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
#: steps averaged for the first and last loss of the summary
_SUMMARY_WINDOW = 5


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, checked and resolved by the launching process."""

    model: str
    tokens_path: str
    pp: int
    schedule: str
    microbatches: int
    steps: int
    lr: float
    seq_len: int
    batch_size: int
    seed: int
    dtype: str
    device: str
    log_every: int
    save: str | None = None
    save_every: int | None = None
    resume: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``ppzoo train`` options to ``parser``."""
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or hub id (default: a small Llama-style model, random weights)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="where to save the built-in model (default: a temporary directory)",
    )
    parser.add_argument(
        "--data", default=None, metavar="FILE", help=f"UTF-8 text to train on (default: ppzoo's {DEFAULT_CORPUS})"
    )
    parser.add_argument("--pp", type=int, default=2, help="pipeline-parallel degree = worker processes (default 2)")
    parser.add_argument(
        "--schedule",
        default="1F1B",
        help="GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, "
        "DualPipeV, or a .csv file (default 1F1B)",
    )
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per step (default 4)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's init and of the batches (default 0)")
    parser.add_argument("--dtype", default="float32", choices=TRAINING_DTYPES, help="parameter dtype (default float32)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu (gloo, one torch thread per worker) or cuda (nccl, one GPU per worker)",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=None,
        metavar="N",
        help="print progress every N steps (default: about 10 lines per run)",
    )
    parser.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="save DIR/model (a Hugging Face checkpoint) and DIR/state (model, optimizer and "
        "step, for --resume) at the end, and every --save-every steps",
    )
    parser.add_argument("--save-every", type=int, default=None, metavar="N", help="also save every N steps")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue a run saved with --save DIR up to --steps, with any --pp or --schedule "
        "(the model comes from DIR/model unless --model is given)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``ppzoo train``: check the options, prepare model and tokens, launch the workers, summarise.

    Args:
        args: the parsed options (see :func:`add_arguments`).

    Returns:
        0 on success, 1 when a worker failed (its error is printed).

    Raises:
        ValueError: an option is invalid or does not suit the model or the corpus; raised before
            any worker starts.
    """
    started = time.perf_counter()
    _check_options(args)
    with tempfile.TemporaryDirectory(prefix="ppzoo-train-") as scratch:
        if args.model is None and args.resume is not None:
            model = str(Path(args.resume) / "model")
        elif args.model is None:
            model_dir = Path(args.model_dir) if args.model_dir else Path(scratch) / "model"
            build_model(model_dir, layers=max(4, 2 * args.pp), seq_len=args.seq_len, seed=args.seed)
            model = str(model_dir)
        else:
            model = args.model
        config, local_dir, total_params = _check_model(model, args)
        data = Path(args.data) if args.data else resources.files("ppzoo") / "data" / DEFAULT_CORPUS
        tokens, tokenizer = load_tokens(local_dir, data, vocab_size=config.vocab_size)
        if tokens.numel() < args.seq_len:
            raise ValueError(
                f"{data} gives {tokens.numel()} tokens, fewer than --seq-len {args.seq_len}; "
                "use a longer text or a shorter --seq-len"
            )
        tokens_path = Path(scratch) / "tokens.pt"
        torch.save(tokens, tokens_path)
        job = TrainJob(
            model=model,
            tokens_path=str(tokens_path),
            pp=args.pp,
            schedule=args.schedule,
            microbatches=args.microbatches,
            steps=args.steps,
            lr=args.lr,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
            log_every=args.log_every or max(1, args.steps // 10),
            save=args.save,
            save_every=args.save_every,
            resume=args.resume,
        )
        origin = f"built-in, random init, saved in {model}" if args.model is None and not args.resume else model
        print(
            f"ppzoo train: {config.model_type} with {total_params / 1e6:.2f}M parameters ({origin}); "
            f"{Path(str(data)).name}: {tokens.numel():,} {tokenizer} tokens; pp={job.pp}, {job.schedule}, "
            f"{job.microbatches} microbatches of {job.batch_size // job.microbatches} x {job.seq_len} tokens, "
            f"{job.steps} steps",
            flush=True,
        )
        summary = _launch(job)
    if summary is None:
        return 1
    _print_summary(summary, job, wall_s=time.perf_counter() - started)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    positive = {
        "--pp": args.pp,
        "--microbatches": args.microbatches,
        "--steps": args.steps,
        "--seq-len": args.seq_len,
        "--batch-size": args.batch_size,
    }
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.log_every is not None and args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (a token and the one it predicts), got {args.seq_len}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if args.batch_size % args.microbatches:
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by --microbatches {args.microbatches}; "
            f"use a batch size that is a multiple of {args.microbatches}"
        )
    _check_checkpoint_options(args)
    if args.model is not None and args.model_dir is not None:
        raise ValueError("--model-dir names where the built-in model is saved; drop it when passing --model")
    if args.model is not None:
        path = Path(args.model).expanduser()
        if path.is_file():
            raise ValueError(f"--model {args.model!r} is a file; pass the checkpoint directory that holds it")
        # NOTE: anything else that does not exist is taken for a hub id, which never looks like a path
        if not path.exists() and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
            raise ValueError(f"--model {args.model!r}: no such directory, and not a hub id ('org/name')")
    if args.data is not None and not Path(args.data).is_file():
        raise ValueError(f"--data {args.data!r} is not a file; pass a UTF-8 text file")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
        if torch.cuda.device_count() < args.pp:
            raise ValueError(f"--pp {args.pp} needs {args.pp} GPUs, torch sees {torch.cuda.device_count()}; lower --pp")


def _check_checkpoint_options(args: argparse.Namespace) -> None:
    from ppzoo.checkpoint import saved_step

    if args.save_every is not None and args.save is None:
        raise ValueError(f"--save-every {args.save_every} needs --save DIR, the directory to save into")
    if args.save_every is not None and args.save_every < 1:
        raise ValueError(f"--save-every must be >= 1, got {args.save_every}")
    if args.save is not None and Path(args.save).is_file():
        raise ValueError(f"--save {args.save!r} is a file; pass a directory (it gets model/ and state/)")
    if args.resume is not None:
        if args.model_dir is not None:
            raise ValueError(
                "--model-dir names where the built-in model is saved; drop it when resuming "
                "(the model comes from the --resume directory)"
            )
        try:
            step = saved_step(Path(args.resume) / "state")
        except Exception as exc:  # noqa: BLE001 - reported with the option it came from
            raise ValueError(f"--resume {args.resume!r}: {exc}; pass a directory written by --save") from exc
        if args.model is None and not (Path(args.resume) / "model" / "config.json").is_file():
            raise ValueError(f"--resume {args.resume!r} has no model/config.json; pass the trained model with --model")
        if step >= args.steps:
            raise ValueError(
                f"--resume {args.resume!r} is at step {step}, --steps is {args.steps}; "
                f"raise --steps above {step} to train further"
            )


def _check_model(model: str, args: argparse.Namespace) -> tuple[Any, Path, int]:
    """The model's config, local directory and size, once the plan and the microbatches suit it."""
    import ppzoo
    from ppzoo.checkpoint import resolve
    from ppzoo.config import load_config
    from ppzoo.schedule import check_microbatches

    local_dir = resolve(model)
    config = load_config(local_dir)
    the_plan = ppzoo.plan(
        config,
        pp=args.pp,
        schedule=args.schedule,
        dtype=args.dtype,
        seq_len=args.seq_len,
        microbatches=args.microbatches,
    )
    check_microbatches(
        schedule=the_plan.schedule, microbatches=args.microbatches, num_stages=the_plan.num_stages, pp=args.pp
    )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {limit}; "
            f"use --seq-len {limit} or less"
        )
    return config, local_dir, the_plan.total_params


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


def load_tokens(model_dir: str | os.PathLike, data: Any, *, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Tokenise the text file ``data`` for the model in ``model_dir``.

    A model directory with tokenizer files gets its own tokenizer (``AutoTokenizer``); one without
    gets one token per UTF-8 byte, which needs a vocabulary of at least 256.

    Args:
        model_dir: the local model directory.
        data: the text file (a path or an ``importlib.resources`` traversable).
        vocab_size: the model's vocabulary size.

    Returns:
        ``(tokens, kind)``: a 1-D ``int64`` tensor, and ``"tokenizer"`` or ``"byte"``.

    Raises:
        ValueError: the text is not UTF-8, the tokenizer fails to load or yields ids outside the
            vocabulary, or there is no tokenizer and the vocabulary is smaller than 256.
    """
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{data} is not UTF-8 text ({exc}); pass a UTF-8 text file with --data") from exc
    model_dir = Path(model_dir)
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # noqa: BLE001 - any failure is reported with the directory
            raise ValueError(f"cannot load the tokenizer in {str(model_dir)!r}: {exc}") from exc
        # NOTE: the corpus is one long text cut into windows later; the model's length limit does
        # not apply to tokenising it, and the warning it would print is noise.
        tokenizer.model_max_length = sys.maxsize
        tokens = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        kind = "tokenizer"
    elif vocab_size >= 256:
        tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        kind = "byte"
    else:
        raise ValueError(
            f"{str(model_dir)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) and its vocab_size "
            f"{vocab_size} is too small for byte tokens (256); add the model's tokenizer to the directory "
            "or use a model with a vocabulary of at least 256"
        )
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"the tokenizer in {str(model_dir)!r} gives token id {int(tokens.max())}, outside the model's "
            f"vocab_size {vocab_size}; the tokenizer does not belong to this model"
        )
    return tokens, kind


def sample_batch(tokens: torch.Tensor, *, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens, ``(batch_size, seq_len)``.

    The same generator state gives the same windows, so ranks seeded alike draw the same batch.
    """
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def train_worker(job: TrainJob) -> dict[str, Any] | None:
    """One pipeline rank's training loop; run by the launcher in every worker.

    Every rank draws the same batches (same seed) and calls ``pipe.step``; rank 0 prints progress.

    Args:
        job: the checked options.

    Returns:
        On rank 0, the losses and timings for the summary; None on other ranks.
    """
    import torch.distributed as dist

    import ppzoo

    if job.device == "cpu":
        # NOTE: workers share the machine's cores; more threads per worker only contend.
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(job.seed)
    pipe = ppzoo.pipeline(
        job.model,
        pp=job.pp,
        schedule=job.schedule,
        microbatches=job.microbatches,
        dtype=job.dtype,
        device=device,
        seq_len=job.seq_len,
    )
    tokens = torch.load(job.tokens_path)
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=job.lr)
    generator = torch.Generator().manual_seed(job.seed)
    start = pipe.load_state(Path(job.resume) / "state", optimizer) if job.resume else 0
    for _ in range(start):  # the batches the saved run already trained on
        sample_batch(tokens, batch_size=job.batch_size, seq_len=job.seq_len, generator=generator)
    talk = dist.get_rank() == 0
    if talk and job.resume:
        print(f"resuming from {job.resume} at step {start}", flush=True)
    tokens_per_step = job.batch_size * job.seq_len
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(start + 1, job.steps + 1):
        input_ids = sample_batch(tokens, batch_size=job.batch_size, seq_len=job.seq_len, generator=generator)
        optimizer.zero_grad()
        loss = pipe.step(input_ids, labels=input_ids)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss is {losses[-1]} at step {step}; lower --lr or use --dtype float32")
        if job.save and (step == job.steps or (job.save_every and step % job.save_every == 0)):
            pipe.save_pretrained(Path(job.save) / "model")
            pipe.save_state(Path(job.save) / "state", optimizer, step=step)
        if talk and (step % job.log_every == 0 or step == job.steps):
            elapsed = time.perf_counter() - started
            left = elapsed / (step - start) * (job.steps - step)
            print(
                f"step {step:>{len(str(job.steps))}}/{job.steps}  loss {losses[-1]:.4f}  "
                f"{tokens_per_step * (step - start) / elapsed:,.0f} tokens/s  {left:.0f}s left",
                flush=True,
            )
    train_s = time.perf_counter() - started
    dist.destroy_process_group()
    if not talk:
        return None
    return {"losses": losses, "train_s": train_s, "tokens": tokens_per_step * len(losses)}


def _launch(job: TrainJob) -> dict[str, Any] | None:
    """Run :func:`train_worker` in ``job.pp`` processes; rank 0's result, or None if a worker failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # NOTE: the settings of ``torchrun --standalone``: a c10d rendezvous on a free local port.
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=job.pp,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
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
    return results[0]


def _print_summary(summary: dict[str, Any], job: TrainJob, *, wall_s: float) -> None:
    losses = summary["losses"]
    window = max(1, min(_SUMMARY_WINDOW, len(losses) // 2))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    print(
        f"done: {len(losses)} steps, loss {first:.4f} -> {last:.4f} (mean of the first and last {window}), "
        f"{summary['tokens'] / summary['train_s']:,.0f} tokens/s, "
        f"training {summary['train_s']:.1f}s, wall time {wall_s:.1f}s",
        flush=True,
    )
