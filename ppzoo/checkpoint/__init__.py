"""Checkpoints: reading safetensors, loading a stage, atomic writes, the Hugging Face export, training state.

Each module holds one concept and takes only what it needs (stage modules, adapter, config, mesh,
dtype, directories), never the ``Pipeline``:

- :mod:`~ppzoo.checkpoint.reading`: :func:`resolve`, :class:`Checkpoint` (index, shard files, reads)
- :mod:`~ppzoo.checkpoint.loading`: :func:`load_stage_weights`, a stage's tensors into its parameters
- :mod:`~ppzoo.checkpoint.atomic`: :func:`write_atomically` and :func:`agree` across ranks
- :mod:`~ppzoo.checkpoint.export`: :func:`save_pretrained` in Hugging Face format
- :mod:`~ppzoo.checkpoint.state`: :func:`save_state` / :func:`load_state`, training state under any split
"""

from ppzoo.checkpoint.atomic import agree, write_atomically
from ppzoo.checkpoint.errors import CheckpointError
from ppzoo.checkpoint.export import SIDE_FILES, parse_size, save_pretrained
from ppzoo.checkpoint.loading import load_stage_weights
from ppzoo.checkpoint.reading import INDEX_FILE, SINGLE_FILE, Checkpoint, Reader, resolve
from ppzoo.checkpoint.tensors import persistent_tensors

#: public names loaded on first use: training state imports torch.distributed.checkpoint (about a
#: second), which reading, loading and exporting weights (the conformance kit, ``ppzoo check``) do not need
_LAZY = {name: "ppzoo.checkpoint.state" for name in ("load_state", "rank_module", "save_state", "saved_step")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppzoo.checkpoint' has no attribute {name!r}")


__all__ = [
    "INDEX_FILE",
    "SIDE_FILES",
    "SINGLE_FILE",
    "Checkpoint",
    "CheckpointError",
    "Reader",
    "agree",
    "load_stage_weights",
    "load_state",
    "parse_size",
    "persistent_tensors",
    "rank_module",
    "resolve",
    "save_pretrained",
    "save_state",
    "saved_step",
    "write_atomically",
]
