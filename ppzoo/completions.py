"""``ppzoo generate``: completions of prompts from a pipelined checkpoint, streamed on rank 0.

The command starts one worker per pipeline rank through torch's elastic launcher (as
``ppzoo train`` does), or runs in place when it already runs under ``torchrun``. Every worker
loads the checkpoint's tokenizer, renders each prompt with its chat template (when it has one and
``--no-chat`` is not given), left-pads the batch and calls :meth:`ppzoo.Pipeline.generate`. Rank 0
prints: one prompt's completion token by token as it comes; with several prompts, each completion
as its row ends, on a line of its own that starts with the prompt's index (``[2] ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GenerateJob", "add_arguments", "generate_worker", "main", "read_prompts"]


@dataclass(frozen=True)
class GenerateJob:
    """What every worker needs: the model, the prompts and the generation settings."""

    model: str
    prompts: tuple[Any, ...]
    pp: int = 1
    schedule: str = "1F1B"
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    chat: bool = True
    device: str | None = None
    dtype: str = "float32"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (with its tokenizer files) or hub id")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree: worker processes (default 1)")
    p.add_argument("--schedule", default="1F1B", help="schedule the pipeline is built with (placement; default 1F1B)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE.jsonl",
        help='prompts, one JSON value a line: a string, {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]}',
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most per prompt (default 64)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's generation config (or 50)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--no-chat", action="store_true", help="tokenize prompts as they are, without the chat template")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--dtype", default="float32", help="parameter dtype (default float32)")


def read_prompts(prompts: list[str], path: str | None) -> list[Any]:
    """The prompts of ``--prompt`` and of the ``--prompts`` file: strings, or chat message lists.

    Raises:
        ValueError: no prompt at all, or a line of the file that is not one of the accepted forms.
    """
    found: list[Any] = list(prompts)
    if path is not None:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not JSON ({exc.msg})") from None
            if isinstance(value, dict) and isinstance(value.get("prompt"), str):
                value = value["prompt"]
            elif isinstance(value, dict) and isinstance(value.get("messages"), list):
                value = value["messages"]
            if not isinstance(value, (str, list)):
                raise ValueError(
                    f'{path}:{number} holds {line.strip()[:60]!r}; write a string, {{"prompt": "..."}} or {{"messages": [...]}}'
                )
            found.append(value)
    if not found:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    return found


def encode(tokenizer: Any, prompts: list[Any], *, chat: bool):
    """``(input_ids, attention_mask)``: the prompts rendered (chat template) and left-padded."""
    import torch

    rows = []
    for prompt in prompts:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif isinstance(prompt, list):
            raise ValueError("a prompt of chat messages needs a tokenizer with a chat template (and no --no-chat)")
        else:
            rows.append(tokenizer(prompt)["input_ids"])
    if any(not row for row in rows):
        raise ValueError("a prompt tokenizes to no token at all")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return ids, mask


class _Printer:
    """Rank 0's output: one prompt token by token; several as each row ends."""

    def __init__(self, tokenizer: Any, count: int, *, eos: set[int], max_new_tokens: int, out=sys.stdout):
        self.tokenizer, self.eos, self.max_new_tokens, self.out = tokenizer, eos, max_new_tokens, out
        self.new: list[list[int]] = [[] for _ in range(count)]
        self.shown = [""] * count

    def __call__(self, rows, tokens) -> None:
        for row, token in zip(rows.tolist(), tokens.tolist()):
            ended = token in self.eos
            if not ended:
                self.new[row].append(token)
            if len(self.new) == 1:
                self.stream()
            elif ended or len(self.new[row]) >= self.max_new_tokens:
                self.out.write(f"[{row}] {self.text(row)}\n")
                self.out.flush()

    def stream(self, *, end: bool = False) -> None:
        """Print what the one row's text gained; hold back a character whose bytes are still coming."""
        text = self.text(0)
        if not end and text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown[0]) :] + ("\n" if end else ""))
        self.out.flush()
        self.shown[0] = text

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.new[row], skip_special_tokens=True)


def generate_worker(job: GenerateJob) -> list[str] | None:
    """One rank: build the pipeline, encode the prompts, generate; rank 0 prints and returns the completions."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import ppzoo

    pipe = ppzoo.pipeline(job.model, pp=job.pp, schedule=job.schedule, device=job.device, dtype=job.dtype)
    tokenizer = AutoTokenizer.from_pretrained(pipe.source)
    ids, mask = encode(tokenizer, list(job.prompts), chat=job.chat)
    printer = None
    if dist.get_rank() == 0:
        eos = pipe.config.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
        eos_set = set(eos if isinstance(eos, list) else [eos]) - {None}
        printer = _Printer(tokenizer, len(job.prompts), eos=eos_set, max_new_tokens=job.max_new_tokens)
    pipe.generate(
        ids,
        mask,
        max_new_tokens=job.max_new_tokens,
        do_sample=job.do_sample,
        temperature=job.temperature,
        top_k=job.top_k,
        top_p=job.top_p,
        eos_token_id=tokenizer.eos_token_id,
        seed=job.seed,
        on_tokens=printer,
    )
    if printer is None:
        return None
    if len(job.prompts) == 1:
        printer.stream(end=True)
    return [printer.text(row) for row in range(len(job.prompts))]


def main(args: argparse.Namespace) -> int:
    """Run ``ppzoo generate``; 0 on success, 1 when a worker failed (its error is printed).

    Raises:
        ValueError: bad options or prompts, before any worker starts.
    """
    for flag, value in (("--pp", args.pp), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    job = GenerateJob(
        model=args.model,
        prompts=tuple(read_prompts(args.prompt, args.prompts)),
        pp=args.pp,
        schedule=args.schedule,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
        device=args.device,
        dtype=args.dtype,
    )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        generate_worker(job)  # NOTE: already one of torchrun's workers
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=job.pp,
        max_restarts=0,
        start_method="spawn",
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
    )
    try:
        elastic_launch(config, generate_worker)(job)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        detail = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        print(f"ppzoo generate: error: worker rank {rank} failed (exit code {failure.exitcode})", file=sys.stderr)
        if detail:
            print(detail, file=sys.stderr)
        return 1
    return 0
