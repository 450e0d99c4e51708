import contextlib
import multiprocessing.process
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator

import pytest

# Tests see only the built-in adapters plus what a test registers itself, unless a test
# enables entry points on purpose.
os.environ.setdefault("PPZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# NOTE: tiny models: one intra-op thread is many times faster than contending for two cores
# with the other pytest-xdist worker.
torch.set_num_threads(1)

#: the marker of every test that starts processes; ``-m "not distributed"`` is the fast loop
DISTRIBUTED = "distributed"


@pytest.fixture(autouse=True)
def _fresh_registry():
    from ppzoo import registry

    registry.reset()
    yield
    registry.reset()


# -- the fast loop starts no process ------------------------------------------------------------
@contextlib.contextmanager
def _no_processes(item: pytest.Item) -> Iterator[list[str]]:
    """Refuse, for a test without the marker, anything that starts a process or a process group.

    NOTE: setup is guarded too: most multi-process tests start their group in a module-scoped
    fixture, which runs in the setup of the module's first test.
    """
    started: list[str] = []

    def refuse(what: str):
        started.append(what)
        raise RuntimeError(
            f"{item.nodeid} {what} but is not marked {DISTRIBUTED!r}; mark it with "
            f"pytest.mark.{DISTRIBUTED} (the fast loop, -m 'not {DISTRIBUTED}', starts no process)"
        )

    def process_start(self, *args, **kwargs):
        refuse(f"starts a process ({self.name})")

    original_popen_init = subprocess.Popen.__init__

    def popen_init(self, args, *rest, **kwargs):
        # NOTE: short-lived tools (uname, git) are fine; a Python process imports torch for seconds
        argv = shlex.split(args) if isinstance(args, str) else [os.fspath(a) for a in args]
        if argv and (
            argv[0] == sys.executable or os.path.basename(argv[0]).startswith(("python", "torchrun", "ppzoo"))
        ):
            refuse(f"starts a Python subprocess ({argv[:3]!r})")
        original_popen_init(self, args, *rest, **kwargs)

    def init_process_group(*args, **kwargs):
        refuse("initialises a torch.distributed process group")

    patches = [
        (multiprocessing.process.BaseProcess, "start", process_start),
        (subprocess.Popen, "__init__", popen_init),
        (dist, "init_process_group", init_process_group),
        (dist.distributed_c10d, "init_process_group", init_process_group),
    ]
    with pytest.MonkeyPatch.context() as mp:
        for owner, name, replacement in patches:
            mp.setattr(owner, name, replacement)
        yield started


def _guarded(item: pytest.Item):
    if item.get_closest_marker(DISTRIBUTED) is not None:
        return contextlib.nullcontext([])
    return _no_processes(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _guarded(item) as started:
        result = yield
    if started:  # refused, even where the code under test caught the error
        pytest.fail(started[0] + f" in a test not marked {DISTRIBUTED!r}", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _guarded(item) as started:
        result = yield
    if started:
        pytest.fail(started[0] + f" in a test not marked {DISTRIBUTED!r}", pytrace=False)
    return result


# -- one worker per module's process group ---------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``-n 2 --dist loadgroup``, a module's multi-process tests all go to one worker.

    NOTE: they share the process group a module-scoped fixture starts; split over two workers, each
    worker would start it (and import torch and transformers in every process of it) again.
    """
    for item in items:
        if item.get_closest_marker(DISTRIBUTED) is not None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
