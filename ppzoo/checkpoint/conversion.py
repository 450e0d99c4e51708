"""Checkpoint keys ⇄ parameter FQNs through transformers' own conversion rules.

transformers 5 renames and fuses checkpoint tensors when it loads a model
(``transformers.conversion_mapping.get_model_conversion_mapping``: ``WeightRenaming`` and
``WeightConverter`` rules, e.g. Mixtral's per-expert ``block_sparse_moe.experts.N.w1`` merged into
``mlp.experts.gate_up_proj``, EXAONE's ``transformer.h.N.attn.attention.*`` renamed) and reverses
them when it saves (``revert_weight_conversion``). It also adds or strips the base model's prefix
(GPT-2 hub checkpoints have no ``transformer.``). ppzoo applies the very same rules, but per stage:

- :func:`loading_plan` maps checkpoint keys (names only, no tensor read) to the parameters of a
  stage, in groups: a group is the checkpoint keys one rule turns into one or more parameters, so
  a stage reads exactly the tensors its own parameters are made of;
- :meth:`Group.convert` runs the rule's operations on the tensors read;
- :func:`saving_groups` groups a stage's parameters the way the reversed rules need them, and
  :meth:`SaveGroup.convert` gives the checkpoint keys and tensors transformers' ``save_pretrained``
  would write for them.

NOTE: the rules are transformers' own objects, driven with its own functions (``rename_source_key``,
``apply_converters``, ``apply_renamings``, ``WeightTransform.convert``), in the order and with the
tie-breaks its loader uses, so a key ppzoo reads is a key ``from_pretrained`` reads.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Group", "SaveGroup", "loading_plan", "natural_order", "saving_groups"]


def natural_order(keys: Iterable[str]) -> list[str]:
    """``keys`` in transformers' loading order: dotted numbers compared as numbers (expert 10 after 9).

    NOTE: a merge stacks its tensors in this order, so it decides which expert is which.
    """
    from transformers.core_model_loading import dot_natural_key

    return sorted(keys, key=dot_natural_key)


def _transforms(model: nn.Module, *, saving: bool, quantizer: Any = None) -> list[Any]:
    """transformers' conversion rules for ``model`` (fresh copies: rules keep state while matching),
    with the dequantizing converters of ``quantizer`` (:mod:`ppzoo.checkpoint.quantized`) when given."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # NOTE: transformers before 5 converts nothing
        return []
    if not hasattr(model, "base_model_prefix"):
        return []
    with _hugging_face_classes(model):
        if saving:
            # NOTE: as revert_weight_conversion does for a model not loaded by from_pretrained: no
            # legacy renames, and no prefix changes (whether the prefix was there is not known)
            rules = get_model_conversion_mapping(model, add_legacy=False)
            return [r for r in rules if not isinstance(r, PrefixChange)]
        return get_model_conversion_mapping(model, hf_quantizer=quantizer)


@contextlib.contextmanager
def _hugging_face_classes(model: nn.Module) -> Iterator[None]:
    """Give modules that FSDP2 wrapped their Hugging Face class back while the rules are looked up.

    NOTE: ``fully_shard`` swaps in a class of its own, ``FSDP<name>``, derived from the Hugging
    Face one; transformers finds some rules by class name (``GPTNeoXForCausalLM``: ``embed_out``).
    """
    swapped = []
    for module in model.modules():
        cls = type(module)
        if cls.__name__.startswith("FSDP"):
            original = next((c for c in cls.__mro__[1:] if c.__name__ == cls.__name__[4:]), None)
            if original is not None:
                swapped.append((module, cls))
                module.__class__ = original
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def _split_rules(rules: list[Any]) -> tuple[list[Any], list[Any]]:
    from transformers.core_model_loading import WeightConverter

    converters = [r for r in rules if isinstance(r, WeightConverter)]
    return [r for r in rules if not isinstance(r, WeightConverter)], converters


