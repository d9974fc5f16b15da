"""tests/stress/mq_verify.py with the C code built under AddressSanitizer and
UBSan (as tests/unit/test_fastpath_asan.py builds it): 4 queues, one C thread
per queue, every request type mixed and verified, for ``--seconds``.

    python -m tests.stress.mq_asan --seconds 600      (make stress: ASAN_MQ_SECONDS)

pykvm._native is built with PYKVM_SANITIZE=1 into a temporary folder and the
run goes on in a child that preloads libasan; any sanitizer report, a request
that fails or a byte that differs from the model fails it (exit 1).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASAN_OPTIONS = "detect_leaks=0:abort_on_error=0:exitcode=66"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1:exitcode=67"
BOOT = """
import importlib.util, os, sys
os.environ.pop("LD_PRELOAD")
spec = importlib.util.spec_from_file_location("pykvm._native", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["pykvm._native"] = mod
import pykvm
pykvm._native = mod
with open("/proc/self/maps") as f:
    assert "libasan" in f.read(), "libasan is not loaded"
from tests.stress import mq_verify
sys.exit(mq_verify.main(sys.argv[2:]))
"""


def libasan() -> str:
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                         text=True, check=True).stdout.strip()
    if not (os.path.isabs(out) and os.path.exists(out)):
        raise SystemExit("libasan.so not found: the sanitizer build needs gcc's libasan")
    return os.path.realpath(out)


def build(out: str) -> str:
    """pykvm._native with PYKVM_SANITIZE=1 under ``out``; the .so's path."""
    code = ("import sys; sys.path.insert(0, 'native'); import build; "
            f"build.ffibuilder.compile(tmpdir={out!r})")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYKVM_SANITIZE="1"))
    if p.returncode:
        raise SystemExit(f"sanitizer build failed:\n{p.stderr[-3000:]}")
    so = list(pathlib.Path(out).glob("pykvm/_native*.so"))
    assert len(so) == 1, so
    return str(so[0])


def run(so: str, seconds: float, seed: int = 1, timeout: float | None = None):
    """(exit status, output) of mq_verify under the sanitized module ``so``."""
    env = dict(os.environ, LD_PRELOAD=libasan(), ASAN_OPTIONS=ASAN_OPTIONS,
               UBSAN_OPTIONS=UBSAN_OPTIONS)
    p = subprocess.run([sys.executable, "-c", BOOT, so, "--seconds", str(seconds),
                        "--seed", str(seed)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout or seconds * 3 + 120)
    out = p.stdout + p.stderr
    rc = p.returncode
    if rc == 0 and ("ERROR: AddressSanitizer" in out or "runtime error" in out):
        rc = 1
    return rc, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tests.stress.mq_asan")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mq-asan-") as tmp:
        so = build(tmp)
        t0 = time.monotonic()
        rc, out = run(so, a.seconds, a.seed)
    print(out[-4000:].rstrip())
    print(f"mq-asan: {a.seconds:g} s asked, {time.monotonic() - t0:.0f} s in all under "
          f"ASan/UBSan: " + ("ok" if rc == 0 else f"FAILED (status {rc})"), flush=True)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
