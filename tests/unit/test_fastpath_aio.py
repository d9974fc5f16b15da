"""The C AIO engines (native/aio.c through pykvm/aio/native.py) against
PythonEngine: the same requests give the same results, on every engine; and
BlockBackend runs on them unchanged (raw and qcow2)."""
import errno
import mmap
import os
import select
import subprocess

import pytest

from pykvm._native import lib
from pykvm.aio import FALLOCATE, FLUSH, READ, WRITE, AioRequest, PythonEngine, native
from pykvm.aio.native import C_ENGINES, EngineUnavailable, NativeEngine
from tests.block.conftest import Disk

PUNCH = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE
SIZE = 1 << 20


def run(engine, requests, timeout=10.0):
    """Submit, wait for every token; {token: result}."""
    engine.submit(requests)
    want = {r.token for r in requests}
    got = {}
    p = select.poll()
    p.register(engine.notifier, select.POLLIN)
    while not want <= got.keys():
        assert p.poll(timeout * 1000), f"{want - got.keys()} never completed"
        got.update(engine.reap())
    return got


def pattern(n, seed=0):
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


@pytest.fixture
def aio(engine):
    """A fresh engine of the matrix (tests/conftest.py: python, threads, native
    with cache=none, io_uring), 64 deep: test_more_requests_than_the_depth
    gives it more."""
    e = engine(depth=64)
    assert e.name == engine.name
    assert isinstance(e, PythonEngine if engine.name == "python" else NativeEngine)
    yield e
    e.close()


@pytest.fixture
def direct(engine):
    return engine.direct  # aio=native (Linux AIO) is only asynchronous with O_DIRECT


@pytest.fixture
def fd(tmp_path, direct):
    path = tmp_path / "f"
    path.write_bytes(pattern(SIZE))
    f = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    yield f
    os.close(f)


