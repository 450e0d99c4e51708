"""Measured costs: each layer kind's and the head's forward + backward, timed once on the device.

The FLOP count of :mod:`ppzoo.cost` prices a matrix multiply by its size, so it misjudges what
runs below the device's peak: a 32k-vocabulary head and its loss on a 256-wide model cost 7.7
layers by FLOPs and 5.9 to 8.0 when timed on a shared 2-core CPU (docs/benchmarks.md §12). :func:`measure_costs` times them instead, on a copy
of the model cut to the few layers that show every kind of layer it has (the first layer of each
kind, at least two), built with random weights of the real widths on the device, in the dtype
the stages compute in, on one microbatch of ``microbatch_size × seq_len`` random tokens:

- hooks note the clock around each module's forward, and when the gradient of each layer's input
  and output arrives in the backward (a layer's backward is the time between the two);
- the input modules (embedding) and the output modules with the loss (final norm, head,
  cross-entropy) are timed alike, as the two ends of the model;
- one AdamW step over the copy's parameters gives the optimizer's seconds per parameter, which the
  split adds once per step to each stage (:func:`ppzoo.split.balanced_bounds`).

Every measurement is the shortest of ``repeats`` runs after two warm-up runs: what the module
costs when nothing else competes for the device, which a shared machine's load only lengthens.
On a CPU with one torch thread the clock is the thread's CPU time, which leaves out the time other
processes hold the core (at load 12 on 2 cores, wall-clock medians put the head at 5.9 to 7.5
layers from one run to the next, and wall-clock minima at 9.3).
Results are kept in memory and on disk (beside the plan cache, :mod:`ppzoo.plan_cache`) by
config, device, dtype, shape and thread count, so a device is measured once. Under several
ranks the measurement must be one rank's, shared with the others, or the ranks would plan
different splits: :func:`ppzoo.pipeline` lets global rank 0 measure and broadcasts the result.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ppzoo.layout import Layout

__all__ = ["COST_MODELS", "MeasuredCosts", "agreed_costs", "measure_costs"]

#: what ``cost=`` accepts by name: FLOP counts (:mod:`ppzoo.cost`) or times measured here
COST_MODELS = ("flops", "measured")


@dataclass(frozen=True)
class MeasuredCosts:
    """Seconds one microbatch spends in each module of a layout, and the optimizer's per parameter.

    Attributes:
        forward: seconds of each module's forward (``layout.modules`` order; the output modules
            include the loss; a unit's time is shared evenly by its modules).
        backward: seconds of each module's backward.
        optimizer_per_param: seconds of one AdamW step per parameter.
        device, dtype, seq_len, microbatch_size, threads: what was measured.
    """

    forward: dict[str, float]
    backward: dict[str, float]
    optimizer_per_param: float
    device: str
    dtype: str
    seq_len: int
    microbatch_size: int
    threads: int

    def unit_cost(self, fqn: str) -> float:
        """The module's cost in the simulation's unit: a third of its forward + backward.

        NOTE: :mod:`ppzoo.simulate` runs a stage's backward as two forwards, so a forward of a
        third of the measured sum gives the measured forward + backward per microbatch.
        """
        return (self.forward[fqn] + self.backward[fqn]) / 3.0

    def layers_per(self, fqns: tuple[str, ...], layer: str) -> float:
        """How many ``layer``'s forward + backward the modules ``fqns`` cost together."""
        return sum(self.forward[m] + self.backward[m] for m in fqns) / (self.forward[layer] + self.backward[layer])


_MEMORY: dict[str, MeasuredCosts] = {}


