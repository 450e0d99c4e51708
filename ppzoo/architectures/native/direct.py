"""A vision-language model's direct parameters: held by the base model itself, outside every module.

LLaVA-NeXT's and LLaVA-OneVision's base model holds ``image_newline`` itself: a vector its image
code (``get_image_features``, ``pack_image_features``) appends to each row of an image's features.
Its text-only forward never reads it. Such a parameter joins the image side
(``NativeLayout.image_parameters``): the first stage holds it, only the first rank reads it from the
checkpoint, its gradient comes back with the vision tower's, ``freeze_vision=True`` freezes it and
``save_pretrained`` writes it back.

A direct parameter that the text-only forward reads is refused (``native-direct-parameter``):
no stage could hold it for the layers of every stage. So is one that no code of the model's own
class reads besides the forward, since nothing says it belongs to the images.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator

from torch import nn

from ppzoo.validation import Problem

__all__ = ["direct_parameters", "image_parameters", "reads"]


def direct_parameters(module: nn.Module) -> tuple[str, ...]:
    """The names of the parameters ``module`` holds itself (not its submodules')."""
    return tuple(n for n, p in module._parameters.items() if p is not None)


@contextlib.contextmanager
def reads(module: nn.Module | None, names: tuple[str, ...]) -> Iterator[set[str]]:
    """Within the block, the set of ``names`` that code read as attributes of ``module``.

    NOTE: ``nn.Module.__getattr__`` serves parameters; a subclass of the module's class, of the same
    name, notes each read first. A copy of the module made within the block (the trace's copy with
    constant weights) notes its reads in the same set.
    """
    seen: set[str] = set()
    if module is None or not names:
        yield seen
        return
    cls = type(module)
    wanted = frozenset(names)

    def __getattr__(self, name: str):
        if name in wanted:
            seen.add(name)
        return super(watched, self).__getattr__(name)

    watched = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__})
    watched.__qualname__ = cls.__qualname__
    module.__class__ = watched
    try:
        yield seen
    finally:
        module.__class__ = cls


def image_parameters(
    module: nn.Module, fqn: str, names: tuple[str, ...], read: set[str], kind: str
) -> tuple[tuple[str, ...], list[Problem]]:
    """The FQNs of ``module``'s direct parameters ``names`` that join the image side, and the
    problems of the others.

    Args:
        module: the module that holds them (the vision-language base model), at ``fqn``.
        read: those of ``names`` that the text-only forward read (:func:`reads`).
    """
    code = _image_code(type(module))
    image, problems = [], []
    for name in names:
        full = f"{fqn}.{name}" if fqn else name
        where = f"{kind}: {type(module).__name__} holds {full} itself, outside any input or output module"
        if name in read:
            problems.append(Problem("native-direct-parameter", f"{where}, and its text-only forward reads it"))
        elif name not in code:
            problems.append(
                Problem(
                    "native-direct-parameter", f"{where}, and neither its text-only forward nor its image code reads it"
                )
            )
        else:
            image.append(full)
    return tuple(image), problems


def _image_code(cls: type) -> frozenset[str]:
    """The attributes of ``self`` that the methods of ``cls``'s own module read, besides ``forward``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__ != cls.__module__:
            continue
        for attr, fn in vars(klass).items():
            if attr == "forward" or not inspect.isfunction(fn):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            names.update(re.findall(r"\bself\.(\w+)", source))
    return frozenset(names)
