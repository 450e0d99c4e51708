"""The conformance checks that run in one process: plain functions, one property each.

Every ``check_<property>(adapter)`` builds what it needs from ``adapter.tiny_config()`` (saved to a
temporary directory, never fetched from a hub), raises ``AssertionError`` listing every problem it
found, and returns None when the property holds. The distributed check lives in
:mod:`ppzoo.testing.step`; :mod:`ppzoo.testing.kit` decides which checks apply to an adapter.

The checks live in modules named for what they check, and this module names them all:
:mod:`ppzoo.testing.config_checks` (tiny config, layout, plan, validation),
:mod:`ppzoo.testing.loading_checks` (per-stage reads, buffers after meta init),
:mod:`ppzoo.testing.chain_checks` (stage chain, tied weights) and :mod:`ppzoo.testing.generate_check`;
what they share (:func:`resolving_to`, ``SEQ_LEN``) is in :mod:`ppzoo.testing.harness`.
"""

from ppzoo.testing.chain_checks import check_stage_chain, check_tied_weights, packed_batch
from ppzoo.testing.config_checks import check_layout, check_plan, check_tiny_config, check_validation

# NOTE: GENERATE_SEED and SAMPLING are not in __all__, but tests import them from here
from ppzoo.testing.generate_check import GENERATE_SEED, SAMPLING, check_generate  # noqa: F401
from ppzoo.testing.harness import SEQ_LEN, resolving_to
from ppzoo.testing.loading_checks import check_buffers_after_meta_init, check_stage_reads

__all__ = [
    "SEQ_LEN",
    "check_buffers_after_meta_init",
    "check_generate",
    "check_layout",
    "check_plan",
    "check_stage_chain",
    "check_stage_reads",
    "check_tied_weights",
    "check_tiny_config",
    "check_validation",
    "packed_batch",
    "resolving_to",
]
