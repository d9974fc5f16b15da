"""Shared helpers for the block-layer tests: qemu-img as the oracle, and a
synchronous wrapper that drives a BlockBackend through its public API
(memoryviews over bytearrays, the notifier eventfd, reap).

``disk_factory`` opens its disks on the matrix's ``engine`` (tests/conftest.py):
a test that takes it runs on python, threads, native (cache=none) and io_uring.
A bare ``Disk(...)`` is on the Python engine unless given ``engine=``."""
import os
import select
import shutil
import subprocess

import pytest

from pykvm.block import BlockBackend

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


@pytest.fixture
def qemu_tools():
    """qemu-img and qemu-io are the oracle; the Makefile installs them (qemu-utils),
    so their absence is a failure, never a skip."""
    assert QEMU_IMG and QEMU_IO, "qemu-img/qemu-io missing: run the Makefile (qemu-utils)"


needs_qemu = pytest.mark.usefixtures("qemu_tools")


def qemu_img(*args, check=True):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: rc={r.returncode} "
                             f"{r.stdout}{r.stderr}")
    return r


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stdout.lower() + r.stderr.lower(), \
        f"qemu-io {cmds}: {r.stdout}{r.stderr}"


def img(capsys, *args):
    """``pykvm img ARGS`` in this process: (exit status, stdout, stderr)."""
    from pykvm.img import main_img
    rc = main_img([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean(path):
    """qemu-img check finds nothing at all (exit 0)."""
    r = qemu_img("check", path, check=False)
    assert r.returncode == 0, f"qemu-img check {path}: rc={r.returncode}\n{r.stdout}{r.stderr}"


def as_raw(path, tmp_path, fmt=None):
    out = tmp_path / (os.path.basename(str(path)) + ".converted.raw")
    qemu_img("convert", *(["-f", fmt] if fmt else []), "-O", "raw", path, out)
    return out.read_bytes()


from tests.conftest import pattern  # noqa: E402  (one pattern for the matrix's images too)


def granular(disk, n: int) -> int:
    """``n`` in whole sectors when ``disk`` is opened with O_DIRECT (which takes
    only whole sectors, as a guest sends them), else ``n`` itself."""
    return n - n % 512 if disk.b.cache.direct else n


class Disk:
    """A BlockBackend driven synchronously, one request at a time (or several
    with submit/wait)."""

    def __init__(self, path, **kw):
        """``path``: an image file, or what BlockBackend takes (a dict of node
        options, a json: name)."""
        self.b = BlockBackend(path if isinstance(path, (str, dict)) else str(path), **kw)
        self.poller = select.poll()
        self.poller.register(self.b.notifier, select.POLLIN)
        self.token = 0
        self.done = {}

    def _tok(self):
        self.token += 1
        return self.token

    def wait(self, tokens, timeout=10.0):
        tokens = set(tokens)
        import time
        end = time.monotonic() + timeout
        while not tokens <= self.done.keys():
            assert time.monotonic() < end, f"requests {tokens - self.done.keys()} never completed"
            self.poller.poll(200)
            for t, r in self.b.reap():
                self.done[t] = r
        return {t: self.done.pop(t) for t in tokens}

    def _one(self, fn, *args):
        t = self._tok()
        fn(t, *args)
        return self.wait([t])[t]

    def read(self, offset, n, pieces=1):
        buf = bytearray(n)
        view = memoryview(buf)
        cuts = sorted({0, n} | {n * k // pieces for k in range(1, pieces)})
        iov = [view[a:b] for a, b in zip(cuts, cuts[1:])]
        r = self._one(self.b.readv, offset, iov)
        assert r >= 0, f"read {offset:#x}+{n:#x}: {os.strerror(-r)}"
        return bytes(buf)

    def write(self, offset, data, pieces=1):
        view = memoryview(bytearray(data))
        n = len(view)
        cuts = sorted({0, n} | {n * k // pieces for k in range(1, pieces)})
        iov = [view[a:b] for a, b in zip(cuts, cuts[1:])]
        return self._one(self.b.writev, offset, iov)

    def write_zeroes(self, offset, n, unmap=False):
        return self._one(self.b.write_zeroes, offset, n, unmap)

    def discard(self, offset, n):
        return self._one(self.b.discard, offset, n)

    def flush(self):
        return self._one(self.b.flush)

    def close(self):
        self.b.close()


@pytest.fixture
def disk_factory(engine):
    """``make(path, **kw)``: a Disk on a fresh engine of the matrix, in the
    engine's cache mode unless ``cache=`` says otherwise (aio=native with a
    cached mode is refused: such a test must narrow the matrix)."""
    disks = []

    def make(path, **kw):
        kw.setdefault("cache", engine.cache)
        if "engine" not in kw:
            kw["engine"] = engine(kw["cache"])
        d = Disk(path, **kw)
        disks.append(d)
        return d
    yield make
    for d in disks:
        if d.b.driver.fd >= 0 or getattr(d.b.driver, "mfd", -1) >= 0:
            d.close()
