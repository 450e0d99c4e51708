"""The native adapter's parameters and checkpoint keys: ties, renamed and fused keys.

transformers 5 converts checkpoint keys at load and reverses the conversion at save (GPT-NeoX's
head is saved as ``embed_out``, EXAONE keeps its original names, per-expert MoE tensors are merged
into fused parameters, a fused convolution is concatenated from three). ppzoo's loader and
``save_pretrained`` apply those same rules per stage (``ppzoo.checkpoint.conversion``), so this
module only checks, on the meta device, that the rules turn what transformers saves back into
every parameter, and records the one-for-one renames. Ties come from
``get_expanded_tied_weights_keys``: a head tied to the embedding spans the pipeline (its gradients
are summed across the two stages), and so does a block several layers share (Zamba's shared
transformer, tied from the first layer that uses it to every later one: each stage holding such a
layer keeps a copy, read from the checkpoint keys of the first, its gradients summed over every
holding stage, :mod:`ppzoo.tied`); a tie within the inputs, within the outputs (a head's bias) or
within one layer stays on one stage as one parameter, read through :class:`CheckpointKeys`.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ppzoo.adapter import KeyMap
from ppzoo.validation import Problem

__all__ = ["CheckpointKeys", "checkpoint_renames", "fewer_experts", "fewer_experts_model", "tied_parameters"]


class CheckpointKeys(KeyMap):
    """Tied copies on one stage that a checkpoint stores under their source only (read from the source's tensors)."""

    def __init__(self, aliases: dict[str, str]):
        super().__init__()
        object.__setattr__(self, "aliases", dict(aliases))

    def sources(self, fqn, available):
        if not available(fqn) and fqn in self.aliases:
            return [self.aliases[fqn]]
        return [fqn]


def tied_parameters(
    model: nn.Module, inputs: list[str], outputs: list[str], kind: str, *, layers: str | None = None
) -> tuple[dict[str, str], dict[str, str], list[Problem]]:
    """Ties across the pipeline and ties on one stage, as ``({copy: source}, {copy: source}, problems)``.

    Across: an output's copy of an input's parameter, or a layer's copy of an earlier layer's (a
    block several layers share). On one stage: both ends in the inputs, both in the outputs, or
    both in one layer.

    Args:
        model: the meta model.
        inputs, outputs: the input and output units.
        kind: how problems name the model.
        layers: the FQN of the decoder-layer list; without it a tie between layers is refused.
    """
    try:
        expanded = model.get_expanded_tied_weights_keys(all_submodels=True)
    except AttributeError:  # NOTE: older transformers name the ties differently; none then
        expanded = {}
    inside = lambda fqn, units: any(fqn.startswith(u + ".") for u in units)  # noqa: E731
    across, local, other = {}, {}, []
    for copy_, source in expanded.items():
        if inside(copy_, outputs) and inside(source, inputs):
            across[copy_] = source
        elif (inside(copy_, outputs) and inside(source, outputs)) or (inside(copy_, inputs) and inside(source, inputs)):
            local[copy_] = source  # NOTE: all inputs are on the first stage, all outputs on the last
        elif (pair := _layer_indices(copy_, source, layers)) is not None:
            # NOTE: one layer is on one stage; a layer's copy of an earlier layer's parameter may
            # be on another stage (the first holder of the shared block keeps the source)
            if pair[0] == pair[1]:
                local[copy_] = source
            elif pair[0] > pair[1]:
                across[copy_] = source
            else:
                other.append((copy_, source))
        else:
            other.append((copy_, source))
    if not other:
        return across, local, []
    # NOTE: one problem for the whole tie
    copy_, source = other[0]
    more = f" and {len(other) - 1} more parameters" if len(other) > 1 else ""
    return (
        across,
        local,
        [
            Problem(
                "native-tied",
                f"{kind} ties {copy_!r} to {source!r}{more}; ppzoo ties an output module's parameters to an input "
                "module's, and a layer's to an earlier layer's (their gradients summed over the stages holding "
                "them), not parameters of other modules",
            )
        ],
    )


def _layer_indices(copy_: str, source: str, layers: str | None) -> tuple[int, int] | None:
    """The layer indices of a copy and its source when both are inside the layer list ``layers``."""
    if not layers:
        return None
    found = []
    for fqn in (copy_, source):
        index = fqn[len(layers) + 1 :].split(".", 1)[0] if fqn.startswith(layers + ".") else ""
        if not index.isdigit():
            return None
        found.append(int(index))
    return found[0], found[1]


def checkpoint_renames(
    model: nn.Module, kind: str, *, check: nn.Module | None = None
) -> tuple[dict[str, str], list[Problem]]:
    """Where transformers saves a parameter under another key, one for one (``{fqn: key}``).

    Its conversion rules run both ways on the meta model: what ``save_pretrained`` writes, then
    how ppzoo's loader reads that back; a parameter no saved key converts back to is a problem.

    Args:
        model: the meta model; the renames are its own.
        kind: how problems name the model.
        check: the model the round trip runs on, when not ``model``: the same architecture with
            fewer routed experts (see :func:`.layout.discover`), or cut to its first layers of each
            kind (:mod:`.prefix`), whose keys differ from ``model``'s only in how many per-expert
            and per-layer keys there are.
    """
    from ppzoo.checkpoint.conversion import loading_plan, saving_groups

    try:
        state = dict(model.state_dict())
        groups = saving_groups(model, list(state))
        renames = {
            fqn: key for group in groups if group.converter is None for fqn, key in group.keys.items() if fqn != key
        }
        if check is not None:
            state = dict(check.state_dict())
            groups = saving_groups(check, list(state))
        check = model if check is None else check
        saved = []
        for group in groups:
            if group.converter is None:
                saved += group.keys.values()
            else:
                saved += group.convert({fqn: state[fqn] for fqn in group.fqns}, model=check)
        plan = loading_plan(check, saved, state)
    except Exception as exc:  # noqa: BLE001
        return {}, [
            Problem(
                "native-checkpoint-keys",
                f"{kind}: transformers' checkpoint key conversion fails on it ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
            )
        ]
    lost = [fqn for fqn in state if fqn not in plan]
    if lost:
        return {}, [
            Problem(
                "native-checkpoint-keys",
                f"{kind}: transformers' conversion rules do not read back what they save for {lost[:2]}"
                + (f" and {len(lost) - 2} more" if len(lost) > 2 else ""),
            )
        ]
    return renames, []


_EXPERT_COUNTS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "top_k")