def measure_costs(
    config: Any,
    adapter: Any,
    model: torch.nn.Module,
    layout: Layout,
    *,
    seq_len: int,
    microbatch_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 7,
    cache: bool = True,
) -> MeasuredCosts:
    """Time one microbatch's forward + backward of every kind of layer, the inputs and the head.

    Args:
        config: the model's config.
        adapter: its adapter (for the layer types).
        model: the model on the meta device (for layer kinds and parameter counts).
        layout: the model's layout.
        seq_len, microbatch_size: the microbatch measured.
        device, dtype: where and in what the stages compute.
        repeats: timed runs (after two warm-up runs); the shortest is kept.
        cache: reuse (and keep) a measurement of the same config, device, dtype and shape.

    Returns:
        The :class:`MeasuredCosts`.

    Raises:
        ValueError: the config cannot be built as a causal LM cut to a few layers.
    """
    device = torch.device(device)
    key = _key(config, device, dtype, seq_len, microbatch_size)
    if cache and key in _MEMORY:
        return _MEMORY[key]
    stored = _load(key) if cache else None
    if stored is None:
        stored = _measure(config, adapter, model, layout, seq_len, microbatch_size, device, dtype, repeats)
        if cache:
            _store(key, stored)
    if cache:
        _MEMORY[key] = stored
    return stored


def _kinds(config: Any, adapter: Any, model: torch.nn.Module, layout: Layout) -> list[int]:
    """Each layer's kind, as the index of the first layer of that kind (type, class, parameter shapes)."""
    types_ = adapter.layer_types(config)
    first: dict[tuple, int] = {}
    out = []
    for i in range(layout.num_layers):
        module = model.get_submodule(layout.layer(i))
        key = (types_[i], type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))
        out.append(first.setdefault(key, i))
    return out


def _measure(
    config: Any,
    adapter: Any,
    model: torch.nn.Module,
    layout: Layout,
    seq_len: int,
    microbatch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> MeasuredCosts:
    from transformers import AutoModelForCausalLM

    kinds = _kinds(config, adapter, model, layout)
    count = min(layout.num_layers, max(2, max(kinds) + 1))
    cut = copy.deepcopy(config)
    text = adapter.text_config(cut)
    text.num_hidden_layers = count
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:count]
    try:
        with torch.device(device):
            small = AutoModelForCausalLM.from_config(cut, dtype=dtype)
        for fqn in (*layout.inputs, layout.layer(0), *layout.outputs):
            small.get_submodule(fqn)
    except Exception as exc:  # noqa: BLE001 - any build failure is the user's to read
        raise ValueError(
            f"cost='measured' builds model_type {getattr(config, 'model_type', None)!r} cut to {count} layers "
            f"with AutoModelForCausalLM, which failed ({type(exc).__name__}: {exc}); use cost='flops'"
        ) from exc
    small.train()
    vocab = int(text.vocab_size)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (microbatch_size, seq_len), generator=generator).to(device)
    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-6)
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # NOTE: one CPU thread computes everything in this thread (the autograd engine runs a CPU
    # graph's backward in the caller's thread too): its CPU time leaves out the time other
    # processes hold the core, which on a shared machine stretches wall time at random
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter

    def now() -> float:
        sync()
        return clock()

    marks: dict[str, float] = {}
    handles = []

    def mark(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            marks[name] = now()

        return hook

    def grad_mark(name: str) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            marks[name] = now()

        return hook

    for j, fqn in enumerate(layout.inputs):
        module = small.get_submodule(fqn)
        handles.append(module.register_forward_pre_hook(mark(f"in{j}>")))
        handles.append(module.register_forward_hook(mark(f"in{j}<")))
    for i in range(count):

        def before(module: Any, args: Any, kwargs: Any, i: int = i) -> None:
            marks[f"f{i}>"] = now()
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(grad_mark(f"b{i}<"))

        def after(module: Any, args: Any, output: Any, i: int = i) -> None:
            marks[f"f{i}<"] = now()
            out = output if isinstance(output, torch.Tensor) else output[0]
            out.register_hook(grad_mark(f"b{i}>"))

        layer = small.get_submodule(layout.layer(i))
        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after))

    runs: list[dict[str, float]] = []
    try:
        for run in range(2 + repeats):
            marks.clear()
            marks["start"] = now()
            loss = small(input_ids=ids, labels=ids, use_cache=False).loss
            marks["forward"] = now()
            loss.backward()
            marks["backward"] = now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks["optimizer"] = now()
            if run >= 2:
                runs.append(dict(marks))
    finally:
        for handle in handles:
            handle.remove()

    def shortest(fn: Callable[[dict[str, float]], float]) -> float:
        return max(0.0, min(fn(m) for m in runs))

    last = count - 1
    input_f = shortest(lambda m: sum(m[f"in{j}<"] - m[f"in{j}>"] for j in range(len(layout.inputs))))
    input_b = shortest(lambda m: m["backward"] - m["b0<"])
    head_f = shortest(lambda m: m["forward"] - m[f"f{last}<"])
    head_b = shortest(lambda m: m[f"b{last}>"] - m["forward"])
    layer_f = [shortest(lambda m, i=i: m[f"f{i}<"] - m[f"f{i}>"]) for i in range(count)]
    layer_b = [shortest(lambda m, i=i: m[f"b{i}<"] - m[f"b{i}>"]) for i in range(count)]
    params = sum(p.numel() for p in small.parameters())
    per_param = shortest(lambda m: m["optimizer"] - m["backward"]) / max(1, params)

    # NOTE: a layer costs the mean of the measured layers of its kind
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(kinds[i], []).append(i)
    forward: dict[str, float] = {}
    backward: dict[str, float] = {}
    for fqn in layout.inputs:
        forward[fqn], backward[fqn] = input_f / len(layout.inputs), input_b / len(layout.inputs)
    for i in range(layout.num_layers):
        same = members[kinds[i]]
        forward[layout.layer(i)] = statistics.fmean(layer_f[j] for j in same)
        backward[layout.layer(i)] = statistics.fmean(layer_b[j] for j in same)
    for fqn in layout.outputs:
        forward[fqn], backward[fqn] = head_f / len(layout.outputs), head_b / len(layout.outputs)
    return MeasuredCosts(
        forward=forward,
        backward=backward,
        optimizer_per_param=per_param,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        seq_len=seq_len,
        microbatch_size=microbatch_size,
        threads=torch.get_num_threads(),
    )


