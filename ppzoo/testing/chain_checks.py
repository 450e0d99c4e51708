"""Conformance checks of stages chained in one process against the unsplit Hugging Face model:
logits, loss and gradients for every kind of split (packed documents too), and tied weights
loaded equal with their gradients summed.
"""

from __future__ import annotations

import inspect

import torch

from ppzoo.adapter import Adapter
from ppzoo.capabilities import Capability
from ppzoo.dropout import key_dropout
from ppzoo.loss import causal_lm_loss
from ppzoo.planner import plan
from ppzoo.stage import run_chain
from ppzoo.testing.harness import DROPOUT_SEED, SEQ_LEN, _build_stages, _fail_if, _tiny_checkpoint, resolving_to
from ppzoo.testing.reference import batch, grad_mismatches, load_reference

__all__ = ["check_stage_chain", "check_tied_weights", "packed_batch"]


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