def fewer_experts(config: Any) -> Any | None:
    """A copy of ``config`` with as few routed experts as its routing allows, or None when it has
    no expert count to lower.

    NOTE: only the checkpoint-key round trip (:func:`checkpoint_renames`) runs on it, and its
    result does not depend on the count: the model keeps every layer and key name, only fewer
    per-expert ones (fused expert tensors a shorter first dimension); transformers' rules name experts by a
    pattern (``experts.*.gate_proj``) and split or merge along that dimension whatever its size.
    A 256-expert model saves ~45k per-expert keys (seconds to convert and read back); a few do.
    The count stays a multiple of the routing groups (``n_group``) with two or more experts each
    and enough in the ``topk_group`` groups kept for the top-k, and is never ``num_hidden_layers``
    (so that no expert list passes for the layer list).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = next((a for a in _EXPERT_COUNTS if isinstance(getattr(text, a, None), int)), None)
    if name is None:
        return None
    experts = getattr(text, name)
    top_k = next((v for a in _TOP_K if isinstance(v := getattr(text, a, None), int)), 1)
    groups = getattr(text, "n_group", None) or 1
    kept = getattr(text, "topk_group", None) or groups
    per_group = max(2, -(-top_k // kept))
    while groups * per_group == getattr(text, "num_hidden_layers", None):
        per_group += 1
    fewer = groups * per_group
    if fewer >= experts:
        return None
    config = copy.deepcopy(config)
    setattr(config.get_text_config() if hasattr(config, "get_text_config") else config, name, fewer)
    return config


def fewer_experts_model(config: Any) -> nn.Module | None:
    """The meta model of :func:`fewer_experts`'s config, or None (the check then runs on the full model)."""
    from ppzoo.meta import meta_model

    fewer = fewer_experts(config)
    if fewer is None:
        return None
    try:
        return meta_model(fewer, attn_implementation="eager")
    except Exception:  # noqa: BLE001 - a count the model refuses: the full model is checked instead
        return None
