"""The conformance checks that run in one process: plain functions, one property each.

Every ``check_<property>(adapter)`` builds what it needs from ``adapter.tiny_config()`` (saved to a
temporary directory, never fetched from a hub), raises ``AssertionError`` listing every problem it
found, and returns None when the property holds. The distributed check lives in
:mod:`ppzoo.testing.step`; :mod:`ppzoo.testing.kit` decides which checks apply to an adapter.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ppzoo import registry
from ppzoo.adapter import Adapter
from ppzoo.capabilities import Capability
from ppzoo.checkpoint import Checkpoint
from ppzoo.dropout import key_dropout
from ppzoo.hookspecs import hookimpl
from ppzoo.loss import causal_lm_loss
from ppzoo.meta import meta_model
from ppzoo.planner import Plan, plan
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.exercised import exercised
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model
from ppzoo.validation import Problem, Settings

__all__ = [
    "SEQ_LEN",
    "check_buffers_after_meta_init",
    "check_generate",
    "check_layout",
    "check_plan",
    "check_stage_chain",
    "check_stage_reads",
    "check_tied_weights",
    "check_tiny_config",
    "check_validation",
    "packed_batch",
    "resolving_to",
]

#: sequence length of the kit's batches; a tiny sliding window must be shorter to be exercised
SEQ_LEN = 12
#: the base seed of the dropout streams of the stages and the reference the kit compares
DROPOUT_SEED = 1234
#: the tiny config must split into this many stages with two layers each (interleaved, pp=4)
MIN_LAYERS = 8
#: above this many parameters the matrix stops being fast on two CPU cores
MAX_TINY_PARAMS = 2_000_000
#: (pp, schedule, extra plan arguments) the plan check exercises: every placement kind
PLAN_CASES: tuple[tuple[int, str, dict], ...] = (
    (1, "1F1B", {}),
    (2, "GPipe", {}),
    (3, "1F1B", {}),
    (4, "1F1B", {}),
    (2, "Interleaved1F1B", {}),
    (4, "Interleaved1F1B", {}),
    (2, "ZBVZeroBubble", {}),
    (4, "DualPipeV", {}),
)


class _Claim:
    """A plugin that makes the registry resolve an adapter's configs to that very adapter."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    @hookimpl
    def ppzoo_adapter_for(self, config: Any) -> Adapter | None:
        archs = getattr(config, "architectures", None) or ()
        if self.adapter.matches(config) or any(a in self.adapter.architectures for a in archs):
            return self.adapter
        return None


@contextlib.contextmanager
def resolving_to(adapter: Adapter) -> Iterator[None]:
    """Make ``registry.adapter_for`` return ``adapter`` for its configs inside the block.

    The checks go through the real entry points (``ppzoo.plan``, ``ppzoo.pipeline``), which ask the
    registry; an adapter under test that is not the registered one (an instance built in a test,
    or one whose package is not installed) is claimed for the duration of the block.
    """
    try:
        current = registry.adapter_for(adapter.tiny_config())
    except registry.UnknownArchitectureError:
        current = None
    if current is adapter:
        yield
        return
    with registry.plugin(_Claim(adapter), name=f"ppzoo.testing claim for {adapter.name}"):
        yield


def _fail_if(problems: list[str], heading: str) -> None:
    if problems:
        raise AssertionError(heading + "".join(f"\n  - {p}" for p in problems))


@contextlib.contextmanager
def _tiny_checkpoint(adapter: Adapter, **kwargs: Any) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"ppzoo-{adapter.name}-") as tmp:
        yield save_tiny_model(adapter, tmp, **kwargs)


def _build_stages(adapter: Adapter, config: Any, the_plan: Plan, checkpoint_dir: os.PathLike, **kwargs: Any):
    return [
        build_stage(
            config, adapter, the_plan, i, checkpoint=Checkpoint(checkpoint_dir), attn_implementation="eager", **kwargs
        )
        for i in range(the_plan.num_stages)
    ]


def _owners(name: str, modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if name.startswith(m + ".")]


