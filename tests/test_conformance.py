"""The conformance matrix: every registered built-in adapter through every check of the kit.

``tests/conftest.py`` turns entry-point plugins off, so the registry holds the built-ins alone.
Select one cell with ``-k``, e.g. ``python -m pytest tests/test_conformance.py -k gemma2-stage_chain``.
"""

pytest_plugins = ["ppzoo.testing.pytest_plugin"]


def test_conformance(ppzoo_case):
    ppzoo_case.run()
