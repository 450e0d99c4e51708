"""The answers of ``ppzoo plan`` kept on disk, so that asking again takes no torch import.

Planning a large config is mostly start-up: importing torch and transformers, importing the
model's modeling code and, for the native adapter, building the model on the meta device and
watching one forward (seconds for DeepSeek-V3). A plan is a pure function of the config, the
command's options and the code that plans, so ``ppzoo plan`` stores what it printed under a key
of all three and prints it again when asked the same question.

The key holds:

- the bytes of ``config.json`` (only local directories are cached: a hub id may change remotely);
- every option of the command (a ``.csv`` schedule by its content);
- the code: every source file of ppzoo, the versions of Python, torch, transformers and pluggy,
  the ``ppzoo`` entry points with their distributions' versions, and the plugin switches
  (``PPZOO_DISABLE_PLUGIN_AUTOLOAD``, ``PPZOO_BLOCK_PLUGINS``).

NOTE: a plugin installed in development mode whose code changes without a new version keeps its
old answers: pass ``--no-cache``, or delete the directory (:func:`cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "fingerprint", "load", "plan_key", "store"]

#: distributions whose code decides a plan besides ppzoo's own
_DEPENDENCIES = ("torch", "transformers", "pluggy")
#: environment switches that decide which plugins plan
_SWITCHES = ("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "PPZOO_BLOCK_PLUGINS")
#: bump when what is stored changes shape
_FORMAT = 1


def cache_dir() -> Path:
    """``$PPZOO_CACHE_DIR/plans``, else ``$XDG_CACHE_HOME/ppzoo/plans``, else ``~/.cache/ppzoo/plans``."""
    root = os.environ.get("PPZOO_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ppzoo")
    return Path(root) / "plans"


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def fingerprint() -> str:
    """A digest of the code that plans: ppzoo's sources, its dependencies' versions, the plugins."""
    import importlib.metadata

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    parts: dict[str, Any] = {
        "format": _FORMAT,
        "python": sys.version,
        "versions": {d: _version(d) for d in _DEPENDENCIES},
        "switches": {s: os.environ.get(s, "") for s in _SWITCHES},
        "plugins": sorted(
            (ep.name, ep.value, ep.dist.name if ep.dist else "-", ep.dist.version if ep.dist else "-")
            for ep in importlib.metadata.entry_points(group="ppzoo")
        ),
    }
    digest.update(json.dumps(parts, sort_keys=True).encode())
    return digest.hexdigest()


def plan_key(path: str, options: dict[str, Any]) -> str | None:
    """The key of ``ppzoo plan PATH`` with ``options``; None when the answer is not cached.

    Only a local directory with ``config.json`` has a key; a ``.csv`` schedule counts by content.
    """
    config = Path(os.path.expanduser(path)) / "config.json"
    if not config.is_file():
        return None
    options = dict(options)
    schedule = options.get("schedule")
    if isinstance(schedule, str) and schedule.lower().endswith(".csv"):
        if not os.path.isfile(schedule):
            return None
        options["schedule"] = hashlib.sha256(Path(schedule).read_bytes()).hexdigest()
    material = {
        "config": hashlib.sha256(config.read_bytes()).hexdigest(),
        "options": options,
        "code": fingerprint(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def load(key: str) -> dict[str, Any] | None:
    """The answer stored under ``key``, or None (none stored, or unreadable)."""
    try:
        return json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def store(key: str, answer: dict[str, Any]) -> None:
    """Store ``answer`` under ``key``; a cache that cannot be written is skipped silently.

    NOTE: written to a temporary file and renamed, so that a reader never sees half an answer.
    """
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(answer, f)
            os.replace(tmp, directory / f"{key}.json")
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