# -- tiny config -------------------------------------------------------------------------------
def check_tiny_config(adapter: Adapter) -> None:
    """The tiny config is small, has at least 8 layers (the kit splits it into up to 8 stages), and
    exercises every declared capability (and declares every one it exercises), so the checks each
    capability names test it."""
    config = adapter.tiny_config()
    problems = []
    layers = adapter.fqn_layout(config).num_layers
    if layers < MIN_LAYERS:
        problems.append(
            f"tiny_config() has {layers} layers; the kit splits it into up to 8 stages, give it >= {MIN_LAYERS}"
        )
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_TINY_PARAMS:
        problems.append(
            f"tiny_config() has {params:,} parameters; keep it under {MAX_TINY_PARAMS:,} (hidden 32-64, vocab ~100)"
        )
    declared = set(adapter.capabilities)
    for capability, used in exercised(adapter, config, model, seq_len=SEQ_LEN).items():
        if capability in declared and not used:
            problems.append(
                f"declares {capability.value!r} but tiny_config() does not exercise it, so no check would test it "
                f"(it needs: {capability.description})"
            )
        if used and capability not in declared:
            problems.append(
                f"tiny_config() exercises {capability.value!r}; add it to {type(adapter).__name__}.capabilities"
            )
    _fail_if(problems, f"adapter {adapter.name!r}: tiny config")


