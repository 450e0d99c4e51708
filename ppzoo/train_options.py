"""The options of ``ppzoo train``: defaults, the ``--config`` file, and every check made before a worker starts.

Each option is None on the command line unless given; :func:`resolve_options` fills it from the
``--config`` TOML file, else from :data:`DEFAULTS`. :func:`check_options` and :func:`check_model`
refuse bad values with a message that names the value and the fix.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch

from ppzoo.dtypes import TRAINING_DTYPES
from ppzoo.lr_schedule import LR_SCHEDULES, LRSchedule

__all__ = ["DEFAULTS", "PIPELINE_FLAGS", "add_arguments", "check_model", "check_options", "resolve_options"]

#: the corpus used when ``--data`` is not given (in ``ppzoo/corpus/``)
DEFAULT_CORPUS = "stdlib_docstrings.txt"
#: every option's default (the command line and ``--config`` leave an option None when not given)
DEFAULTS: dict[str, Any] = dict(
    config=None,
    model=None,
    model_dir=None,
    data=None,
    eval_data=None,
    eval_every=None,
    sample_every=None,
    sample_prompt=None,
    sample_tokens=32,
    pp=2,
    dp_shard=1,
    dp_replicate=1,
    tp=1,
    schedule="1F1B",
    microbatches=4,
    steps=100,
    lr=3e-3,
    lr_schedule="constant",
    warmup_steps=0,
    min_lr=0.0,
    decay_steps=None,
    betas=(0.9, 0.999),
    weight_decay=0.01,
    grad_accum=1,
    max_grad_norm=None,
    seq_len=128,
    batch_size=8,
    seed=0,
    dtype="float32",
    mixed_precision=None,
    activation_checkpointing=None,
    compile=False,
    device="cpu",
    log_every=None,
    metrics=None,
    tensorboard=None,
    peak_tflops=None,
    save=None,
    save_every=None,
    resume=None,
    stop_at=None,
    nnodes=1,
    node_rank=None,
    rdzv_endpoint=None,
)
#: options that pass straight to ``ppzoo.pipeline`` when set (it checks their values)
PIPELINE_FLAGS = ("mixed_precision", "activation_checkpointing", "compile")


def _betas(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``ppzoo train`` options to ``parser`` (each None unless given; see :data:`DEFAULTS`)."""
    d = DEFAULTS
    g = parser.add_argument_group("model and data")
    g.add_argument("--config", metavar="FILE", help="a TOML file of options (`seq-len = 256`); the command line wins")
    g.add_argument(
        "--model", help="checkpoint directory or hub id (default: a small Llama-style model, random weights)"
    )
    g.add_argument(
        "--model-dir", metavar="DIR", help="where to save the built-in model (default: a temporary directory)"
    )
    g.add_argument(
        "--data",
        metavar="PATH",
        help="text, .jsonl ('text' or chat 'messages'), .parquet, or a saved datasets directory "
        f"(default: ppzoo's {DEFAULT_CORPUS})",
    )
    g.add_argument("--eval-data", metavar="PATH", help="held-out data, any --data format: loss and perplexity")
    g.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps (default: at the end)")
    g.add_argument(
        "--sample-every", type=int, metavar="N", help="print a greedy completion of --sample-prompt every N steps"
    )
    g.add_argument("--sample-prompt", metavar="TEXT", help="the prompt --sample-every completes")
    g.add_argument(
        "--sample-tokens", type=int, metavar="N", help=f"tokens a sample has at most (default {d['sample_tokens']})"
    )
    g.add_argument("--seq-len", type=int, help=f"tokens per packed sequence (default {d['seq_len']})")
    g = parser.add_argument_group("parallelism and precision")
    g.add_argument("--pp", type=int, help=f"pipeline-parallel degree (default {d['pp']})")
    g.add_argument("--dp-shard", type=int, help="FSDP2 degree: ranks sharding each stage (default 1)")
    g.add_argument("--dp-replicate", type=int, help="replicated data-parallel degree (default 1)")
    g.add_argument(
        "--tp", type=int, help="tensor-parallel degree (default 1); processes = pp x dp-shard x dp-replicate x tp"
    )
    g.add_argument(
        "--schedule",
        help="GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, "
        f"DualPipeV, or a .csv file (default {d['schedule']})",
    )
    g.add_argument("--microbatches", type=int, help=f"microbatches per pipeline step (default {d['microbatches']})")
    g.add_argument("--dtype", choices=TRAINING_DTYPES, help="parameter dtype (default float32)")
    g.add_argument(
        "--mixed-precision", metavar="bf16", help="bf16: float32 parameters, bfloat16 compute (default: none)"
    )
    g.add_argument(
        "--activation-checkpointing",
        metavar="full|selective",
        help="recompute every (full) or every second (selective) layer in backward",
    )
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile each stage's layers")
    g.add_argument(
        "--device", choices=("cpu", "cuda"), help="cpu (gloo, one thread per worker) or cuda (nccl, one GPU per worker)"
    )
    g = parser.add_argument_group("optimization")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument(
        "--batch-size",
        type=int,
        help=f"sequences per pipeline step, over all data-parallel ranks (default {d['batch_size']})",
    )
    g.add_argument("--grad-accum", type=int, metavar="N", help="pipeline steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {d['lr']})")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up (default constant)")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (default 0)")
    g.add_argument("--min-lr", type=float, help="where linear, cosine and wsd end (default 0)")
    g.add_argument("--decay-steps", type=int, metavar="N", help="wsd: steps of the final decay (default 20%% of them)")
    g.add_argument("--betas", type=_betas, metavar="B1,B2", help="AdamW betas (default 0.9,0.999)")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']})")
    g.add_argument("--max-grad-norm", type=float, metavar="X", help="clip the global gradient norm to X")
    g.add_argument("--seed", type=int, help="seed of the built-in model's init and of the data order (default 0)")
    g = parser.add_argument_group("output")
    g.add_argument("--log-every", type=int, metavar="N", help="metrics every N steps (default: about 10 lines a run)")
    g.add_argument("--metrics", metavar="FILE", help="metrics as JSON lines (default: SAVE/metrics.jsonl with --save)")
    g.add_argument(
        "--tensorboard", metavar="DIR", help="TensorBoard logs, if installed (default: SAVE/tensorboard with --save)"
    )
    g.add_argument("--peak-tflops", type=float, metavar="T", help="peak TFLOP/s of one device, for MFU")
    g.add_argument(
        "--save",
        metavar="DIR",
        help="save DIR/model (a Hugging Face checkpoint) and DIR/state (model, optimizer and step, for --resume) "
        "at the end, and every --save-every steps",
    )
    g.add_argument("--save-every", type=int, metavar="N", help="also save every N steps")
    g.add_argument(
        "--resume",
        metavar="DIR",
        help="continue a run saved with --save DIR up to --steps, with any --pp or --schedule "
        "(the model comes from DIR/model unless --model is given)",
    )
    g.add_argument(
        "--stop-at",
        type=int,
        metavar="N",
        help="stop after step N, as if interrupted (saving with --save); --resume continues the same run, "
        "learning-rate schedule included, up to --steps",
    )
    g = parser.add_argument_group("several machines")
    g.add_argument("--nnodes", type=int, help="machines, each running this command (default 1)")
    g.add_argument("--node-rank", type=int, help="this machine's rank, 0..nnodes-1 (default: assigned at rendezvous)")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="where the machines meet (node 0's address)")


