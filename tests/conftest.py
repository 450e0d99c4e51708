import os

import pytest

# Tests see only the built-in adapters plus what a test registers itself, unless a test
# enables entry points on purpose.
os.environ.setdefault("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


import torch  # noqa: E402

# NOTE: tiny models: one intra-op thread is many times faster than contending for two cores
# with the other pytest-xdist worker.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_registry():
    from ppzoo import registry

    registry.reset()
    yield
    registry.reset()
