"""The conformance kit's checks as data: which apply to an adapter, and running them without pytest.

``cases(adapter)`` generates one :class:`Case` per check, already marked skipped (with the reason)
when the adapter's declared capabilities rule it out, or expected to fail (with the reason) when
the caller says so. ``check_adapter`` and ``check_adapters`` run the cases and return one
:class:`CheckResult` per check; the pytest plugin turns the same cases into test items.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ppzoo.adapter import Adapter
from ppzoo.capabilities import Capability
from ppzoo.testing.chain_checks import check_stage_chain, check_tied_weights
from ppzoo.testing.config_checks import check_layout, check_plan, check_tiny_config, check_validation
from ppzoo.testing.dropout import check_dropout
from ppzoo.testing.generate_check import check_generate
from ppzoo.testing.loading_checks import check_buffers_after_meta_init, check_stage_reads
from ppzoo.testing.step import check_distributed_step, distributed_step_problems

__all__ = ["CHECKS", "Case", "Check", "CheckResult", "check_adapter", "cases", "check_adapters"]


@dataclass(frozen=True)
class Check:
    """One conformance property.

    Attributes:
        name: short id, used in test ids (``<adapter>-<name>``) and ``expected_failures``.
        function: ``function(adapter)`` raises ``AssertionError`` naming every problem.
        requires: capabilities an adapter must declare for the check to apply.
    """

    name: str
    function: Callable[..., None]
    requires: frozenset[Capability] = frozenset()

    @property
    def description(self) -> str:
        return " ".join((self.function.__doc__ or "").split("\n\n")[0].split())


CHECKS: tuple[Check, ...] = (
    Check("tiny_config", check_tiny_config),
    Check("layout", check_layout),
    Check("plan", check_plan),
    Check("validation", check_validation),
    Check("stage_reads", check_stage_reads),
    Check("buffers", check_buffers_after_meta_init),
    Check("stage_chain", check_stage_chain),
    Check("dropout", check_dropout),
    Check("tied_weights", check_tied_weights, frozenset({Capability.TIED_EMBEDDINGS})),
    Check("distributed_step", check_distributed_step),
    Check("generate", check_generate),
)
_BY_NAME = {check.name: check for check in CHECKS}


@dataclass(frozen=True)
class Case:
    """One check for one adapter, with what the caller and the capabilities decided about it."""

    adapter: Adapter
    check: Check
    skip: str | None = None
    xfail: str | None = None

    @property
    def id(self) -> str:
        return f"{self.adapter.name}-{self.check.name}"

    def run(self, **kwargs) -> None:
        """Run the check; raises ``AssertionError`` (or whatever broke) when it fails."""
        self.check.function(self.adapter, **kwargs)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        adapter: the adapter's name.
        check: the check's name.
        status: ``"passed"``, ``"failed"``, ``"skipped"`` or ``"xfailed"`` (failed as expected).
        reason: why it was skipped or expected to fail; None otherwise.
        error: what went wrong for ``"failed"`` and ``"xfailed"``; None otherwise.
    """

    adapter: str
    check: str
    status: str
    reason: str | None = None
    error: str | None = None


def _capability_skip(adapter: Adapter, check: Check) -> str | None:
    missing = sorted(c.value for c in check.requires if c not in adapter.capabilities)
    if missing:
        return f"adapter {adapter.name!r} does not declare {', '.join(map(repr, missing))} in its capabilities"
    return None


def _skip_reason(adapter: Adapter, check: Check) -> str | None:
    # NOTE: a skip for want of a capability is the adapter's declaration; one for want of a
    # backend is this machine's, and wins over the adapter's own expected failure.
    missing = _capability_skip(adapter, check)
    if missing:
        return missing
    if check.function is check_generate:
        problem = adapter.generation_problem(adapter.tiny_config())
        if problem is not None:
            return f"adapter {adapter.name!r} does not support generation: {problem}"
    if check.function is check_distributed_step:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_gloo_available()):
            return "this torch build has no gloo backend for CPU process groups"
    return None