def _option_actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {a.dest: a for a in parser._actions}


def _config_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    where = f"--config {path!r}: {key!r}"
    if action.type is _betas:
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            return float(value[0]), float(value[1])
        if isinstance(value, str):
            return _betas(value)
        raise ValueError(f"{where} must be two numbers ([0.9, 0.95]), got {value!r}")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    expected = {int: "an integer", float: "a number"}.get(action.type, "a string")
    good = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(action.type, isinstance(value, str))
    if not good:
        raise ValueError(f"{where} must be {expected}, got {value!r}")
    if action.choices and value not in action.choices:
        raise ValueError(f"{where} is {value!r}; choose from {', '.join(map(str, action.choices))}")
    return float(value) if action.type is float else value


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """The options in force: each from the command line, else the ``--config`` file, else :data:`DEFAULTS`.

    Raises:
        ValueError: the config file is missing, not TOML, names an unknown option or gives one a
            value of the wrong kind.
    """
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    from_file: dict[str, Any] = {}
    if given.get("config"):
        path = given["config"]
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(
                "--config needs Python 3.11 or later (tomllib); pass the options on the command line"
            ) from None
        try:
            with open(path, "rb") as file:
                table = tomllib.load(file)
        except FileNotFoundError:
            raise ValueError(f"--config {path!r}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {path!r} is not TOML: {exc}") from None
        actions = _option_actions()
        for key, value in table.items():
            dest = key.replace("-", "_")
            if dest not in DEFAULTS or dest == "config":
                known = ", ".join(k.replace("_", "-") for k in DEFAULTS if k != "config")
                raise ValueError(f"--config {path!r}: unknown option {key!r}; options: {known}")
            from_file[dest] = _config_value(path, key, value, actions[dest])
    extra = {k: v for k, v in vars(args).items() if k not in DEFAULTS}
    return argparse.Namespace(**{**DEFAULTS, **from_file, **given, **extra})