# -- layout ----------------------------------------------------------------------------------
def check_layout(adapter: Adapter) -> None:
    """``fqn_layout`` names existing modules and covers every parameter exactly once."""
    config = adapter.tiny_config()
    layout = adapter.fqn_layout(config)
    model = meta_model(config)
    problems = []
    for fqn in layout.inputs + layout.outputs + layout.shared + (layout.layers,):
        try:
            model.get_submodule(fqn)
        except AttributeError:
            problems.append(f"layout names module {fqn!r}, which the model does not have")
    _fail_if(problems, f"adapter {adapter.name!r}: layout")
    held = len(model.get_submodule(layout.layers))
    if held != layout.num_layers:
        problems.append(f"layout says {layout.num_layers} layers but {layout.layers!r} holds {held}")
    for name, _ in model.named_parameters(remove_duplicate=False):
        owners = _owners(name, layout.modules)
        if len(owners) != 1:
            problems.append(
                f"parameter {name!r} is in {len(owners)} layout modules {owners}; it must be in exactly one"
            )
    for fqn in layout.shared:
        names = [n for n, _ in model.get_submodule(fqn).named_parameters()]
        if names:
            problems.append(
                f"shared module {fqn!r} holds parameters {names}; every stage keeps a copy, so they would not be trained once"
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    layer_of = {layout.layer(i): i for i in range(layout.num_layers)}
    for copy_, source in adapter.tied_weights(config).items():
        missing = [(fqn, side) for fqn, side in ((copy_, "copy"), (source, "source")) if fqn not in params]
        problems += [f"tied {side} {fqn!r} is not a parameter of the model" for fqn, side in missing]
        if missing:
            continue
        # NOTE: a head tied to the embedding, or a block several layers share (a later layer's copy
        # of the first's); ppzoo.tied sums the gradients over the stages holding them
        layers = [next((layer_of[m] for m in _owners(fqn, tuple(layer_of))), None) for fqn in (copy_, source)]
        if None not in layers:
            if layers[0] <= layers[1]:
                problems.append(f"tied copy {copy_!r} must be in a later layer than its source {source!r}")
            continue
        for fqn, side, modules in ((copy_, "copy", layout.outputs), (source, "source", layout.inputs)):
            if not _owners(fqn, modules):
                problems.append(
                    f"tied {side} {fqn!r} must be in an {'output' if side == 'copy' else 'input'} module, "
                    "or both ends in layers"
                )
    _fail_if(problems, f"adapter {adapter.name!r}: layout")


# -- plan --------------------------------------------------------------------------------------
def _plan_problems(the_plan: Plan, adapter: Adapter, config: Any, model: torch.nn.Module, label: str) -> list[str]:
    layout = the_plan.layout
    problems = []
    order = [m for s in the_plan.stages for m in s.modules]
    if order != list(layout.modules):
        problems.append(f"{label}: stages do not hold every layout module once, in forward order: {order}")
    if [s.index for s in the_plan.stages] != list(range(the_plan.num_stages)):
        problems.append(f"{label}: stage indices are {[s.index for s in the_plan.stages]}")
    for s in the_plan.stages:
        want = tuple(int(m.rsplit(".", 1)[1]) for m in s.modules if m.startswith(layout.layers + "."))
        if s.layers != want:
            problems.append(f"{label}: stage {s.index} lists layers {s.layers}, its modules hold {want}")
        # NOTE: only the first stage may hold the input modules alone, only the last the outputs alone
        if not s.layers and 0 < s.index < the_plan.num_stages - 1:
            problems.append(f"{label}: middle stage {s.index} holds no layer: {s.modules}")
        numel = sum(p.numel() for m in s.modules for p in model.get_submodule(m).parameters())
        if s.params != numel:
            problems.append(f"{label}: stage {s.index} counts {s.params} parameters, its modules hold {numel}")
    if not set(layout.inputs) <= set(the_plan.stages[0].modules):
        problems.append(f"{label}: the first stage does not hold the inputs {layout.inputs}")
    if not set(layout.outputs) <= set(the_plan.stages[-1].modules):
        problems.append(f"{label}: the last stage does not hold the outputs {layout.outputs}")
    pp, n = the_plan.pp, the_plan.num_stages
    for s in the_plan.stages:
        want_rank = s.index % pp if the_plan.placement == "loop" else min(s.index, 2 * pp - 1 - s.index)
        if s.rank != want_rank:
            problems.append(
                f"{label}: stage {s.index} is on rank {s.rank}, {the_plan.placement} placement puts it on {want_rank}"
            )
    per_rank = [len(the_plan.stages_for_rank(r)) for r in range(pp)]
    if per_rank != [n // pp] * pp:
        problems.append(f"{label}: stages per rank are {per_rank}, expected {n // pp} each")
    unique = sum(p.numel() for p in model.parameters())
    if the_plan.total_params != unique:
        problems.append(f"{label}: total_params is {the_plan.total_params}, the model has {unique} (tied counted once)")
    return problems


def check_plan(adapter: Adapter) -> None:
    """Plans for every placement kind keep forward order, cover every module once, place stages
    where their schedule needs them, count parameters right, and round-trip through
    ``stage_modules`` and through a saved ``config.json``."""
    from transformers import AutoModelForCausalLM

    config = adapter.tiny_config()
    # NOTE: a real model, not ppzoo's meta build: Hugging Face ties its embeddings, so its
    # parameter count is the truth the plan's total must match.
    model = AutoModelForCausalLM.from_config(config)
    problems = []
    n_layers = adapter.fqn_layout(config).num_layers
    cases = PLAN_CASES + ((2, "1F1B", {"layers_per_stage": -(-n_layers // 2)}),)
    with resolving_to(adapter), tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        for pp, schedule, extra in cases:
            label = f"pp={pp} {schedule}" + "".join(f" {k}={v}" for k, v in extra.items())
            the_plan = plan(config, pp=pp, schedule=schedule, **extra)
            problems += _plan_problems(the_plan, adapter, config, model, label)
            explicit = plan(config, pp=pp, schedule=schedule, stage_modules=[s.modules for s in the_plan.stages])
            if explicit.stages != the_plan.stages:
                problems.append(f"{label}: the same split passed as stage_modules gives other stages")
            if plan(tmp, pp=pp, schedule=schedule, **extra).to_dict() != the_plan.to_dict():
                problems.append(f"{label}: the plan from the saved config.json differs from the plan from the config")
            if the_plan.placement == "v" and the_plan.stages[0].rank != the_plan.stages[-1].rank:
                problems.append(f"{label}: V placement must put the first and last stage on one rank")
    _fail_if(problems, f"adapter {adapter.name!r}: plan")


# -- per-stage reads ---------------------------------------------------------------------------
def _key_owners(adapter: Adapter, config: Any, keys: set[str]) -> dict[str, set[str]]:
    """``{checkpoint key: the parameter FQNs it converts to}``: by transformers' conversion rules;
    a key those rules turn into no parameter belongs to the parameters whose key map names it."""
    from ppzoo.checkpoint.conversion import loading_plan
    from ppzoo.checkpoint.tensors import persistent_tensors

    model = meta_model(config)
    fqns = [fqn for fqn, *_ in persistent_tensors(model)]
    converted = loading_plan(model, keys, fqns)
    owners: dict[str, set[str]] = {}
    for fqn, group in converted.items():
        for key in group.keys:
            owners.setdefault(key, set()).add(fqn)
    key_map = adapter.key_map(config)
    for fqn in fqns:
        mapped = key_map.sources(fqn, lambda k: k in converted or k in keys)
        for key in mapped if mapped != [fqn] else ():
            if key in keys and key not in owners:
                owners.setdefault(key, set()).add(fqn)
    return owners


def check_stage_reads(adapter: Adapter) -> None:
    """Each stage reads exactly its own tensors from a sharded checkpoint, each once, and opens
    only the shards that hold them; together the stages read every tensor (for ``moe``: per-expert
    keys, converted into the fused parameters). A checkpoint key belongs to the stages holding the
    parameters it converts to (transformers' conversion rules, or the adapter's key map)."""
    config = adapter.tiny_config()
    tied = adapter.tied_weights(config)
    problems = []
    renamed: set[str] = set()  # keys read that are no parameter's name: converted by the key map
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        everything = set(Checkpoint(directory).weight_map)
        owners = _key_owners(adapter, config, everything)
        made_of: dict[str, set[str]] = {}
        for key, fqns in owners.items():
            for fqn in fqns:
                made_of.setdefault(fqn, set()).add(key)
        for pp, schedule in ((2, "1F1B"), (4, "1F1B")):
            the_plan = plan(directory, pp=pp, schedule=schedule)
            read_by_any: set[str] = set()
            for stage in the_plan.stages:
                checkpoint = Checkpoint(directory)
                reads: list[str] = []
                whole, part = checkpoint._get_tensor, checkpoint._get_slice

                # NOTE: every read of the loader, whole tensor or part, passes one of these two
                def recording(handle, key, _reads=reads, _original=whole):
                    _reads.append(key)
                    return _original(handle, key)

                def recording_part(handle, key, where, _reads=reads, _original=part):
                    _reads.append(key)
                    return _original(handle, key, where)

                checkpoint._get_tensor, checkpoint._get_slice = recording, recording_part
                built = build_stage(
                    config, adapter, the_plan, stage.index, checkpoint=checkpoint, attn_implementation="eager"
                )
                renamed |= set(reads) - {name for name, _ in built.named_parameters(remove_duplicate=False)}
                label = f"pp={pp} {schedule} stage {stage.index}"
                own = {k for k, fqns in owners.items() if any(_owners(fqn, stage.modules) for fqn in fqns)}
                # NOTE: a checkpoint saved with tied embeddings stores only the source; the stage
                # holding the copy reads the source's keys, and nothing else outside its modules.
                borrowed = {
                    k
                    for cp, src in tied.items()
                    if _owners(cp, stage.modules) and not made_of.get(cp)
                    for k in made_of.get(src, ())
                }
                twice = sorted({k for k in reads if reads.count(k) > 1})
                if twice:
                    problems.append(f"{label} read {twice} more than once")
                foreign = sorted(set(reads) - own - borrowed)
                if foreign:
                    problems.append(f"{label} read tensors of other stages: {foreign}")
                missed = sorted(own - set(reads))
                if missed:
                    problems.append(f"{label} did not read its own tensors {missed}")
                shards = {checkpoint.weight_map[k] for k in reads}
                extra_files = sorted(set(checkpoint.files_opened) - shards)
                if extra_files:
                    problems.append(f"{label} opened shards {extra_files} that hold none of its tensors")
                read_by_any |= set(reads)
            unread = sorted(everything - read_by_any)
            if unread:
                problems.append(f"pp={pp} {schedule}: no stage read {unread}")
        tied_keys = set(tied.values())
        if Capability.MOE in adapter.capabilities and not renamed - tied_keys:
            problems.append(
                "declares 'moe' but every tensor read is named like its parameter: the per-expert checkpoint keys "
                "were not converted by key_map(), so this check did not test it"
            )
    _fail_if(problems, f"adapter {adapter.name!r}: per-stage reads")


# -- stage chain ---------------------------------------------------------------------------------
def _sync_tied_grads(stages, tied: dict[str, str]) -> None:
    """What the pipeline's tied-gradient all-reduce does, for stages in one process: each tie
    group's gradient (a head tied to the embedding, a block several layers share) summed over the
    distinct tensors the stages hold for it, the sum given to each."""
    groups: dict[str, list[str]] = {}
    for copy_, source in tied.items():
        groups.setdefault(source, [source]).append(copy_)
    for members in groups.values():
        held: list[torch.nn.Parameter] = []
        for stage in stages:
            for fqn in members:
                try:
                    param = stage.get_parameter(fqn)
                except AttributeError:
                    continue  # the member lives on another stage
                if not any(param is p for p in held):
                    held.append(param)
        if len(held) > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in held]
            total = torch.stack(grads).sum(0)
            for p in held:
                p.grad = total.clone()


def _chain_loss(adapter, config, stages, logits, labels, mask):
    loss = causal_lm_loss(logits, labels)
    aux = adapter.aux_loss(config, stages, attention_mask=mask)
    return loss if aux is None else loss + aux


def check_stage_chain(adapter: Adapter) -> None:
    """Stages run one after another in one process give the Hugging Face model's logits, loss (with
    the router aux loss, which must matter when declared) and gradients (fp32, left-padded batch,
    both in train mode with dropout keyed alike, see :mod:`ppzoo.dropout`)
    for 1, 2, 3 and 4 stages, and for a split whose first stage
    holds only the input modules and whose last holds only the output modules (the planner makes
    such stages when the head is heavy); 2 stages also without an attention mask, and with
    explicit packed ``position_ids`` (two documents a row, positions restarting)."""
    problems = []
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        reference = load_reference(directory)
        config = reference.config
        # NOTE: train mode against train mode: the stages train, and any dropout the config has
        # draws the same masks on both sides (keyed by seed, layer and forward; ppzoo.dropout)
        reference.train()
        everything = adapter.fqn_layout(config)
        key_dropout(reference, everything, range(everything.num_layers), seed=DROPOUT_SEED)
        ids, mask, labels = batch(config.get_text_config().vocab_size, seq_len=SEQ_LEN)
        out = reference(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        with torch.no_grad():
            unmasked = reference(input_ids=ids).logits
        want_names = {n for n, _ in reference.named_parameters(remove_duplicate=False)}
        tied = adapter.tied_weights(config)
        layout = adapter.fqn_layout(config)
        layers = [layout.layer(i) for i in range(layout.num_layers)]
        ends = [list(layout.inputs), layers[: len(layers) // 2], layers[len(layers) // 2 :], list(layout.outputs)]
        splits = [(str(n), plan(directory, pp=n)) for n in (1, 2, 3, 4)]
        splits.append(("4 (inputs alone, outputs alone)", plan(directory, pp=4, stage_modules=ends)))
        for n, the_plan in splits:
            stages = _build_stages(adapter, config, the_plan, directory, dropout_seed=DROPOUT_SEED)
            names = {k for s in stages for k, _ in s.named_parameters(remove_duplicate=False)}
            if names != want_names:
                problems.append(f"{n} stages hold {sorted(names ^ want_names)} differently from the reference")
            logits = run_chain(stages, ids, attention_mask=mask)
            aux = adapter.aux_loss(config, stages, attention_mask=mask)
            loss = causal_lm_loss(logits, labels) + (0 if aux is None else aux)
            loss.backward()
            _sync_tied_grads(stages, tied)
            if not torch.allclose(logits, out.logits, rtol=1e-5, atol=1e-6):
                problems.append(f"{n} stages: logits differ by {(logits - out.logits).abs().max().item():.3e}")
            if not torch.allclose(loss, out.loss, rtol=1e-5, atol=0):
                problems.append(f"{n} stages: loss {loss.item():.8f} != reference {out.loss.item():.8f}")
            named = [(k, p) for s in stages for k, p in s.named_parameters()]
            problems += [f"{n} stages: gradient of {m}" for m in grad_mismatches(named, reference)]
            if n == "2" and Capability.ROUTER_AUX_LOSS in adapter.capabilities:
                # NOTE: the reference's loss holds the router aux loss; it must matter to the comparison
                if aux is None:
                    problems.append("declares 'router_aux_loss' but aux_loss() is None for the tiny config")
                elif torch.allclose((loss - aux).detach(), out.loss, rtol=1e-5, atol=0):
                    problems.append(
                        f"the router aux loss ({aux.item():.3e}) is too small for the loss comparison to see it"
                    )
            if n == "2":
                with torch.no_grad():
                    plain = run_chain(stages, ids)
                if not torch.allclose(plain, unmasked, rtol=1e-5, atol=1e-6):
                    problems.append(
                        f"2 stages without attention_mask: logits differ by {(plain - unmasked).abs().max().item():.3e}"
                    )
                problems += _packed_problems(adapter, reference, stages)
    _fail_if(problems, f"adapter {adapter.name!r}: stage chain vs Hugging Face")


def packed_batch(vocab_size: int, *, seq_len: int = SEQ_LEN, seed: int = 1):
    """``(input_ids, position_ids, labels)``: two documents packed in each row, positions restarting
    at each, no padding; the first token of a document is not predicted from the one before."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (2, seq_len), generator=gen)
    starts = (seq_len // 2 - 1, seq_len // 2 + 2)  # the second document of each row starts here
    position_ids = torch.stack([torch.cat([torch.arange(a), torch.arange(seq_len - a)]) for a in starts])
    labels = ids.clone()
    for row, start in enumerate(starts):
        labels[row, start] = -100
    return ids, position_ids, labels


def _packed_problems(adapter: Adapter, reference: torch.nn.Module, stages) -> list[str]:
    """The stages given explicit packed ``position_ids`` (no attention mask) compute the reference's
    logits and loss: learned positions, RoPE and the per-document mask transformers derives from
    restarting positions all come from them."""
    ids, position_ids, labels = packed_batch(reference.config.get_text_config().vocab_size)
    with torch.no_grad():
        # NOTE: use_cache=False, as in training: with a cache transformers ignores the packing
        params = inspect.signature(type(reference).forward).parameters
        no_cache = {"use_cache": False} if "use_cache" in params or "kwargs" in params else {}
        want = reference(input_ids=ids, position_ids=position_ids, labels=labels, **no_cache)
        got = run_chain(stages, ids, position_ids=position_ids)
    problems = []
    if not torch.allclose(got, want.logits, rtol=1e-5, atol=1e-6):
        problems.append(f"2 stages, packed position_ids: logits differ by {(got - want.logits).abs().max().item():.3e}")
    elif not torch.allclose(
        _chain_loss(adapter, reference.config, stages, got, labels, None), want.loss, rtol=1e-5, atol=0
    ):
        problems.append("2 stages, packed position_ids: the loss differs from the reference's")
    return problems


# -- tied weights ----------------------------------------------------------------------------------
def check_tied_weights(adapter: Adapter) -> None:
    """Tied parameters are one tensor in Hugging Face's model; split over stages, the copy on the
    last stage is loaded equal to the source, and the two gradients sum to the reference's."""
    problems = []
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        reference = load_reference(directory)
        config = reference.config
        # NOTE: train mode against train mode, dropout keyed alike (as in the stage chain)
        reference.train()
        everything = adapter.fqn_layout(config)
        key_dropout(reference, everything, range(everything.num_layers), seed=DROPOUT_SEED)
        tied = adapter.tied_weights(config)
        if not tied:
            raise AssertionError(
                f"adapter {adapter.name!r} declares 'tied_embeddings' but tied_weights(tiny_config()) is empty"
            )
        for copy_, source in tied.items():
            if reference.get_parameter(copy_) is not reference.get_parameter(source):
                problems.append(f"Hugging Face does not tie {copy_!r} to {source!r} for the tiny config")
        (one,) = _build_stages(adapter, config, plan(directory, pp=1), directory)
        for copy_, source in tied.items():
            if one.get_parameter(copy_) is not one.get_parameter(source):
                problems.append(f"one stage holds {copy_!r} and {source!r} as two tensors; they must be one")
        v_plan = plan(directory, pp=2, schedule="ZBVZeroBubble")
        if v_plan.stages[0].rank != v_plan.stages[-1].rank:
            problems.append("V placement puts the tied copy and its source on different ranks")
        ids, mask, labels = batch(config.get_text_config().vocab_size, seq_len=SEQ_LEN)
        reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        stages = _build_stages(adapter, config, plan(directory, pp=2), directory, dropout_seed=DROPOUT_SEED)
        _chain_loss(adapter, config, stages, run_chain(stages, ids, attention_mask=mask), labels, mask).backward()
        for copy_, source in tied.items():
            a, b = stages[-1].get_parameter(copy_), stages[0].get_parameter(source)
            want = reference.get_parameter(source)
            if a is b:
                problems.append(f"two stages share {copy_!r} with {source!r}; the last stage needs its own copy")
                continue
            if not torch.equal(a, want) or not torch.equal(b, want):
                problems.append(
                    f"{copy_!r} on the last stage or {source!r} on the first is not loaded equal to the checkpoint's"
                )
            if not torch.allclose(a.grad + b.grad, want.grad, rtol=1e-5, atol=1e-6):
                problems.append(f"the gradients of {copy_!r} and {source!r} do not sum to the tied reference gradient")
    _fail_if(problems, f"adapter {adapter.name!r}: tied weights")


# -- validation -------------------------------------------------------------------------------------
class _ExtraRule:
    """A plugin rule added by the kit: it must be reported together with the adapter's own."""

    CODE = "ppzoo-testing-extra-rule"

    @hookimpl
    def ppzoo_validate(self, config: Any, adapter: Any, plan: Any, settings: Settings) -> list[Problem]:
        return [Problem(self.CODE, "a plugin's rule (added by the conformance kit)")]


def _codes_raised(adapter: Adapter, config: Any) -> list[str]:
    try:
        registry.validate(config, adapter=adapter)
    except registry.ValidationError as exc:
        missing = [p.message for p in exc.problems if p.message not in str(exc)]
        if missing:
            return [f"<the message does not list {missing}: {exc}>"]
        return exc.codes
    return []


def check_validation(adapter: Adapter) -> None:
    """The tiny config passes every rule; each rule the adapter claims (``validation_cases()``:
    a config and the code it must raise) and the base class's encoder-decoder rule raise their
    code, reported together with every plugin's rules; a plan with more stages than layers is
    refused with the code ``stages-exceed-layers``, naming both numbers."""
    config = adapter.tiny_config()
    problems = []
    with resolving_to(adapter):
        n_layers = adapter.fqn_layout(config).num_layers
        for where, found in (
            ("alone", registry.problems(config, adapter=adapter)),
            ("under a plan", _plan_problems_or_error(config)),
        ):
            if found:
                problems.append(f"the tiny config is rejected {where}: {[(p.code, p.message) for p in found]}")
        enc_dec = copy.deepcopy(config)
        enc_dec.is_encoder_decoder = True
        cases = [(enc_dec, "encoder-decoder"), *adapter.validation_cases()]
        for bad, code in cases:
            raised = _codes_raised(adapter, bad)
            if code not in raised:
                problems.append(f"rule {code!r} did not fire; validation raised {raised}")
        with registry.plugin(_ExtraRule(), name="ppzoo.testing extra rule"):
            for bad, code in cases:
                raised = _codes_raised(adapter, bad)
                if code not in raised or _ExtraRule.CODE not in raised:
                    problems.append(f"{code!r} is not reported together with plugin rules: {raised}")
        too_many = n_layers + 1
        try:
            plan(config, pp=too_many)
            problems.append(f"plan(pp={too_many}) for {n_layers} layers did not raise")
        except registry.ValidationError as exc:
            named = [p for p in exc.problems if p.code == "stages-exceed-layers"]
            if not named or not all(str(n) in named[0].message for n in (too_many, n_layers)):
                problems.append(
                    f"plan(pp={too_many}) for {n_layers} layers raised {exc.codes}, expected 'stages-exceed-layers' "
                    f"naming {too_many} and {n_layers}: {exc}"
                )
    _fail_if(problems, f"adapter {adapter.name!r}: validation")


def _plan_problems_or_error(config: Any) -> list[Problem]:
    try:
        plan(config, pp=2)
    except registry.ValidationError as exc:
        return exc.problems
    return []


# -- buffers ------------------------------------------------------------------------------------------
def check_buffers_after_meta_init(adapter: Adapter) -> None:
    """Every buffer of every built stage (RoPE ``inv_freq``, embedding scales, ...) equals the
    ``from_pretrained`` model's, in value and dtype, in fp32 and bf16; no buffer is left out."""
    problems = []
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        from transformers import AutoModelForCausalLM

        for dtype in (torch.float32, torch.bfloat16):
            reference = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager")
            want = dict(reference.named_buffers())
            for pp in (1, 3):  # one stage holding everything; first, middle and last stages
                stages = _build_stages(adapter, reference.config, plan(directory, pp=pp), directory, dtype=dtype)
                seen = set()
                for index, stage in enumerate(stages):
                    for name, buf in stage.named_buffers():
                        seen.add(name)
                        label = f"{str(dtype)[6:]} pp={pp} stage {index}: buffer {name!r}"
                        ref = want.get(name)
                        if ref is None:
                            problems.append(f"{label} is not in the Hugging Face model")
                        elif buf.dtype != ref.dtype or buf.shape != ref.shape:
                            problems.append(
                                f"{label} is {buf.dtype} {tuple(buf.shape)}, reference {ref.dtype} {tuple(ref.shape)}"
                            )
                        elif not torch.equal(buf, ref):
                            problems.append(
                                f"{label} differs from the reference by {(buf.double() - ref.double()).abs().max().item():.3e}"
                            )
                missing = sorted(set(want) - seen)
                if missing:
                    problems.append(f"{str(dtype)[6:]} pp={pp}: no stage holds buffers {missing}")
    _fail_if(problems, f"adapter {adapter.name!r}: buffers after meta init")


# -- generation ----------------------------------------------------------------------------------------
#: tokens the generate check asks for: with its prompts, more than every tiny sliding window
GENERATE_TOKENS = 8
#: the seed of the generate check's sampling (``torch.manual_seed`` for the reference)
GENERATE_SEED = 4321
#: sampling settings that put every transformers warper ppzoo passes on to work
SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9)


def _eos_reference(reference, ids, mask, greedy, length: int):
    """An eos token that ends one row early while another goes on, and the reference's output with it.

    NOTE: picked from the greedy output itself, so that the check exercises eos whatever the
    random tiny model prefers; None when no generated token does both.
    """
    for row in range(ids.shape[0]):
        for step in range(1, GENERATE_TOKENS - 2):
            eos = int(greedy[row, length + step])
            want = reference.generate(
                ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, do_sample=False, eos_token_id=eos
            )
            new = want[:, length:]
            # NOTE: a row whose eos is not its last token was padded while another row went on
            if bool((new[:, :-1] == eos).any()):
                return eos, want
    return None, None


def check_generate(adapter: Adapter) -> None:
    """Stages chained in one process generate what the unsplit Hugging Face model's ``generate``
    does, token for token, from left-padded prompts of different lengths (fp32, eager attention):
    greedy for 1, 2 and 4 stages, the batch in one microbatch and in several; a row that ends at
    its eos token while the others go on; and sampling with temperature, top-k and top-p from the
    generator state ``torch.manual_seed(seed)`` gives (ppzoo's ``seed=``). See :mod:`ppzoo.generation`."""
    from ppzoo.generation import generate_chain

    problems = []
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        reference = load_reference(directory)
        config = reference.config
        # NOTE: transformers' own generate fails with the router aux loss on and a padding mask
        # (the loss is computed from the cached step's router logits against the whole mask);
        # the router logits do not change the logits
        config.output_router_logits = False
        ids, mask, _ = batch(config.get_text_config().vocab_size, seq_len=SEQ_LEN)
        length = ids.shape[1]
        with torch.no_grad():
            greedy = reference.generate(ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, do_sample=False)
            eos, ended = _eos_reference(reference, ids, mask, greedy, length)
            torch.manual_seed(GENERATE_SEED)
            sampled = reference.generate(
                ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, do_sample=True, **SAMPLING
            )
        if eos is None:
            problems.append("no generated token of the tiny model ends one row early while another goes on")
        if torch.equal(sampled, greedy):
            problems.append("sampling gives the greedy output for the tiny model, so it is not tested")

        def run(stages, label, want, **kwargs):
            got = generate_chain(
                stages,
                ids,
                mask,
                adapter=adapter,
                config=config,
                source=directory,
                max_new_tokens=GENERATE_TOKENS,
                **kwargs,
            )
            if not torch.equal(got, want):
                problems.append(f"{label}: ids differ from Hugging Face's generate:\n{got.tolist()}\n{want.tolist()}")

        for n in (1, 2, 4):
            stages = _build_stages(adapter, config, plan(directory, pp=n), directory)
            run(stages, f"{n} stages, greedy", greedy)
            if n == 2:
                run(stages, "2 stages, greedy, one microbatch", greedy, microbatches=1)
                if eos is not None:
                    run(stages, f"2 stages, greedy, eos {eos}", ended, eos_token_id=eos)
            if n > 1:
                run(stages, f"{n} stages, sampling {SAMPLING}", sampled, do_sample=True, seed=GENERATE_SEED, **SAMPLING)
    _fail_if(problems, f"adapter {adapter.name!r}: generation vs Hugging Face")
