"""Faults from a real NBD server under the nbd node, request by request: a
virtio-blk device on an NBD disk (nbdkit memory behind its error filter) is
driven from the host (tests/helpers/virtio_driver.py), on the Python path and
the C path. Each error is switched on by creating its trigger file
(error-*-file=) just before the request that must fail and off right after:
that request, and no other, completes with IOERR; the device keeps serving;
what was written before reads back. nbdkit's delay filter: slow replies are
waited for, not failed."""
import time

import pytest

from pykvm.virtio import blk as B
from tests.conftest import Engine
from tests.helpers.nbd_servers import nbd_server  # noqa: F401  (fixture)
from tests.helpers.virtio_driver import T_DISCARD, T_WRITE_ZEROES
from tests.unit.test_virtio_blk import Rig

OPS = ("pread", "pwrite", "zero", "trim")


def block(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(256)) * (n // 256)


@pytest.fixture(params=["python", "io_uring"])
def path(request):
    return request.param


def rig_on(uri: str, path: str, transport: str = "mmio") -> Rig:
    r = Rig({"driver": "raw", "file": {"driver": "nbd", "filename": uri}}, transport,
            Engine(path, "writeback"))
    assert (r.dev._fast is not None) == (path != "python")      # the C path, or not
    return r


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_exactly_the_request_the_server_fails_gets_ioerr(tmp_path, nbd_server, path, transport):
    trig = {op: tmp_path / f"fail-{op}" for op in OPS}
    srv = nbd_server("nbdkit", "memory", "size=8M",
                     *(f"error-{op}-rate=100%" for op in OPS),
                     *(f"error-{op}-file={trig[op]}" for op in OPS), filters=["error"])
    rig = rig_on(srv.uri, path, transport)
    d = rig.drv
    failed = 0

    def failing(op, request):
        """``request`` with the server failing every ``op`` while it runs."""
        nonlocal failed
        trig[op].touch()
        try:
            status = request()
        finally:
            trig[op].unlink()
        failed += 1
        return status

    try:
        a, b, c = block(4096, 1), block(4096, 2), block(8192, 3)
        assert d.write(0, a) == B.S_OK
        assert d.write(64, c) == B.S_OK
        # a write the server fails: IOERR, and the block keeps what it had
        assert failing("pwrite", lambda: d.write(0, b)) == B.S_IOERR
        assert d.read(0, 4096)[:2] == (B.S_OK, a)
        assert d.write(8, b) == B.S_OK                      # the next write goes through
        # a read the server fails: IOERR for it alone
        assert failing("pread", lambda: d.read(64, 8192)[0]) == B.S_IOERR
        assert d.read(64, 8192)[:2] == (B.S_OK, c)
        # write-zeroes the server fails: IOERR, nothing zeroed
        assert failing("zero", lambda: d.ranged(T_WRITE_ZEROES, 64, 8)) == B.S_IOERR
        assert d.read(64, 8192)[:2] == (B.S_OK, c)
        # a discard is a hint (virtio: the device may ignore it): one the server
        # refuses is done, not failed, and the data is still there
        trig["trim"].touch()
        assert d.ranged(T_DISCARD, 72, 8) == B.S_OK
        trig["trim"].unlink()
        assert d.read(64, 8192)[:2] == (B.S_OK, c)
        # an error for writes does not touch reads, nor the other way round
        trig["pwrite"].touch()
        assert d.read(0, 4096)[:2] == (B.S_OK, a)
        trig["pwrite"].unlink()
        trig["pread"].touch()
        assert d.write(16, c) == B.S_OK
        trig["pread"].unlink()
        # and what was written before all of it still reads back
        assert d.read(0, 4096)[:2] == (B.S_OK, a)
        assert d.read(8, 4096)[:2] == (B.S_OK, b)
        assert d.read(16, 8192)[:2] == (B.S_OK, c)
        assert d.ranged(T_WRITE_ZEROES, 64, 8) == B.S_OK
        assert d.read(64, 8192)[:2] == (B.S_OK, bytes(4096) + c[4096:])
        assert d.flush() == B.S_OK
        assert not d.needs_reset
        counters = rig.dev.counters()
        assert counters["errors"] == failed == 3
        assert rig.backend.driver.file.info_flags()["connected"] and srv.alive()
    finally:
        rig.close()
    # the server failed one request of each kind, no more (its own count)
    log = srv.stderr()
    assert {op: log.count(f"error into {op}") for op in OPS} == dict.fromkeys(OPS, 1), log


def test_slow_replies_are_waited_for_in_parallel(nbd_server, path):
    delay = 0.2
    srv = nbd_server("nbdkit", "memory", "size=8M", f"rdelay={int(delay * 1000)}ms",
                     f"wdelay={int(delay * 1000)}ms",
                     filters=["delay"])
    rig = rig_on(srv.uri, path)
    d = rig.drv
    try:
        t0 = time.monotonic()
        assert d.write(0, block(4096, 7)) == B.S_OK
        assert time.monotonic() - t0 >= delay
        # eight reads at once: answered together, not one after another
        status = [d.vq.arena.writable(1) for _ in range(8)]
        heads = [d.submit([d.header(0, 8 * k), d.vq.arena.writable(4096), status[k]])
                 for k in range(8)]
        t0 = time.monotonic()
        used = d.wait_used(8, timeout=10)
        took = time.monotonic() - t0
        assert sorted(h for h, _ in used) == sorted(heads)
        assert [rig.mem.read_u(gpa, 1) for gpa, _n, _w in status] == [B.S_OK] * 8
        assert delay * 0.9 <= took < 4 * delay, took
        assert rig.dev.counters()["errors"] == 0
        assert d.read(0, 4096)[:2] == (B.S_OK, block(4096, 7))
    finally:
        rig.close()
