"""The faults suite's tally: each test counts the faults it injected once it has checked that the
run survived them (an identical result or a clear error, nothing lost). Each test's counts travel
with its report (so that they add up under pytest-xdist too); tests/conftest.py prints the sums
at the end of the run, and the README's "Reliability" section quotes those lines."""

import collections

import pytest

TALLY: collections.Counter = collections.Counter()


@pytest.fixture
def tally() -> collections.Counter:
    """Add to a key of FAULT_KINDS (tests/conftest.py) after the assertions that show the fault
    was survived."""
    return TALLY


@pytest.fixture(autouse=True)
def _report_tally(request):
    """What this test added to the tally, attached to its report (user_properties)."""
    before = TALLY.copy()
    yield
    request.node.user_properties.append(("tally", dict(TALLY - before)))