def buffers(*sizes):
    """Page-aligned memoryviews (O_DIRECT-safe) of the given sizes."""
    m = mmap.mmap(-1, sum(-(-n // 4096) * 4096 for n in sizes) or 4096)
    views, pos = [], 0
    for n in sizes:
        views.append(memoryview(m)[pos:pos + n])
        pos += -(-n // 4096) * 4096
    return views


def test_read_write_with_several_buffers(aio, fd):
    src = buffers(4096, 8192)
    src[0][:] = pattern(4096, 1)
    src[1][:] = pattern(8192, 2)
    assert run(aio, [AioRequest(WRITE, fd, 65536, src, token=7)]) == {7: 12288}
    dst = buffers(8192, 4096)
    assert run(aio, [AioRequest(READ, fd, 65536, dst, token=8)]) == {8: 12288}
    assert bytes(dst[0]) + bytes(dst[1]) == pattern(4096, 1) + pattern(8192, 2)


def test_read_at_the_end_of_the_file_is_short(aio, fd):
    dst = buffers(8192)
    assert run(aio, [AioRequest(READ, fd, SIZE - 4096, dst, token=1)]) == {1: 4096}
    assert run(aio, [AioRequest(READ, fd, SIZE, buffers(4096), token=2)]) == {2: 0}


def test_flush_and_fallocate(aio, fd):
    got = run(aio, [AioRequest(FLUSH, fd, token=1),
                       AioRequest(FALLOCATE, fd, 0, token=2, mode=PUNCH, length=65536)])
    assert got == {1: 0, 2: 0}
    dst = buffers(65536)
    run(aio, [AioRequest(READ, fd, 0, dst, token=3)])
    assert bytes(dst[0]) == bytes(65536)


def test_errors_come_back_as_negative_errno(aio, fd):
    got = run(aio, [AioRequest(READ, 12345, 0, buffers(4096), token=1),
                       AioRequest(FLUSH, 12345, token=2),
                       AioRequest(FALLOCATE, fd, 0, token=3, mode=0x7fff0000, length=4096)])
    assert got[1] == -errno.EBADF and got[2] == -errno.EBADF
    assert got[3] in (-errno.EOPNOTSUPP, -errno.EINVAL)


def test_more_requests_than_the_depth(aio, fd):
    """The wrapper holds back what the engine cannot take yet."""
    bufs = buffers(*[4096] * 200)
    got = run(aio, [AioRequest(READ, fd, 4096 * i, [b], token=100 + i)
                       for i, b in enumerate(bufs)])
    assert got == {100 + i: 4096 for i in range(200)}
    content = pattern(SIZE)
    for i, b in enumerate(bufs):
        assert bytes(b) == content[4096 * i:4096 * (i + 1)]


def test_batch_of_mixed_requests_same_results_as_python(tmp_path, aio, direct):
    """One batch, the same on PythonEngine and on this engine, twin files."""
    results = []
    for e in (PythonEngine(), aio):
        path = tmp_path / f"twin-{id(e)}"
        path.write_bytes(pattern(SIZE))
        f = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
        try:
            w = buffers(4096, 4096)
            w[0][:] = pattern(4096, 9)
            w[1][:] = pattern(4096, 10)
            r = buffers(4096, 12288)
            reqs = [AioRequest(WRITE, f, 8192, w, token=1),
                    AioRequest(READ, f, SIZE - 8192, r, token=2),
                    AioRequest(FALLOCATE, f, 65536, token=3, mode=PUNCH, length=8192),
                    AioRequest(FLUSH, f, token=4)]
            got = run(e, reqs)
            results.append((got, bytes(r[0]) + bytes(r[1])[:4096], path.read_bytes()))
        finally:
            os.close(f)
            if e is not aio:
                e.close()
    assert results[0] == results[1]


def test_native_needs_o_direct():
    with pytest.raises(EngineUnavailable, match="cache=none or cache=directsync"):
        native.open_engine("native", direct=False)
    native.open_engine("native", direct=True).close()
    with pytest.raises(EngineUnavailable, match="unknown engine"):
        native.open_engine("posix-aio")


def test_every_engine_works_here():
    """This host has io_uring, Linux AIO and threads: none may be missing."""
    for name in C_ENGINES:
        assert native.probe(name) is None, name
    assert native.default_engine(direct=True) == native.PREFERENCE[0]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_block_backend_runs_on_every_engine(tmp_path, fmt, engine):
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "4M"], check=True)
    d = Disk(path, fmt=fmt, cache=engine.cache, engine=engine(depth=64))
    try:
        assert d.b.engine.name == engine.name
        data = pattern(65536, 5)
        assert d.write(4096, data, pieces=3) == len(data)
        assert d.flush() == 0
        assert d.read(4096, 65536, pieces=2) == data
        assert d.write_zeroes(4096, 8192) == 0
        data = bytes(8192) + data[8192:]
        assert d.read(0, 16384) == bytes(4096) + data[:12288]
    finally:
        d.close()
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
                   check=True)
    assert out.read_bytes()[4096:4096 + 65536] == data


def test_default_engine_falls_back_with_one_line(monkeypatch, caplog):
    why = {"io_uring": "aio=io_uring: the kernel lacks IORING_OP_READV", "native": None}
    monkeypatch.setattr(native, "probe", lambda name: why.get(name))
    with caplog.at_level("INFO", logger="pykvm"):
        assert native.default_engine(direct=True) == "native"
        assert native.default_engine(direct=False) == "threads"  # native needs O_DIRECT
    assert [r.getMessage() for r in caplog.records] == [
        "aio=io_uring: the kernel lacks IORING_OP_READV; using aio=native",
        "aio=io_uring: the kernel lacks IORING_OP_READV; using aio=threads"]
    caplog.clear()
    monkeypatch.setattr(native, "probe", lambda name: None)
    assert native.default_engine(direct=False) == "io_uring" and not caplog.records
