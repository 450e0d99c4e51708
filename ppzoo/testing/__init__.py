"""The ppzoo conformance kit: checks every adapter, built-in or third-party, must pass.

Plain functions, usable from any test runner::

    from ppzoo.testing import check_adapter
    for result in check_adapter(MyAdapter()):
        print(result.check, result.status, result.reason or result.error or "")

With pytest, enable the opt-in plugin ``ppzoo.testing.pytest_plugin`` (see its docstring).
"""

from ppzoo.testing.census import ZooResult, zoo
from ppzoo.testing.chain_checks import check_stage_chain, check_tied_weights
from ppzoo.testing.config_checks import check_layout, check_plan, check_tiny_config, check_validation
from ppzoo.testing.dropout import check_dropout
from ppzoo.testing.harness import resolving_to
from ppzoo.testing.kit import CHECKS, Case, Check, CheckResult, cases, check_adapter, check_adapters
from ppzoo.testing.loading_checks import check_buffers_after_meta_init, check_stage_reads
from ppzoo.testing.step import check_distributed_step, distributed_step_problems

__all__ = [
    "CHECKS",
    "Case",
    "Check",
    "CheckResult",
    "ZooResult",
    "check_adapter",
    "check_adapters",
    "check_buffers_after_meta_init",
    "check_distributed_step",
    "check_dropout",
    "check_layout",
    "check_plan",
    "check_stage_chain",
    "check_stage_reads",
    "check_tied_weights",
    "check_tiny_config",
    "check_validation",
    "cases",
    "distributed_step_problems",
    "resolving_to",
    "zoo",
]
