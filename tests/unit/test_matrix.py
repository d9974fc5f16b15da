"""The fixture matrix of tests/conftest.py: what it collects, and what it refuses."""
import subprocess
import sys

import pytest

from tests.conftest import (AXES, CACHE_MODES, ENGINES, ROOT, Engine, default_cache,
                            engine_cache_valid)


def collect(*args) -> tuple[list[str], str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    return ids, r.stdout + r.stderr


def test_native_pairs_only_with_o_direct():
    pairs = {(e, c) for e in ENGINES for c in CACHE_MODES if engine_cache_valid(e, c)}
    assert {c for e, c in pairs if e == "native"} == {"none", "directsync"}
    assert all((e, c) in pairs for e in ENGINES if e != "native" for c in CACHE_MODES)
    assert all(engine_cache_valid(e, default_cache(e)) for e in ENGINES)
    with pytest.raises(AssertionError):
        Engine("native", "writeback")


def test_engine_and_cache_mode_are_collected_as_valid_pairs():
    ids, out = collect("tests/block/test_backend.py::test_the_matrix_runs_on_the_engine_it_names")
    params = sorted(i.split("[")[1].rstrip("]") for i in ids)
    want = sorted(f"{e}-{c}-{f}" for e in ENGINES for c in CACHE_MODES
                  if engine_cache_valid(e, c) for f in AXES["image_format"])
    assert params == want, out
    assert "deselected" not in out


def test_what_does_not_apply_is_not_collected():
    """cache=unsafe on the C engines: native is not among them (no deselection,
    no skip); the Python-only observers are collected on python only."""
    ids, out = collect("tests/unit/test_fastpath_blk.py::test_unsafe_cache_ignores_flushes",
                       "tests/unit/test_virtio_blk.py::test_flush_reaches_fdatasync",
                       "tests/unit/test_queue.py::test_activate_refuses_an_address_past_64_bits")
    assert sorted(i.split("::")[1] for i in ids) == [
        "test_activate_refuses_an_address_past_64_bits[python]",
        "test_flush_reaches_fdatasync[python-mmio]", "test_flush_reaches_fdatasync[python-pci]",
        "test_unsafe_cache_ignores_flushes[io_uring-unsafe-mmio]",
        "test_unsafe_cache_ignores_flushes[io_uring-unsafe-pci]",
        "test_unsafe_cache_ignores_flushes[threads-unsafe-mmio]",
        "test_unsafe_cache_ignores_flushes[threads-unsafe-pci]"], out
    assert "deselected" not in out and "skipped" not in out


def test_a_bad_matrix_marker_is_a_usage_error(tmp_path):
    t = tmp_path / "test_bad_marker.py"
    t.write_text("import pytest\n\n@pytest.mark.matrix(engine=['posix-aio'])\n"
                 "def test_x(engine):\n    pass\n")
    _, out = collect("--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
                     "--confcutdir", str(ROOT / "tests"), "-p", "tests.conftest", str(t))
    assert "UsageError" in out and "matrix engine: ['posix-aio']" in out, out
    assert "no tests collected" in out, out
