"""The C fast path under AddressSanitizer and UBSan.

Builds pykvm._native with PYKVM_SANITIZE=1 into a temporary directory and
runs the fast-path tests against it in a child process: the queue tests on
both twins and the C queue's parity tests (hostile rings and the differential
fuzz included), the engines, the device tests on the C I/O thread, on
io_uring and threads (their Python-path variants, in the same files, run
too), throttling (its C twin and the requests blk.c holds) and the write
log (native/writelog.c, from both paths). Python itself
is not instrumented, so the child preloads libasan (it must come first in the
process, but not in its children) and does not check leaks (the interpreter
keeps much for good); any sanitizer report fails the run.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ["tests/unit/test_queue.py", "tests/unit/test_fastpath_parity.py",
         "tests/unit/test_fastpath_aio.py", "tests/unit/test_virtio_blk.py",
         "tests/unit/test_fastpath_blk.py", "tests/unit/test_throttle.py",
         "tests/unit/test_blkdebug.py", "tests/unit/test_writelog_paths.py"]
SELECT = "not native"  # (time) the other engines cover the C I/O thread
BOOT = """
import importlib.util, os, sys
os.environ.pop("LD_PRELOAD")  # loaded here; child processes (qemu-img) hang with it
spec = importlib.util.spec_from_file_location("pykvm._native", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["pykvm._native"] = mod
import pykvm
pykvm._native = mod
from pykvm._native import lib
assert sys.modules["pykvm._native"].__file__ == sys.argv[1]
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def _libasan() -> str:
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert os.path.isabs(out) and os.path.exists(out), \
        "libasan.so not found: the sanitizer build needs gcc's libasan (libasan8 on Debian 12)"
    return os.path.realpath(out)


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    out = tmp_path_factory.mktemp("asan")
    env = dict(os.environ, PYKVM_SANITIZE="1")
    code = ("import sys; sys.path.insert(0, 'native'); import build; "
            f"build.ffibuilder.compile(tmpdir={str(out)!r})")
    build = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    so = list(out.glob("pykvm/_native*.so"))
    assert len(so) == 1, so
    return so[0]


def test_fast_path_tests_pass_under_asan_and_ubsan(sanitized):
    env = dict(os.environ,
               LD_PRELOAD=_libasan(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=66",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=67")
    r = subprocess.run([sys.executable, "-c", BOOT, str(sanitized), "-q", "-x", "-p",
                        "no:cacheprovider", "-k", SELECT, *TESTS],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, tail
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) > 400, tail  # the selection did run


def test_multiqueue_run_under_asan_and_ubsan(sanitized):
    """make stress's multiqueue run (tests/stress/mq_asan.py), for 5 s: 4 queues
    on 4 C threads, reads, writes, flushes, discards and write-zeroes, verified."""
    from tests.stress import mq_asan
    rc, out = mq_asan.run(str(sanitized), 5)
    assert rc == 0, out[-4000:]
    m = re.search(r"mq-verify: read (\d+), write (\d+), flush (\d+), discard (\d+), "
                  r"write-zeroes (\d+),.*: ok", out)
    assert m and all(int(n) > 0 for n in m.groups()), out[-4000:]