def check_options(args: argparse.Namespace) -> None:
    """Every option on its own and against the others, before anything is built or started."""
    from ppzoo.data import check_data_source

    positive = ("pp", "dp_shard", "dp_replicate", "tp", "microbatches", "steps", "seq_len", "batch_size")
    positive += ("grad_accum", "nnodes")
    for name in positive:
        _at_least(name, getattr(args, name), 1)
    for name in ("log_every", "eval_every", "save_every", "stop_at", "sample_every", "sample_tokens"):
        if getattr(args, name) is not None:
            _at_least(name, getattr(args, name), 1)
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (a token and the one it predicts), got {args.seq_len}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    for name in ("max_grad_norm", "peak_tflops"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{_flag(name)} must be a positive number, got {value}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise ValueError(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
    if not all(0 <= beta < 1 for beta in args.betas):
        raise ValueError(f"--betas must both be in [0, 1), got {','.join(map(str, args.betas))}; e.g. --betas 0.9,0.95")
    LRSchedule(
        args.lr_schedule,
        lr=args.lr,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        min_lr=args.min_lr,
        decay_steps=args.decay_steps,
    )
    dp = args.dp_shard * args.dp_replicate
    if args.batch_size % (args.microbatches * dp):
        per = f"--microbatches {args.microbatches}" + (f" x {dp} data-parallel ranks" if dp > 1 else "")
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by {per}; "
            f"use a batch size that is a multiple of {args.microbatches * dp}"
        )
    _check_launch(args)
    _check_pipeline_flags(args)
    if args.sample_every is not None and not args.sample_prompt:
        raise ValueError(f"--sample-every {args.sample_every} needs --sample-prompt, the text to complete")
    if args.sample_every is not None and args.dp_shard * args.tp > 1:
        raise ValueError("--sample-every generates with whole stages on each rank; it needs --dp-shard 1 and --tp 1")
    if args.eval_every is not None and args.eval_data is None:
        raise ValueError(f"--eval-every {args.eval_every} needs --eval-data, the held-out data to evaluate on")
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None:
            check_data_source(path, flag)
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
    for name in ("metrics", "tensorboard"):
        if getattr(args, name) is not None:
            _check_writable(_flag(name), Path(getattr(args, name)), is_file=name == "metrics")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{_flag(name)} must be >= {low}, got {value}")


def _check_launch(args: argparse.Namespace) -> None:
    world = args.pp * args.dp_shard * args.dp_replicate * args.tp
    if world % args.nnodes:
        raise ValueError(
            f"pp x dp-shard x dp-replicate x tp = {world} processes do not split evenly over --nnodes {args.nnodes}; "
            "change the degrees or the number of machines"
        )
    if args.nnodes > 1:
        host, _, port = (args.rdzv_endpoint or "").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free port), "
                f"got {args.rdzv_endpoint!r}"
            )
        if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
            raise ValueError(f"--node-rank must be in 0..{args.nnodes - 1}, got {args.node_rank}")
    elif args.node_rank not in (None, 0) or args.rdzv_endpoint is not None:
        raise ValueError("--node-rank and --rdzv-endpoint are for several machines; pass --nnodes too")
    if args.device == "cuda":
        per_node = world // args.nnodes
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu")
        if torch.cuda.device_count() < per_node:
            raise ValueError(
                f"{per_node} processes a machine need {per_node} GPUs, torch sees {torch.cuda.device_count()}; "
                "lower the degrees or add machines"
            )


