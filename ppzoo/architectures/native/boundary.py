"""What crosses a native stage boundary: the hidden states, and what later layers read besides them.

Most models hand only the hidden states ``(batch, seq, hidden)`` from layer to layer. Some give
their layers more, computed once before the first layer or handed from one layer to a later one:

- Gemma 3n and Gemma 4 give each layer its own slice of *per-layer inputs*, computed from the
  token ids and the embeddings (``per_layer_input``); Zamba gives its hybrid layers the
  embeddings (``original_hidden_states``);
- Gemma 3n and Gemma 4 layers past ``num_kv_shared_layers`` reuse the keys and values an
  earlier layer stored in a ``KVSharingDict``;
- Gemma 3n's AltUp hidden states are ``(altup_num_inputs, batch, seq, hidden)``.

Such values are *carried*: a stage's output is one tensor ``(batch, seq, width)``, the hidden
states and every carried value each moved to batch-and-sequence-first and flattened, concatenated
along the last dimension. The first stage computes the values (Hugging Face's own code); a later
stage unpacks them and gives each to the layer that reads it, and passes them on. Autograd sees
plain reshapes and a concatenation, so each value's gradient flows back to the stage that
computed it: exact, with nothing recomputed and no parameter copied to another stage. The
width is the same for every boundary (:attr:`Boundary.width`); a value no stage has computed yet
travels as zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ppzoo.architectures.native.trace import IDS, TRACE_BATCH, TRACE_SEQ, layer_tag, unit_tag
from ppzoo.validation import Problem

__all__ = ["Boundary", "Packing", "Slot", "plan_boundary"]


@dataclass(frozen=True)
class Packing:
    """Where a tensor's batch and sequence dimensions are, and the sizes of the others, in order."""

    batch: int
    seq: int
    rest: tuple[int, ...]

    @property
    def width(self) -> int:
        return math.prod(self.rest)

    @property
    def plain(self) -> bool:
        return (self.batch, self.seq) == (0, 1) and len(self.rest) <= 1

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.movedim((self.batch, self.seq), (0, 1))
        return moved.reshape(*moved.shape[:2], self.width)

    def unpack(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(*flat.shape[:2], *self.rest).movedim((0, 1), (self.batch, self.seq))


@dataclass(frozen=True)
class Slot:
    """One carried value.

    Attributes:
        kind: ``"argument"``: a layer argument computed before the first layer (``uses`` lists
            ``(layer, argument name, position or None)``, one entry per layer given the same tensor);
            ``"state"``: element ``element`` of entry ``key`` of the dict-like argument ``name``
            (``since``: the first layer called with the entry present).
    """

    kind: str
    name: str
    packing: Packing
    uses: tuple[tuple[int, str, int | None], ...] = ()
    key: Any = None
    element: int = 0
    since: int = 0


@dataclass(frozen=True)
class Boundary:
    """The hidden states' packing and the carried values, in the order they are concatenated."""

    hidden: Packing
    slots: tuple[Slot, ...] = ()

    @property
    def carries(self) -> bool:
        """Whether a boundary holds more than plain ``(batch, seq, hidden)`` hidden states."""
        return bool(self.slots) or not self.hidden.plain

    @property
    def width(self) -> int:
        return self.hidden.width + sum(s.packing.width for s in self.slots)

    def pack(self, hidden: torch.Tensor, values: list[torch.Tensor | None]) -> torch.Tensor:
        parts = [self.hidden.pack(hidden)]
        batch, seq = parts[0].shape[:2]
        for slot, value in zip(self.slots, values, strict=True):
            if value is None:
                parts.append(hidden.new_zeros(batch, seq, slot.packing.width))
            else:
                parts.append(slot.packing.pack(value).to(hidden.dtype))
        return torch.cat(parts, dim=-1)

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sizes = [self.hidden.width, *(s.packing.width for s in self.slots)]
        parts = flat.split(sizes, dim=-1)
        values = [slot.packing.unpack(part) for slot, part in zip(self.slots, parts[1:], strict=True)]
        return self.hidden.unpack(parts[0]), values


def _packing(shape: tuple[int, ...]) -> Packing | None:
    """The packing of a traced tensor (batch ``TRACE_BATCH``, sequence ``TRACE_SEQ``), or None when
    its batch and sequence dimensions cannot be told apart from the others."""
    batch = [j for j, n in enumerate(shape) if n == TRACE_BATCH]
    seq = [j for j, n in enumerate(shape) if n == TRACE_SEQ]
    if len(batch) != 1 or len(seq) != 1:
        return None
    rest = tuple(n for j, n in enumerate(shape) if j not in (batch[0], seq[0]))
    return Packing(batch[0], seq[0], rest)


def _origins(tags) -> str:
    def one(tag: str) -> str:
        if tag == IDS:
            return "the token ids"
        what, _, name = tag.partition(":")
        return f"layer {name}" if what == "layer" else f"module {name!r}"

    return ", ".join(one(t) for t in sorted(tags))


def plan_boundary(seen, inputs: list[str], n: int, kind: str) -> Boundary | list[Problem]:
    """The boundary of a traced model (:class:`~ppzoo.architectures.native.trace.Observed`), or the
    problems with what its layers receive besides the previous layer's hidden states."""
    computed_first = {IDS} | {unit_tag(f) for f in inputs}
    problems: list[Problem] = []
    for i in range(n):
        allowed = computed_first if i == 0 else {layer_tag(i - 1)}
        stray = sorted(seen.hidden_tags.get(i, frozenset()) - allowed)
        if stray:
            problems.append(
                Problem(
                    "native-layer-input",
                    f"{kind}: the hidden states decoder layer {i} receives also come from {_origins(stray)}, "
                    "and only the previous layer's output crosses a stage boundary",
                )
            )
            return problems
    hidden = seen.hidden_shape
    packing = _packing(hidden[0]) if hidden else None
    if packing is None:
        return [
            Problem(
                "native-layer-input",
                f"{kind}: the hidden states decoder layer 0 receives have shape {hidden and hidden[0]}, "
                "in which ppzoo cannot tell the batch and sequence dimensions apart",
            )
        ]
    dtype = hidden[1]
    arguments: dict[int, Slot] = {}
    states: dict[tuple[str, Any, int], Slot] = {}
    for i in range(n):
        earlier = computed_first | {layer_tag(j) for j in range(i)}
        for arg, tags in seen.other_tags.get(i, {}).items():
            entries = seen.states.get(i, {}).get(arg)
            if entries is not None:
                for key, (entry_tags, shapes) in entries.items():
                    if (i, arg, key) not in seen.state_reads:
                        continue  # NOTE: stored for readers outside the model (an assistant model)
                    why = _unfit(entry_tags, earlier, shapes, dtype)
                    if why:
                        problems.append(_problem(kind, i, f"{arg}[{key!r}]", entry_tags, why))
                        continue
                    # NOTE: the entry is there from the layer after the one that stored it
                    since = min(j for j in range(i + 1) if key in seen.states.get(j, {}).get(arg, {}))
                    for element, (shape, _) in enumerate(shapes):
                        states.setdefault(
                            (arg, key, element),
                            Slot("state", arg, _packing(shape), key=key, element=element, since=since),
                        )
                continue
            traced = seen.arguments.get(i, {}).get(arg)
            why = "it is not a tensor" if traced is None else _unfit(tags, computed_first, [traced[1:3]], dtype)
            if why:
                problems.append(_problem(kind, i, arg, tags, why))
                continue
            position, shape, _, identity = traced
            slot = arguments.get(identity) or Slot("argument", arg, _packing(shape))
            arguments[identity] = Slot("argument", slot.name, slot.packing, uses=(*slot.uses, (i, arg, position)))
        if problems:
            return problems
    return Boundary(packing, (*arguments.values(), *states.values()))


def _unfit(tags, allowed, shapes, dtype) -> str | None:
    """Why values with ``tags`` and ``shapes`` cannot be carried, or None."""
    if not tags <= allowed:
        if any(t.startswith("layer:") for t in tags - allowed):
            return (
                "a layer's output other than the hidden states, which crosses a boundary only through a KVSharingDict"
            )
        return "a later stage does not have its origin"
    for shape, value_dtype in shapes:
        if value_dtype != dtype:
            return f"a {value_dtype} tensor, while the hidden states are {dtype}"
        if _packing(shape) is None:
            return f"a tensor of shape {shape} without one batch and one sequence dimension"
    return None


def _problem(kind: str, layer: int, arg: str, tags, why: str) -> Problem:
    return Problem(
        "native-layer-input",
        f"{kind}: decoder layer {layer}'s argument {arg!r} is computed from {_origins(tags)}, and ppzoo "
        f"cannot carry it across a stage boundary ({why})",
    )
