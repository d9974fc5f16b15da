"""Every fuzz target over its committed seeds, corpus and crashers (each crasher
is a regression case: it must now be an expected error or no error, within the
per-input bounds), then a few seconds of coverage-guided fuzzing from there."""
import os
import subprocess
import sys

import pytest

from tests.fuzz import harness

ROOT = os.path.dirname(os.path.dirname(harness.HERE))
TARGETS = harness.targets()
FUZZ_SECONDS = 3


def test_every_target_has_inputs():
    assert set(TARGETS) >= {"boot", "disk", "qcow2", "queue", "vhost_user", "nbd_export"}
    for name in TARGETS:
        assert harness.inputs(name), name


@pytest.mark.parametrize("name", TARGETS)
def test_replay(name):
    run = harness.bounded(harness.load(name))
    for path in harness.inputs(name):
        with open(path, "rb") as f:
            data = f.read()
        try:
            run(data)
        except Exception as e:
            raise AssertionError(f"{os.path.relpath(path, ROOT)}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_briefly(name):
    p = subprocess.run([sys.executable, "-m", "tests.fuzz.run", name, "--seconds",
                        str(FUZZ_SECONDS)], cwd=ROOT, capture_output=True, text=True,
                       errors="replace", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert f"fuzz {name}: " in p.stdout and "no crash" in p.stdout, p.stdout


class _Target:
    EXPECTED = (KeyError,)

    def __init__(self, action):
        self.one_input = action


def test_bounds_and_errors():
    run = harness.bounded(_Target(lambda data: {}[data]))
    run(b"x")                                   # an expected error is no crash
    with pytest.raises(IndexError):
        harness.bounded(_Target(lambda data: data[10]))(b"x")
    keep = []
    with pytest.raises(harness.BoundExceeded, match="peak RSS"):
        harness.bounded(_Target(lambda data: keep.append(b"\1" * (100 << 20))))(b"x")


def test_an_earlier_peak_hides_no_later_growth():
    """Each input is measured from its own start: one that frees 100 MiB leaves a
    high lifetime peak, and the next one's 80 MiB is still caught."""
    run = harness.bounded(_Target(lambda data: len(b"\1" * (data[0] << 20))))
    with pytest.raises(harness.BoundExceeded):
        run(bytes([100]))
    with pytest.raises(harness.BoundExceeded, match="peak RSS by (79|8[0-9]) MiB"):
        run(bytes([80]))
    run(bytes([8]))                             # small: within the bound
