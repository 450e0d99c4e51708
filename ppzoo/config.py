"""Model configs: a transformers config from an object, a local directory or a hub id."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["check_local_path", "load_config"]


def load_config(config_or_path: Any, **kwargs: Any) -> Any:
    """A transformers config from a config object, a local directory or a hub id."""
    if isinstance(config_or_path, (str, os.PathLike)):
        from transformers import AutoConfig

        path = os.fspath(config_or_path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face model directory or hub id")
        check_local_path(path)
        return AutoConfig.from_pretrained(path, **kwargs)
    return config_or_path


def check_local_path(path: str) -> None:
    """Refuse a missing ``path`` that can only mean a local directory, before it reaches the hub.

    NOTE: a hub id is ``name`` or ``namespace/name``; anything absolute, starting with ``.`` or
    ``~``, ending in a separator or with more than one ``/`` is a path, and the hub would answer
    it with an ``HFValidationError`` that hides the real problem.

    Raises:
        FileNotFoundError: ``path`` is such a path and does not exist.
    """
    if os.path.exists(os.path.expanduser(path)):
        return
    if (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.endswith(("/", os.sep))
        or path.count("/") > 1
        or "\\" in path
    ):
        raise FileNotFoundError(f"no directory {path!r}; pass a Hugging Face model directory or hub id")
