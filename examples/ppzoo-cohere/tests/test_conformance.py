"""The conformance kit that every ppzoo adapter passes, run on this package's adapter.

The adapter is named, not imported: the test then also proves that ppzoo discovers it through the
``ppzoo`` entry point of the installed package (``pip install -e examples/ppzoo-cohere``).
"""

import pytest

pytestmark = pytest.mark.ppzoo_adapters("cohere")


def test_conformance(ppzoo_case):
    ppzoo_case.run()
