"""The conformance kit's dropout check: train mode against train mode, with dropout on.

Stages draw their dropout masks from streams keyed by (seed, layer, microbatch) (:mod:`ppzoo.dropout`),
so the unsplit Hugging Face model in train mode, with the same keying, draws the very same masks.
The check turns every dropout probability of the tiny config on, proves that dropout changes the
output (so the comparison sees it), and compares logits, loss and gradients for several splits;
in eval mode stages and reference run without dropout.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch

from ppzoo.adapter import Adapter
from ppzoo.dropout import LAYER_DROP, key_dropout
from ppzoo.loss import causal_lm_loss
from ppzoo.planner import plan
from ppzoo.stage import run_chain
from ppzoo.testing.chain_checks import _sync_tied_grads
from ppzoo.testing.harness import DROPOUT_SEED as SEED
from ppzoo.testing.harness import SEQ_LEN, _build_stages, _fail_if, resolving_to
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model

__all__ = ["DROPOUT", "check_dropout", "with_dropout"]

#: the probability the check gives every dropout of the tiny config
DROPOUT = 0.25


#: dropout fields a family's own forward refuses above 0 (per model type), with why
REFUSED_BY_TRANSFORMERS = {
    "diffllama": ({"attention_dropout"}, "differential attention has no defined dropout in transformers"),
}


def _dropout_fields(config: Any) -> list[str]:
    names = set(config.to_dict())
    refused = REFUSED_BY_TRANSFORMERS.get(getattr(config, "model_type", None), (set(), ""))[0]
    return sorted(
        n
        for n in names
        if "drop" in n
        and n not in LAYER_DROP
        and n not in refused
        and isinstance(getattr(config, n, None), float)
        and not isinstance(getattr(config, n, None), bool)
    )


def with_dropout(config: Any, p: float = DROPOUT) -> tuple[Any, list[str]]:
    """A copy of ``config`` (and of its text config) with every dropout probability set to ``p``;
    also the names set. Layer drop (:data:`LAYER_DROP`) is left alone."""
    config = copy.deepcopy(config)
    changed = []
    targets = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        targets.append(text)
    for target in targets:
        for name in _dropout_fields(target):
            setattr(target, name, p)
            changed.append(name)
    return config, sorted(set(changed))


def check_dropout(adapter: Adapter, *, require_effect: bool = True) -> None:
    """With every dropout of the tiny config on, stages in train mode give the logits, loss and
    gradients of the Hugging Face model in train mode, both drawing masks keyed by (seed, layer,
    microbatch), for 2 and 3 stages and for a second microbatch; in eval mode, its eval
    logits. Dropout must change the train-mode output, so that the comparison sees it.

    Args:
        adapter: the adapter under test.
        require_effect: fail when the dropout probabilities change nothing (the kit's default);
            the zoo passes False, as some configs carry dropout fields their model never reads.
    """
    base = adapter.tiny_config()
    config, fields = with_dropout(base)
    if not fields:
        raise AssertionError(
            f"adapter {adapter.name!r}: dropout\n  - the tiny config has no dropout probability to turn on "
            f"(no float config field named *drop*); nothing would test the dropout path"
        )
    problems: list[str] = []
    with resolving_to(adapter), tempfile.TemporaryDirectory(prefix=f"ppzoo-{adapter.name}-dropout-") as tmp:
        directory = save_tiny_model(adapter, tmp, config=config)
        reference = load_reference(directory)
        config = reference.config
        layout = adapter.fqn_layout(config)
        ids, mask, labels = batch(config.get_text_config().vocab_size, seq_len=SEQ_LEN)
        with torch.no_grad():
            evaluated = reference.eval()(input_ids=ids, attention_mask=mask).logits
        reference.train()
        keys = key_dropout(reference, layout, range(layout.num_layers), seed=SEED)
        logits = reference(input_ids=ids, attention_mask=mask).logits
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        with torch.no_grad():
            second = reference(input_ids=ids, attention_mask=mask).logits
        keys.remove()
        if require_effect and torch.allclose(logits, evaluated, rtol=1e-4, atol=1e-5):
            problems.append(
                f"setting {fields} to {DROPOUT} does not change the train-mode logits: the model applies no dropout "
                "the check can see"
            )
        if require_effect and torch.allclose(second, logits, rtol=1e-4, atol=1e-5):
            problems.append("two train-mode forwards drew the same dropout masks: the microbatch is not in the key")
        tied = adapter.tied_weights(config)
        for n in (2, 3):
            stages = _build_stages(adapter, config, plan(directory, pp=n), directory, dropout_seed=SEED)
            for stage in stages:
                stage.train()
            got = run_chain(stages, ids, attention_mask=mask)
            got_loss = causal_lm_loss(got, labels)
            got_loss.backward()
            _sync_tied_grads(stages, tied)
            label = f"{n} stages, train mode with dropout"
            if not torch.allclose(got, logits, rtol=1e-5, atol=1e-6):
                problems.append(f"{label}: logits differ by {(got - logits).abs().max().item():.3e}")
            if not torch.allclose(got_loss, loss, rtol=1e-5, atol=0):
                problems.append(f"{label}: loss {got_loss.item():.8f} != reference {loss.item():.8f}")
            named = [(k, p) for s in stages for k, p in s.named_parameters()]
            problems += [f"{label}: gradient of {m}" for m in grad_mismatches(named, reference)]
            with torch.no_grad():
                again = run_chain(stages, ids, attention_mask=mask)
                if not torch.allclose(again, second, rtol=1e-5, atol=1e-6):
                    problems.append(f"{label}, second microbatch: logits differ by {(again - second).abs().max():.3e}")
                for stage in stages:
                    stage.eval()
                plain = run_chain(stages, ids, attention_mask=mask)
            if not torch.allclose(plain, evaluated, rtol=1e-5, atol=1e-6):
                problems.append(f"{n} stages in eval mode: logits differ by {(plain - evaluated).abs().max():.3e}")
    _fail_if(problems, f"adapter {adapter.name!r}: dropout (train mode vs train mode)")