def cases(
    adapter: Adapter, *, expected_failures: Mapping[str, str] | None = None, select: Sequence[str] | None = None
) -> Iterator[Case]:
    """Every conformance check for ``adapter``, in order, as :class:`Case` objects.

    Args:
        adapter: the adapter under test; its own ``expected_failures`` apply too.
        expected_failures: ``{check name: reason}`` for checks known to fail; each becomes a strict
            expected failure, so a fix is noticed. They add to (and override the reasons of) the
            adapter's own declaration.
        select: only these checks (by name); default all.

    Raises:
        ValueError: ``expected_failures`` (the caller's or the adapter's) or ``select`` names an
            unknown check, or ``expected_failures`` names one whose capability the adapter does
            not declare.
    """
    declared = dict(adapter.expected_failures)
    expected = {**declared, **(expected_failures or {})}
    for what, names in (
        (f"{type(adapter).__name__}.expected_failures", declared),
        ("expected_failures", expected),
        ("select", select or ()),
    ):
        unknown = sorted(set(names) - set(_BY_NAME))
        if unknown:
            raise ValueError(f"{what} names unknown checks {unknown}; the checks are {', '.join(_BY_NAME)}")
    for check in CHECKS:
        if select is not None and check.name not in select:
            continue
        skip = _skip_reason(adapter, check)
        if skip and check.name in expected:
            if _capability_skip(adapter, check) or check.name not in declared:
                raise ValueError(f"expected_failures names {check.name!r}, which does not apply: {skip}")
        yield Case(adapter, check, skip=skip, xfail=None if skip else expected.get(check.name))


def _outcome(case: Case, **kwargs) -> CheckResult:
    name, check = case.adapter.name, case.check.name
    if case.skip:
        return CheckResult(name, check, "skipped", reason=case.skip)
    try:
        case.run(**kwargs)
    except Exception as exc:  # noqa: BLE001 - a record per check, whatever broke
        error = str(exc) if isinstance(exc, AssertionError) else traceback.format_exc()
        if case.xfail:
            return CheckResult(name, check, "xfailed", reason=case.xfail, error=error)
        return CheckResult(name, check, "failed", error=error)
    if case.xfail:
        return CheckResult(
            name,
            check,
            "failed",
            reason=case.xfail,
            error=f"passed, but was expected to fail ({case.xfail}); remove it from expected_failures",
        )
    return CheckResult(name, check, "passed")


def check_adapter(
    adapter: Adapter, *, expected_failures: Mapping[str, str] | None = None, select: Sequence[str] | None = None
) -> list[CheckResult]:
    """Run every conformance check for ``adapter`` (no pytest needed).

    Args:
        adapter: the adapter under test.
        expected_failures: ``{check name: reason}``; see :func:`checks`.
        select: only these checks (by name); default all.

    Returns:
        One :class:`CheckResult` per check, in order.
    """
    return check_adapters([adapter], expected_failures={adapter.name: dict(expected_failures or {})}, select=select)


def check_adapters(
    adapters: Sequence[Adapter],
    *,
    expected_failures: Mapping[str, Mapping[str, str]] | None = None,
    select: Sequence[str] | None = None,
) -> list[CheckResult]:
    """Run every conformance check for each adapter; one process group runs all distributed steps.

    Args:
        adapters: the adapters under test (unique names).
        expected_failures: ``{adapter name: {check name: reason}}``.
        select: only these checks (by name); default all.

    Returns:
        One :class:`CheckResult` per adapter and check, adapter by adapter.
    """
    expected = expected_failures or {}
    unknown = sorted(set(expected) - {a.name for a in adapters})
    if unknown:
        raise ValueError(f"expected_failures names adapters {unknown} that are not being checked")
    all_cases = [case for a in adapters for case in cases(a, expected_failures=expected.get(a.name), select=select)]
    stepped = [c.adapter for c in all_cases if c.check.name == "distributed_step" and not c.skip]
    try:
        step_problems = distributed_step_problems(stepped) if stepped else {}
    except Exception:  # noqa: BLE001 - reported on each distributed check, the rest still run
        step_problems = {a.name: [f"the process group could not run:\n{traceback.format_exc()}"] for a in stepped}
    results = []
    for case in all_cases:
        extra = (
            {"problems": step_problems[case.adapter.name]}
            if case.check.name == "distributed_step" and not case.skip
            else {}
        )
        results.append(_outcome(case, **extra))
    return results
