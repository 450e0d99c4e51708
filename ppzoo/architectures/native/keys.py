"""The native adapter's parameters and checkpoint keys: ties, renamed keys, the key map.

transformers 5 converts some checkpoints' keys at load and reverses the conversion at save
(``revert_weight_conversion``); a one-for-one rename (GPT-NeoX's head is saved as ``embed_out``)
is read through :class:`CheckpointKeys`, while merged or split tensors (fused experts, fused
convolutions) are refused. Ties come from ``get_expanded_tied_weights_keys``: a head tied to the
embedding spans the pipeline (its gradients are summed across the two stages); a tie within the
inputs or within the outputs (a head's bias) stays on one stage as one parameter.
"""

from __future__ import annotations

from torch import nn

from ppzoo.adapter import KeyMap
from ppzoo.validation import Problem

__all__ = ["CheckpointKeys", "checkpoint_renames", "tied_parameters"]


class CheckpointKeys(KeyMap):
    """Checkpoint keys that differ from the parameter FQNs one for one (NeoX's head is
    ``embed_out``), and tied copies on one stage that a checkpoint stores under their source only."""

    def __init__(self, renames: dict[str, str], aliases: dict[str, str]):
        super().__init__()
        object.__setattr__(self, "renames", dict(renames))
        object.__setattr__(self, "aliases", dict(aliases))

    def _key(self, fqn: str, available) -> str:
        key = self.renames.get(fqn, fqn)
        return key if available(key) or not available(fqn) else fqn

    def sources(self, fqn, available):
        key = self._key(fqn, available)
        if not available(key) and fqn in self.aliases:
            return [self._key(self.aliases[fqn], available)]
        return [key]

    def split(self, fqn, tensor):
        return {self.renames.get(fqn, fqn): tensor}


def tied_parameters(
    model: nn.Module, inputs: list[str], outputs: list[str], kind: str
) -> tuple[dict[str, str], dict[str, str], list[Problem]]:
    """Ties across the pipeline (an output's copy of an input's parameter) and ties on one side."""
    try:
        expanded = model.get_expanded_tied_weights_keys(all_submodels=True)
    except AttributeError:  # NOTE: older transformers name the ties differently; none then
        expanded = {}
    inside = lambda fqn, units: any(fqn.startswith(u + ".") for u in units)  # noqa: E731
    across, local, problems = {}, {}, []
    for copy_, source in expanded.items():
        if inside(copy_, outputs) and inside(source, inputs):
            across[copy_] = source
        elif (inside(copy_, outputs) and inside(source, outputs)) or (inside(copy_, inputs) and inside(source, inputs)):
            local[copy_] = source  # NOTE: all inputs are on the first stage, all outputs on the last
        else:
            problems.append(
                Problem(
                    "native-tied",
                    f"{kind} ties {copy_!r} to {source!r}; ppzoo ties parameters of input and output modules only",
                )
            )
    return across, local, problems


def checkpoint_renames(model: nn.Module, kind: str) -> tuple[dict[str, str], list[Problem]]:
    """Where transformers saves a tensor under another key (its weight conversion, reversed)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {}, []
    state = dict(model.state_dict())
    try:
        saved = revert_weight_conversion(model, dict(state))
    except Exception as exc:  # noqa: BLE001
        return {}, [
            Problem(
                "native-checkpoint-keys",
                f"{kind}: transformers' checkpoint key conversion fails on it ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
            )
        ]
    by_tensor = {id(t): fqn for fqn, t in state.items()}
    renames, merged = {}, []
    for key, tensor in saved.items():
        fqn = by_tensor.get(id(tensor))
        if fqn is None:
            merged.append(key)
        elif fqn != key:
            renames[fqn] = key
    if merged or len(saved) != len(state):
        shown = ", ".join(map(repr, merged[:2])) or f"{len(state)} tensors saved as {len(saved)}"
        return {}, [
            Problem(
                "native-checkpoint-keys",
                f"{kind}: transformers merges or splits checkpoint tensors at load ({shown}); ppzoo's loader reads one tensor per parameter",
            )
        ]
    return renames, []
