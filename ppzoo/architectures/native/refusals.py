"""What the native adapter refuses about a model as a whole, before any layout is read.

A config that changes when transformers saves and loads it (:func:`config_round_trip`), a
CausalLM whose forward computes a loss other than transformers' causal-LM loss
(:func:`loss_problems`), and a parameter used in several places (:func:`shared_parameters`).
"""

from __future__ import annotations

import copy
import inspect
import io
import textwrap
import tokenize
from typing import Any

from torch import nn

from ppzoo.validation import Problem

__all__ = ["config_round_trip", "loss_problems", "shared_parameters", "short"]


def config_round_trip(config: Any, kind: str) -> list[Problem]:
    """Stages load a checkpoint saved with the config; a config that changes when transformers
    saves and loads it (a per-layer-type setting lost) would give them another model."""
    ignored = {"_name_or_path", "transformers_version", "architectures"}
    # NOTE: a sub-config other than the text config (Moshi's depth decoder) belongs to a model the
    # causal LM does not hold
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ignored |= {
        name
        for name, value in vars(config).items()
        if value is not text and type(value).__name__.endswith("Config") and hasattr(value, "to_dict")
    }
    try:
        before = config.to_dict()
        after = type(config).from_dict(copy.deepcopy(before)).to_dict()
    except Exception as exc:  # noqa: BLE001 - any failure to load back is the problem reported
        return [
            Problem(
                "native-round-trip",
                f"{kind}: its config does not load back from what it saves ({type(exc).__name__}: {short(exc)})",
            )
        ]
    # NOTE: a field left None that loading fills in (Moshi's audio_vocab_size) is the default the
    # model computes anyway; a value that changes is another model
    changed = sorted(
        k
        for k in before.keys() | after.keys()
        if k not in ignored and before.get(k) is not None and before.get(k) != after.get(k)
    )
    if not changed:
        return []
    return [
        Problem(
            "native-round-trip",
            f"{kind}: its config changes when transformers saves and loads it ({', '.join(changed[:3])}), so a "
            "checkpoint saved from it loads as another model",
        )
    ]


def loss_problems(model: nn.Module, kind: str) -> list[Problem]:
    """ppzoo trains with transformers' causal-LM loss; a CausalLM that computes another one is refused."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return []
    names = {
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline)
        if tok.type == tokenize.NAME
    }
    if "loss_function" in names:
        # NOTE: a term added to the causal-LM loss on the logits (Bamba's z-loss) is not ppzoo's
        # loss; the families that have one default it to 0.
        added = {
            attr: getattr(model.config, attr)
            for attr in model.config.to_dict()
            if "z_loss" in attr and isinstance(getattr(model.config, attr), (int, float))
        }
        added = {attr: value for attr, value in added.items() if value > 0}
        if added and any("z_loss" in name for name in names):
            attr, value = next(iter(added.items()))
            return [
                Problem(
                    "native-loss",
                    f"{kind}: {type(model).__name__}.forward adds a z-loss on the logits ({attr}={value}) to the "
                    "causal-LM loss, which ppzoo's loss does not; set it to 0 to train without it",
                )
            ]
        return []
    return [
        Problem(
            "native-loss",
            f"{kind}: {type(model).__name__}.forward computes a loss of its own, not transformers' causal-LM loss (next-token cross-entropy) that ppzoo trains with",
        )
    ]


def shared_parameters(model: nn.Module, kind: str) -> list[Problem]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    shared = [group for group in names.values() if len(group) > 1]
    if not shared:
        return []
    return [
        Problem(
            "native-shared-parameters",
            f"{kind} uses one parameter in several places ({', '.join(shared[0][:3])}): a block shared by several layers cannot be split over stages",
        )
    ]


def short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")
