"""Schedule names and kinds (``ppzoo.schedule``); running each schedule is tested in ``tests/test_runtime.py``
and, per adapter, by the conformance kit."""

from ppzoo.schedule import schedule_kind


def test_schedule_names_are_case_insensitive():
    assert schedule_kind("interleaved1f1b") == schedule_kind("Interleaved1F1B") == ("Interleaved1F1B", "loop")
    assert schedule_kind("DUALPIPEV") == ("DualPipeV", "v")