def _check_pipeline_flags(args: argparse.Namespace) -> None:
    # NOTE: the pipeline's own parsers, so the trainer refuses exactly what ppzoo.pipeline would.
    from ppzoo.dtypes import parse_dtype

    if args.mixed_precision is not None:
        from ppzoo.precision import parse_mixed_precision

        try:
            parse_mixed_precision(args.mixed_precision, dtype=parse_dtype(args.dtype))
        except ValueError as exc:
            raise ValueError(f"--mixed-precision {args.mixed_precision} with --dtype {args.dtype}: {exc}") from None
    if args.activation_checkpointing is not None:
        from ppzoo.parallelize import parse_activation_checkpointing

        try:
            parse_activation_checkpointing(args.activation_checkpointing)
        except ValueError as exc:
            raise ValueError(f"--activation-checkpointing: {exc}") from None


def _check_writable(flag: str, path: Path, *, is_file: bool) -> None:
    if is_file and path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; pass a file name")
    if not is_file and path.is_file():
        raise ValueError(f"{flag} {str(path)!r} is a file; pass a directory")
    existing = path.parent if is_file else path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} lies under the file {str(existing)!r}; pick another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} is not writable; pick a directory you can write to")


def _check_checkpoint_options(args: argparse.Namespace) -> None:
    from ppzoo.checkpoint import saved_step

    if args.stop_at is not None and args.stop_at >= args.steps:
        raise ValueError(
            f"--stop-at {args.stop_at} is not before the last step (--steps {args.steps}); drop it, or stop earlier"
        )
    if args.save_every is not None and args.save is None:
        raise ValueError(f"--save-every {args.save_every} needs --save DIR, the directory to save into")
    if args.save is not None:
        save = Path(args.save)
        if save.is_file():
            raise ValueError(f"--save {args.save!r} is a file; pass a directory (it gets model/ and state/)")
        _check_writable("--save", save, is_file=False)
        model, state = save / "model", save / "state"
        if model.exists() and not (model / "config.json").is_file():
            raise ValueError(
                f"--save {args.save!r}: {str(model)!r} exists and is not a model checkpoint (no config.json), and "
                "saving would replace it; move it away or pick another --save directory"
            )
        if state.exists():
            try:
                saved_step(state)
            except Exception as exc:  # noqa: BLE001 - reported with the option it came from
                raise ValueError(
                    f"--save {args.save!r}: {str(state)!r} exists and is not a ppzoo training state ({exc}), and "
                    "saving would replace it; move it away or pick another --save directory"
                ) from exc
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
        if args.stop_at is not None and step >= args.stop_at:
            raise ValueError(
                f"--resume {args.resume!r} is at step {step}, past --stop-at {args.stop_at}; raise --stop-at"
            )
        if step >= args.steps:
            raise ValueError(
                f"--resume {args.resume!r} is at step {step}, --steps is {args.steps}; "
                f"raise --steps above {step} to train further"
            )


def check_model(model: str, args: argparse.Namespace) -> tuple[Any, Path, Any]:
    """The model's config, local directory and plan, once the plan, microbatches and length suit it."""
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
        dp_shard=args.dp_shard,
        dp_replicate=args.dp_replicate,
        tp=args.tp,
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
    return config, local_dir, the_plan