def agreed_costs(
    config: Any, adapter: Any, layout: Layout, *, seq_len: int, device: torch.device, dtype: torch.dtype
) -> MeasuredCosts:
    """Global rank 0's measurement on its device, given to every rank of the default process group.

    NOTE: every rank must split alike, and each rank's own clock would differ; the ranks that
    wait meanwhile leave the device (or the CPU cores) to the measurement.

    Raises:
        ValueError: rank 0 could not measure (on every rank, with rank 0's reason).
    """
    import torch.distributed as dist

    from ppzoo.meta import meta_model

    box: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box[0] = measure_costs(
                config, adapter, meta_model(config), layout, seq_len=seq_len, device=device, dtype=dtype
            )
        except Exception as exc:  # noqa: BLE001 - told to every rank below, then raised there
            box[0] = f"{type(exc).__name__}: {exc}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    if isinstance(box[0], str):
        raise ValueError(f"cost='measured': rank 0 could not time the model's layers ({box[0]})")
    return box[0]


# -- the cache ------------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _key(config: Any, device: torch.device, dtype: torch.dtype, seq_len: int, microbatch_size: int) -> str:
    try:
        text = config.to_json_string(use_diff=False)
    except Exception:  # noqa: BLE001 - an unserialisable config is keyed by its repr
        text = repr(config)
    from ppzoo.plan_cache import _version

    material = [
        text,
        device.type,
        _device_name(device),
        str(dtype),
        seq_len,
        microbatch_size,
        torch.get_num_threads(),
        _version("torch"),
        _version("transformers"),
    ]
    return hashlib.sha256(json.dumps(material, default=str).encode()).hexdigest()


def _path(key: str) -> str:
    from ppzoo.plan_cache import cache_dir

    return os.path.join(cache_dir().parent, "costs", f"{key}.json")


def _load(key: str) -> MeasuredCosts | None:
    try:
        with open(_path(key)) as f:
            return MeasuredCosts(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _store(key: str, costs: MeasuredCosts) -> None:
    path = _path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(costs), f)
        os.replace(tmp, path)
    except OSError:
        pass
