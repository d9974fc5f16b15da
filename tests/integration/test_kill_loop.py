"""The kill loop of `make stress` (tests/stress/kill_loop.py), 5 iterations per
combination: SIGKILL of the VMM while the workload guest writes and flushes;
after each, qcow2 images check clean (leaks repaired) and every block written
before the last completed flush verifies from the host."""
import io

import pytest

from tests.stress import kill_loop

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("combo", kill_loop.combos())
def test_kill_loop(combo):
    out = io.StringIO()
    results = kill_loop.run(5, seed=1, only=[combo], out=out)
    ok, failures = results[combo]
    assert ok == 5 and not failures, out.getvalue()