@dataclass
class Group:
    """Checkpoint keys that one rule turns into parameters.

    Attributes:
        targets: the parameter FQNs the group yields; the first names the group.
        sources: checkpoint keys by the rule's source pattern, each list in loading order (for a
            plain rename: one key under itself).
        converter: transformers' ``WeightConverter`` (merge, concatenate, chunk, ...), or None for
            a rename, whose one tensor is the parameter as it is.
    """

    targets: tuple[str, ...]
    sources: dict[str, list[str]] = field(default_factory=dict)
    converter: Any = None

    @property
    def keys(self) -> list[str]:
        """Every checkpoint key of the group, in the order the rule takes them."""
        return [key for keys in self.sources.values() for key in keys]

    def convert(self, tensors: Mapping[str, torch.Tensor], *, model: nn.Module) -> dict[str, torch.Tensor]:
        """The group's parameters (by FQN) built from its checkpoint tensors (by key)."""
        if self.converter is None:
            (key,) = self.keys
            return {self.targets[0]: tensors[key]}
        rule = copy.deepcopy(self.converter)
        for pattern, keys in self.sources.items():
            for key in keys:
                rule.add_tensor(self.targets[0], key, pattern, tensors[key])
        out = rule.convert(self.targets[0], model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def rows(self, start: int, stop: int, size: int) -> Group | None:
        """The group that builds only rows ``start:stop`` (of ``size``) of a parameter merged over
        numbered modules along dim 0, reading only those modules' tensors; None when the rule is
        not such a merge (then the whole parameter is built).

        NOTE: an FSDP shard of fused experts is a block of experts: it needs only their tensors.
        """
        from transformers.core_model_loading import Concatenate, MergeModulelist

        ops = list(getattr(self.converter, "operations", ()))
        merge_first = bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0
        if not merge_first or any(type(op) is not Concatenate or op.dim == 0 for op in ops[1:]):
            return None
        if len(self.targets) != 1 or any(len(keys) != size for keys in self.sources.values()):
            return None
        return Group(self.targets, {p: keys[start:stop] for p, keys in self.sources.items()}, self.converter)

    def missing(self) -> list[str]:
        """Keys a merge over numbered modules (``experts.*``) lacks: a number one pattern has and
        another has not, or a gap in the numbers; empty when none is seen missing."""
        if self.converter is None:
            return []
        found: dict[str, dict[int, tuple[str, tuple[int, int]]]] = {}
        for pattern, keys in self.sources.items():
            if "*." not in pattern:
                continue
            regex = re.compile(pattern.replace("*.", r"(\d+)\."))
            found[pattern] = {int(m[1]): (key, m.span(1)) for key in keys if (m := regex.search(key))}
        numbers = set().union(*(set(v) for v in found.values())) if found else set()
        missing = []
        for by_number in found.values():
            if not by_number:
                continue
            key, (start, end) = next(iter(by_number.values()))
            missing += [f"{key[:start]}{n}{key[end:]}" for n in range(max(numbers) + 1) if n not in by_number]
        return missing


def loading_plan(
    model: nn.Module, keys: Iterable[str], names: Iterable[str], *, quantizer: Any = None
) -> dict[str, Group]:
    """Which checkpoint keys make each of ``names``, by transformers' conversion rules for ``model``.

    Only key names are looked at; nothing is read.

    Args:
        model: the model (or a stage of it: rules are found from its classes and config).
        keys: every key of the checkpoint.
        names: the parameter FQNs wanted (a stage's, and the sources of its tied copies).
        quantizer: transformers' quantizer set to dequantize (:func:`ppzoo.checkpoint.quantized.dequantizer`)
            for a quantized checkpoint: a weight's group then holds its scales too.

    Returns:
        ``{fqn: group}`` for each of ``names`` some checkpoint keys convert to (the parameters of
        one group share the group object). A name no key converts to is absent.
    """
    from transformers.core_model_loading import rename_source_key

    known = dict.fromkeys(names, True)
    renamings, converters = _split_rules(_transforms(model, saving=False, quantizer=quantizer))
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None) or None
    groups: dict[str, Group] = {}
    for key in natural_order(keys):
        target, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if target not in known and key in known:
            target, pattern = key, None  # NOTE: as transformers' loader: a key that is a name stays one
        if target not in known:
            continue
        group = groups.get(target)
        if group is None:
            converter = by_pattern.get(pattern) if pattern is not None else None
            if converter is None:
                group = Group((target,))
            else:
                first = converter.target_patterns[0]
                group = Group(tuple(target.replace(first, t) for t in converter.target_patterns), converter=converter)
            for name in group.targets:
                groups.setdefault(name, group)
        if group.converter is None:
            if not group.sources:  # NOTE: two keys renamed to one name: the first wins, as in transformers
                group.sources[key] = [key]
        elif pattern is not None:
            group.sources.setdefault(pattern, []).append(key)
    return groups


@dataclass
class SaveGroup:
    """Parameters that one reversed rule writes together, and how.

    Attributes:
        fqns: the parameter FQNs, in the order the rule takes them.
        keys: the checkpoint key of a parameter that is only renamed (``{fqn: key}``).
        converter: the reversed ``WeightConverter`` (split, chunk, ...), or None for renames.
        renamings: the reversed renames, applied to a converter's output names.
        name: the converter's name for the group (its first output pattern filled in).
        patterns: the reversed converter's source pattern each parameter matched (``{fqn: pattern}``).
    """

    fqns: list[str]
    keys: dict[str, str] = field(default_factory=dict)
    converter: Any = None
    renamings: list[Any] = field(default_factory=list)
    name: str = ""
    patterns: dict[str, str] = field(default_factory=dict)

    def convert(self, tensors: Mapping[str, torch.Tensor], *, model: nn.Module) -> dict[str, torch.Tensor]:
        """Checkpoint key → tensor, as transformers' ``save_pretrained`` writes these parameters."""
        if self.converter is None:
            return {self.keys[fqn]: tensors[fqn] for fqn in self.fqns}
        from transformers.core_model_loading import apply_renamings

        rule = copy.deepcopy(self.converter)
        for fqn in self.fqns:
            rule.add_tensor(self.name, fqn, self.patterns[fqn], tensors[fqn])
        out = rule.convert(self.name, model=model, config=model.config)
        return {
            apply_renamings(name, self.renamings): value[0] if isinstance(value, list) else value
            for name, value in out.items()
        }


def saving_groups(model: nn.Module, fqns: Iterable[str]) -> list[SaveGroup]:
    """``fqns`` (a stage's parameters) grouped as transformers' reversed conversion rules take them.

    A parameter only renamed is a group of its own; parameters a reversed converter takes together
    (several into one tensor, or one into several per-expert tensors) share a group. Groups come in
    the order of their first parameter in ``fqns``; nothing is read.
    """
    from transformers.core_model_loading import apply_converters, apply_renamings

    rules = _transforms(model, saving=True)[::-1]  # NOTE: reversed, as revert_weight_conversion does
    renamings, converters = _split_rules([rule.reverse_transform() for rule in rules])
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: list[SaveGroup] = []
    fused: dict[str, SaveGroup] = {}
    for fqn in fqns:
        name, pattern = apply_converters(fqn, converters)
        if pattern is None:
            groups.append(SaveGroup([fqn], keys={fqn: apply_renamings(fqn, renamings)}))
            continue
        group = fused.get(name)
        if group is None:
            group = fused[name] = SaveGroup([], converter=by_pattern[pattern], renamings=renamings, name=name)
            groups.append(group)
        group.fqns.append(fqn)
        group.patterns[fqn] = pattern
    return groups
