"""Model configs: a transformers config from an object, a local directory or a hub id."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_config"]


def load_config(config_or_path: Any, **kwargs: Any) -> Any:
    """A transformers config from a config object, a local directory or a hub id."""
    if isinstance(config_or_path, (str, os.PathLike)):
        from transformers import AutoConfig

        path = os.fspath(config_or_path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json; pass a Hugging Face model directory or hub id")
        if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~"))):
            raise FileNotFoundError(f"no directory {path!r}; pass a Hugging Face model directory or hub id")
        return AutoConfig.from_pretrained(path, **kwargs)
    return config_or_path
