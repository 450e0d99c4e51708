"""Dropout that does not depend on the split: every layer draws from a random stream of its own.

A pipeline runs each decoder layer on some rank, in some order of microbatches that the schedule
decides. If dropout drew from the process's global generator, its masks would depend on that
placement and order, and no split would equal another, or the unsplit model. ppzoo therefore
gives each piece of the model its own stream, seeded from ``(seed, piece, count)``:

- ``piece`` is the decoder layer's index, or :data:`ROOT` for everything the model does outside
  its layers (embedding dropout, a dropout before the head), which runs in the stage module's
  own forward;
- ``count`` is how many training forwards that piece has run: the microbatch index within a step,
  continued across steps (each step runs every piece once per microbatch, in microbatch order, in
  every torch schedule);
- ``seed`` is a base seed all ranks agree on: the one given, else ``torch.initial_seed()`` (the
  value of the last ``torch.manual_seed``) read as the stage's forward starts, so seeding every
  rank alike before a step fixes the step's masks.

A forward pre-hook forks the random state (``torch.random.fork_rng``) and seeds it; a forward
hook that runs even when the forward raises restores it. So masks are independent of which rank
runs a layer, of the schedule and of the number of stages, and the global random state is left
as it was. The unsplit reference is the Hugging Face model with the same hooks
(:func:`key_dropout` on all its layers), run microbatch by microbatch.

A stage whose training forward draws no random number needs no stream: :func:`draws_at_random`
says whether it may (a dropout module with ``p > 0``, or a nonzero config or module field named
like a dropout, layer drop or noise), and :func:`ppzoo.stage.build_stage` keys a stage only when
it may, so a model without dropout pays for no hook, fork or reseeding on any microbatch. Without
a draw, a forked and reseeded forward computes what a plain one does and leaves the global random
state as it was: the outputs are the same either way, and so are the other stages' masks, since
each piece's stream depends only on its own key. A stage keyed that way is decided once, when it
is built; turning dropout on afterwards needs :func:`key_dropout` called on it.

In eval mode (``module.training`` False) nothing is seeded or counted. A forward on the meta
device (shape inference) is not counted either. A forward run again during the backward
(activation checkpointing recomputes a layer) is seeded with the key of the forward it repeats:
microbatches are recomputed in the order they ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ppzoo.layout import Layout

__all__ = ["LAYER_DROP", "RANDOM_FIELDS", "ROOT", "DropoutStreams", "draws_at_random", "key_dropout", "stream_seed"]

#: the piece index of what a stage module does outside its decoder layers
ROOT = -1
#: config fields that skip whole layers at random (LayerDrop), rather than drop activations; the
#: decision is drawn in the base model's layer loop, and a skipped first or last layer of a stage
#: would skip the stage's entry or exit
LAYER_DROP = ("layerdrop", "layer_drop", "encoder_layerdrop", "decoder_layerdrop")
#: words in the names of config and module fields that turn on a random draw in the training
#: forward: dropout probabilities (``attention_dropout``, GPT-2's ``resid_pdrop``), layer drop and
#: drop path, router jitter (Mixtral's ``router_jitter_noise``, DBRX's ``moe_jitter_eps``), masking
#: probabilities
RANDOM_FIELDS = ("drop", "jitter", "noise", "prob")
#: forwards whose key a recomputation may still ask for (more than any step has microbatches)
_PENDING = 4096


def stream_seed(seed: int, piece: int, count: int) -> int:
    """The seed of ``piece``'s stream for its ``count``-th training forward (63 bits)."""
    digest = hashlib.blake2b(struct.pack("<Qqq", seed & (2**64 - 1), piece, count), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _turns_on(name: Any, value: Any) -> bool:
    """Whether a field ``name = value`` may turn a random draw on: a nonzero number (or True) named like one."""
    if isinstance(value, bool):
        on = value
    elif isinstance(value, (int, float)):
        on = value != 0
    else:
        return False
    # NOTE: str(): a config's tables may have keys that are not names (Aria's patch counts)
    return on and any(word in str(name).lower() for word in RANDOM_FIELDS)


def _random_fields(fields: dict, prefix: str = "") -> list[str]:
    found = []
    for name, value in fields.items():
        if isinstance(value, dict):
            found += _random_fields(value, f"{prefix}{name}.")
        elif _turns_on(name, value):
            found.append(f"{prefix}{name}")
    return found


def draws_at_random(model: nn.Module, config: Any = None) -> bool:
    """Whether a training forward of ``model`` may draw random numbers, so that its dropout needs streams.

    It may when a dropout module of ``model`` has ``p > 0``, when a module carries a nonzero field
    named like :data:`RANDOM_FIELDS` (attention modules keep ``attention_dropout`` as a float, MoE
    blocks ``jitter_noise``), or when ``config`` (sub-configs included) has such a field, whichever
    module reads it. False means: no dropout of any kind, so a forward with streams and one without
    compute the same thing.

    Args:
        model: a stage, or the whole model.
        config: the model config; None to look at the modules only.
    """
    if config is not None:
        fields = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        if _random_fields(fields):
            return True
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if any(_turns_on(name, value) for name, value in vars(module).items() if not name.startswith("_")):
            return True
    return False


def _device(module: nn.Module, args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    held = next(module.parameters(), None)
    return held.device if held is not None else None


def _seed(device: torch.device, value: int) -> None:
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(value)
    elif device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(value)


class _Stream:
    """One piece's stream: its count of training forwards, and the random states it forked."""

    def __init__(self, owner: DropoutStreams, piece: int):
        self.owner, self.piece, self.count = owner, piece, 0
        self.pending: deque[tuple[int, int]] = deque(maxlen=_PENDING)
        self.forks: list[contextlib.ExitStack | None] = []

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        device = _device(module, args, kwargs)
        if not module.training or device is None or device.type == "meta":
            self.forks.append(None)
            return
        if torch._C._current_graph_task_id() != -1 and self.pending:
            seed, count = self.pending.popleft()  # NOTE: a recomputation in the backward repeats this forward
        else:
            seed, count = self.owner.base(root=self.piece == ROOT), self.count
            self.count += 1
            self.pending.append((seed, count))
        fork = contextlib.ExitStack()
        accelerator = [] if device.type == "cpu" else [device]
        fork.enter_context(torch.random.fork_rng(devices=accelerator, device_type=device.type))
        _seed(device, stream_seed(seed, self.piece, count))
        self.forks.append(fork)

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        fork = self.forks.pop() if self.forks else None
        if fork is not None:
            fork.close()
        if self.piece == ROOT and not self.forks:
            self.owner.current = None


class DropoutStreams:
    """The streams :func:`key_dropout` installed on a module; :meth:`remove` takes them off.

    Attributes:
        seed: the fixed base seed, or None to read ``torch.initial_seed()`` as each forward starts.
        current: the base seed of the forward under way (its layers use the root's).
    """

    def __init__(self, seed: int | None):
        self.seed = seed
        self.current: int | None = None
        self.streams: dict[int, _Stream] = {}
        self._handles: list[Any] = []

    def base(self, *, root: bool) -> int:
        # NOTE: read before any fork: inside one, torch.initial_seed() is a stream's seed
        if root or self.current is None:
            value = self.seed if self.seed is not None else torch.initial_seed()
            if root:
                self.current = value
            return value
        return self.current

    def _attach(self, module: nn.Module, piece: int) -> None:
        stream = self.streams[piece] = _Stream(self, piece)
        self._handles.append(module.register_forward_pre_hook(stream.enter, with_kwargs=True))
        self._handles.append(module.register_forward_hook(stream.leave, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def key_dropout(model: nn.Module, layout: Layout, layers: Iterable[int], *, seed: int | None = None) -> DropoutStreams:
    """Give ``model`` (a stage, or the whole Hugging Face model) and its ``layers`` their own streams.

    Args:
        model: the module a stage (or the unsplit reference) is called through.
        layout: the model's layout (where layer ``i`` lives).
        layers: the indices of the decoder layers ``model`` holds.
        seed: the base seed; default ``torch.initial_seed()`` as each forward starts, which every
            rank shares when each called ``torch.manual_seed`` with the same value.

    Returns:
        The installed streams (also kept as ``model.ppzoo_dropout``).
    """
    streams = DropoutStreams(None if seed is None else int(seed))
    # NOTE: the root's hooks go on first, so its fork encloses the layers' forks
    streams._attach(model, ROOT)
    for index in layers:
        streams._attach(model.get_submodule(layout.layer(index)), index)
    previous = getattr(model, "ppzoo_dropout", None)
    if previous is not None:
        previous.remove()
    model.ppzoo_dropout = streams
    return streams
