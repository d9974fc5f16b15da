"""virtio-blk over the C fast path (native/blk.c), on every C engine.

The device tests of tests/unit/test_virtio_blk.py run on every engine of the
matrix (tests/conftest.py), the C ones included; here, on the C engines only
(threads, native with cache=none, io_uring: the C I/O thread serves the
disk), what only the C path has: its counters, batching, the punt queue,
forwarded interrupts, the mapping table, and a differential run of the same
requests through the Python and the C path.
"""
import errno
import logging
import os
import struct
import time

import pytest

from pykvm._native import ffi, lib
from pykvm.virtio import blk as B
from pykvm.virtio import fastpath
from tests.conftest import C_ENGINES, Engine
from tests.helpers.virtio_driver import (T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
                                         T_WRITE_ZEROES, wait_fd)
from tests.unit.test_virtio_blk import DISK, Rig, exercise_every_queue, pattern

pytestmark = pytest.mark.matrix(engine=C_ENGINES)


def aligned_write(d, sector, data):
    """A write whose data buffer is page-aligned (O_DIRECT needs no bounce)."""
    buf = (d.vq.arena.alloc(len(data), data, align=4096), len(data), False)
    return d.request([d.header(T_OUT, sector), buf, d.vq.arena.writable(1)])[0]


def aligned_read(d, sector, n):
    gpa = d.vq.arena.alloc(n, bytes(n), align=4096)
    status, _ = d.request([d.header(T_IN, sector), (gpa, n, True), d.vq.arena.writable(1)])
    return status, d.mem.read(gpa, n)


def test_the_c_path_serves_these_tests(rig):
    assert rig.dev._fast is not None
    assert rig.drv.read(0, 512)[0] == B.S_OK
    assert rig.dev.counters()["requests"] == 1


# -- counters -------------------------------------------------------------------------

def test_flush_is_counted(rig):
    assert rig.drv.flush() == B.S_OK
    assert rig.dev.counters()["flushes"] == 1


def test_writethrough_flushes_each_write(image, transport, engine):
    r = Rig(image, transport, engine)
    try:
        assert aligned_write(r.drv, 8, bytes(512)) == B.S_OK
        assert r.dev.counters()["flushes"] == 0      # writeback: no flush per write
        r.drv.t.write_config(32, 1, 0)               # guest turns the cache off
        assert aligned_write(r.drv, 8, pattern(512, 3)) == B.S_OK
        assert r.dev.counters()["flushes"] == 1      # writethrough: each write flushed
        assert r.dev.counters()["punts"] == 0
        assert image.read_bytes()[8 * 512:9 * 512] == pattern(512, 3)
    finally:
        r.close()


@pytest.mark.matrix(cache_mode="unsafe")     # (not aio=native: it needs O_DIRECT)
def test_unsafe_cache_ignores_flushes(image, transport, engine, cache_mode):
    mem_rig = Rig(image, transport, engine)
    assert mem_rig.backend.cache_name == "unsafe" and mem_rig.dev._fast is not None
    try:
        assert mem_rig.drv.flush() == B.S_OK
        assert mem_rig.dev.counters()["flushes"] == 0
    finally:
        mem_rig.close()


def test_event_idx_suppresses_interrupts_in_c(image, transport, engine):
    r = Rig(image, transport, engine)
    try:
        d = r.drv
        d.vq.set_used_event(5)
        for i in range(3):
            d.submit([d.header(T_FLUSH), d.vq.arena.writable(1)])
        assert not wait_fd(d.t.interrupt_fd(0), 0.5)
        assert len(d.vq.reap()) == 3
        c = r.dev.counters()
        assert c["interrupts"] == 0 and c["interrupts_suppressed"] >= 1
    finally:
        r.close()


def test_batches_many_requests_per_submission(rig, image):
    d = rig.drv
    bufs = []
    for i in range(20):
        data = (d.vq.arena.alloc(4096, align=4096), 4096, True)
        bufs.append((i, data))
        d.submit([d.header(T_IN, i * 8), data, d.vq.arena.writable(1)], notify=False)
    d.t.notify(0)
    assert len(d.wait_used(20)) == 20
    c = rig.dev.counters()
    assert c["requests"] == 20 and c["bytes_read"] == 20 * 4096 and c["punts"] == 0
    assert c["batches"] < c["submitted"] == 20
    content = image.read_bytes()
    for i, (gpa, n, _) in bufs:
        assert rig.mem.read(gpa, n) == content[i * 4096:(i + 1) * 4096]


# -- interrupt coalescing ----------------------------------------------------------------

@pytest.mark.parametrize("in_flight, since, limit, wait", [
    (0, 0, 10**9, False),           # the engine is idle: decide now
    (5, 10**9 - 1, 10**9, True),    # requests coming, interrupted a moment ago
    (5, 10**9, 10**9, False),       # the time is up
    (5, 0, 0, False),               # coalescing off
    (1, 2**63, 10**9, False),       # the first interrupt (last one at time 0)
])
def test_irq_wait_policy(in_flight, since, limit, wait):
    assert bool(lib.pykvm_blk_irq_wait(in_flight, since, limit)) is wait


def test_irq_coalesce_ns_reaches_the_c_path(image, engine):
    from pykvm.machine import DiskSpec
    spec = DiskSpec.parse(f"file={image},irq-coalesce-ns=250000")
    assert spec.irq_coalesce_ns == 250000 and DiskSpec.parse(str(image)).irq_coalesce_ns is None
    r = Rig(image, "mmio", engine, irq_coalesce_ns=spec.irq_coalesce_ns)
    try:
        assert r.dev._fast.irq_coalesce_ns == 250000
    finally:
        r.close()


def test_coalescing_never_delays_a_lone_request(image, transport, engine):
    import time
    r = Rig(image, transport, engine, irq_coalesce_ns=2_000_000_000)
    try:
        for i in range(3):   # each completes with the engine idle: interrupted at once
            t0 = time.monotonic()
            aligned_read(r.drv, i * 8, 4096)
            assert time.monotonic() - t0 < 1.0
        c = r.dev.counters()
        assert c["completions"] == 3 and c["punts"] == 0 and c["interrupts_deferred"] == 0
    finally:
        r.close()


def test_coalescing_takes_many_completions_per_interrupt(image, transport, engine):
    """20 reads at once with 2 s of coalescing: one interrupt at the first
    completion, the rest held back until the engine has nothing left (well
    before the 2 s), then one more. No polling: a polling thread could take the
    chains as they are published, in several rounds, and the engine would
    empty between them (seen under ASan on a loaded host)."""
    import time
    r = Rig(image, transport, engine, irq_coalesce_ns=2_000_000_000, poll_max_ns=0)
    try:
        d = r.drv
        for i in range(20):
            data = (d.vq.arena.alloc(4096, align=4096), 4096, True)  # O_DIRECT: aligned
            d.submit([d.header(T_IN, i * 8), data, d.vq.arena.writable(1)], notify=False)
        t0 = time.monotonic()
        d.t.notify(0)
        assert len(d.wait_used(20, timeout=1.5)) == 20
        assert time.monotonic() - t0 < 1.5
        c = r.dev.counters()
        assert c["punts"] == 0 and c["completions"] == 20
        assert 1 <= c["interrupts"] + c["interrupts_suppressed"] <= 2, c
    finally:
        r.close()


# -- the punt queue ----------------------------------------------------------------------

def test_discard_and_write_zeroes_go_through_python(rig, image):
    assert rig.drv.ranged(T_DISCARD, 0, 8) == B.S_OK
    assert rig.drv.ranged(T_WRITE_ZEROES, 16, 8) == B.S_OK
    assert rig.dev.counters()["punts"] == 2
    assert image.read_bytes()[:4096] == bytes(4096)
    assert image.read_bytes()[16 * 512:24 * 512] == bytes(4096)


def test_sector_zero_writes_go_through_python(rig, image):
    """The C path leaves sector 0 to Python, which guards a probed raw image's header."""
    qcow2_magic = b"QFI\xfb" + bytes(508)
    assert rig.drv.write(0, qcow2_magic) == B.S_IOERR   # refused by the backend's guard
    assert rig.drv.write(0, pattern(1024, 4)) == B.S_OK
    assert image.read_bytes()[:1024] == pattern(1024, 4)
    assert rig.dev.counters()["punts"] == 2
    status, data = aligned_read(rig.drv, 0, 4096)          # a read across it stays in C
    assert (status, data) == (B.S_OK, image.read_bytes()[:4096])
    assert rig.dev.counters()["punts"] == 2


def test_bad_request_status_is_decided_in_c(rig, caplog):
    with caplog.at_level(logging.WARNING, logger="pykvm"):
        status, used = rig.drv.request([rig.drv.header(T_IN, 1), rig.drv.vq.arena.writable(100),
                                        rig.drv.vq.arena.writable(1)])
    assert (status, used) == (B.S_IOERR, 1)
    assert rig.dev.counters()["punts"] == 0 and rig.dev.counters()["errors"] == 1
    assert [r.getMessage() for r in caplog.records] == \
        ["virtio-blk: queue 0, chain 0: data length 100 is not a multiple of 512"]


# -- hostile guests --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["empty_status", "head_twice"])
def test_more_broken_chains_need_reset(rig, case, caplog):
    d = rig.drv
    with caplog.at_level(logging.ERROR, logger="pykvm"):
        if case == "empty_status":
            d.vq.add_chain([d.header(T_FLUSH), d.vq.arena.writable(8), (0x8000, 0, True)])
        else:
            # the same head twice in one batch: the first is still in flight
            # (with the engine) when the second is popped
            head = d.vq.add_chain([d.header(T_IN), d.vq.arena.writable(512),
                                   d.vq.arena.writable(1)])
            d.vq.write_avail_entry(d.vq.next_avail, head)
            d.vq.next_avail += 1
        d.vq.publish()
        d.t.notify(0)
        assert wait_fd(d.t.config_fd(), 5)
    assert d.needs_reset
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert ("no writable status byte" if case == "empty_status" else "still owns it") in errors[0]


# -- interrupts ---------------------------------------------------------------------------

def test_pci_unmasked_vector_is_written_directly(image, engine):
    r = Rig(image, "pci", engine)
    try:
        assert r.dev._fast is not None
        assert r.t.msix.call_fd(0) is not None
        status, _, _ = r.drv.read(0, 512)
        assert status == B.S_OK
        assert r.dev.counters()["interrupts"] >= 1
    finally:
        r.close()


def test_pci_masked_vector_is_forwarded_and_left_pending(image, engine):
    r = Rig(image, "pci", engine)
    try:
        d = r.drv
        fn = r.t
        from pykvm.virtio.transport import pci as P
        d.t.set_status(0)
        fn.bar_write(P.MSIX_TABLE + 16 * 1 + 12, 4, 1)    # mask the queue's vector
        d.init()
        assert fn.msix.call_fd(0) is None
        head = d.submit([d.header(T_IN, 0), d.vq.arena.writable(512), d.vq.arena.writable(1)])
        for _ in range(500):
            if fn.msix.pending & 2:
                break
            import time
            time.sleep(0.01)
        assert fn.msix.pending & 2                       # Python saw it, the vector is masked
        assert d.vq.reap() == [(head, 513)]
        fn.bar_write(P.MSIX_TABLE + 16 * 1 + 12, 4, 0)    # unmask: delivered now
        assert wait_fd(d.t.interrupt_fd(0), 5)
    finally:
        r.close()


def mask_then_unmask(r, queue):
    """The guest masks ``queue``'s MSI-X vector (and the transport tells the
    device), a request completes: the interrupt is left pending, not sent;
    unmasked, it is delivered."""
    from pykvm.virtio.transport import pci as P
    d, fn = r.drv, r.t
    vector = 1 + queue
    fn.bar_write(P.MSIX_TABLE + 16 * vector + 12, 4, 1)
    r.dev.interrupts_changed()                            # (the transport's hook)
    vq = d.vqs[queue]
    vq.set_used_event(vq.last_used)
    d.submit([d.header(T_IN, 0), d.vq.arena.writable(512), d.vq.arena.writable(1)], queue=queue)
    for _ in range(500):
        if fn.msix.pending & 1 << vector:
            break
        time.sleep(0.01)
    assert fn.msix.pending & 1 << vector and not wait_fd(d.t.interrupt_fd(queue), 0.1)
    fn.bar_write(P.MSIX_TABLE + 16 * vector + 12, 4, 0)
    r.dev.interrupts_changed()
    assert wait_fd(d.t.interrupt_fd(queue), 5)            # the pending one, on unmask


def test_vector_masked_later_is_forwarded_once_the_device_is_told(image, engine):
    r = Rig(image, "pci", engine)
    try:
        d = r.drv
        mask_then_unmask(r, 0)
        d.vq.reap()
        d.vq.set_used_event(d.vq.last_used)
        d.submit([d.header(T_IN, 0), d.vq.arena.writable(512), d.vq.arena.writable(1)])
        assert wait_fd(d.t.interrupt_fd(0), 5)            # direct again
    finally:
        r.close()


def test_mmio_interrupts_set_interrupt_status(image, engine):
    r = Rig(image, "mmio", engine)
    try:
        d = r.drv
        d.vq.set_used_event(0)
        d.submit([d.header(T_IN, 0), d.vq.arena.writable(512), d.vq.arena.writable(1)])
        assert wait_fd(r.t.interrupt.fd, 5)              # forwarded through Python,
        assert r.t.interrupt.status & 1                  # which set INT_USED_BUFFER first
    finally:
        r.close()


# -- the same requests through both paths -------------------------------------------------

def shapes():
    """Request chains, good and bad: (name, builder(driver) -> bufs)."""
    def hdr(d, t, sector=0):
        return d.header(t, sector)
    w, rd = (lambda d, n: d.vq.arena.writable(n)), (lambda d, b: d.vq.arena.readable(b))
    seg = struct.Struct("<QII").pack
    return {
        "read": lambda d: [hdr(d, T_IN, 3), w(d, 4096), w(d, 1)],
        "read-split": lambda d: [hdr(d, T_IN, 5), w(d, 512), w(d, 1024), w(d, 513)],
        "read-header-split": lambda d: [rd(d, bytes(4)), rd(d, struct.pack("<IQ", 0, 2)),
                                        w(d, 512), w(d, 1)],
        "read-header+data-in-one": lambda d: [rd(d, struct.pack("<IIQ", T_IN, 0, 0) + b"x"),
                                              w(d, 512), w(d, 1)],
        "write": lambda d: [hdr(d, T_OUT, 9), rd(d, pattern(1024, 1)), w(d, 1)],
        "write-header+data": lambda d: [rd(d, struct.pack("<IIQ", T_OUT, 0, 12)
                                           + pattern(512, 2)), w(d, 1)],
        "write-empty": lambda d: [hdr(d, T_OUT, 9), w(d, 1)],
        "read-empty": lambda d: [hdr(d, T_IN, 9), w(d, 1)],
        "read-at-capacity-empty": lambda d: [hdr(d, T_IN, DISK // 512), w(d, 1)],
        "read-last-sector": lambda d: [hdr(d, T_IN, DISK // 512 - 1), w(d, 513)],
        "read-past-end": lambda d: [hdr(d, T_IN, DISK // 512 - 1), w(d, 1024), w(d, 1)],
        "read-sector-overflow": lambda d: [hdr(d, T_IN, (1 << 64) - 1), w(d, 512), w(d, 1)],
        "read-odd-length": lambda d: [hdr(d, T_IN, 0), w(d, 100), w(d, 1)],
        "read-readable-data": lambda d: [hdr(d, T_IN, 0), rd(d, bytes(512)), w(d, 1)],
        "read-zero-length-readable": lambda d: [hdr(d, T_IN, 0), (0x9000, 0, False), w(d, 513)],
        "write-writable-data": lambda d: [hdr(d, T_OUT, 0), w(d, 512), w(d, 1)],
        "short-header": lambda d: [rd(d, bytes(15)), w(d, 1)],
        "no-header": lambda d: [w(d, 1)],
        "flush": lambda d: [hdr(d, T_FLUSH), w(d, 1)],
        "flush-with-data": lambda d: [hdr(d, T_FLUSH), w(d, 512), w(d, 1)],
        "flush-with-empty-readable": lambda d: [hdr(d, T_FLUSH), (0x9000, 0, False), w(d, 1)],
        "get-id": lambda d: [hdr(d, T_GET_ID), w(d, 20), w(d, 1)],
        "get-id-short": lambda d: [hdr(d, T_GET_ID), w(d, 7), w(d, 1)],
        "get-id-split": lambda d: [hdr(d, T_GET_ID), w(d, 3), w(d, 30)],
        "get-id-readable": lambda d: [hdr(d, T_GET_ID), rd(d, b"x"), w(d, 21)],
        "unknown-type": lambda d: [hdr(d, 99), w(d, 1)],
        "unknown-type-with-data": lambda d: [hdr(d, 99), w(d, 4), w(d, 1)],
        "discard": lambda d: [hdr(d, T_DISCARD), rd(d, seg(8, 8, 0)), w(d, 1)],
        "discard-flags": lambda d: [hdr(d, T_DISCARD), rd(d, seg(0, 1, 1)), w(d, 1)],
        "discard-two-segments": lambda d: [hdr(d, T_DISCARD), rd(d, seg(0, 1, 0) * 2), w(d, 1)],
        "discard-odd": lambda d: [hdr(d, T_DISCARD), rd(d, bytes(17)), w(d, 1)],
        "write-zeroes": lambda d: [hdr(d, T_WRITE_ZEROES), rd(d, seg(32, 4, 1)), w(d, 1)],
        "write-zeroes-past-end": lambda d: [hdr(d, T_WRITE_ZEROES),
                                            rd(d, seg(DISK // 512 - 1, 2, 0)), w(d, 1)],
    }


@pytest.mark.parametrize("name", sorted(shapes()))
def test_same_answers_as_the_python_path(tmp_path, name, engine, transport):
    """The same chain, on twin images: the same status byte, used length,
    buffer contents and image contents from the Python path and the C path
    (in the same cache mode)."""
    results = []
    for e in (Engine("python", engine.cache), engine):
        img = tmp_path / f"{e.name}.img"
        img.write_bytes(pattern(DISK))
        r = Rig(img, transport, e)
        try:
            assert (r.dev._fast is not None) == e.c_path
            d = r.drv
            bufs = shapes()[name](d)
            head = d.submit(bufs)
            used = d.wait_used()
            assert used[0][0] == head
            status = r.mem.read_u(bufs[-1][0] + bufs[-1][1] - 1, 1)
            contents = [r.mem.read(g, n) for g, n, wr in bufs if wr]
            results.append((status, used[0][1], contents, d.needs_reset))
        finally:
            r.close()
        results[-1] += (img.read_bytes(),)
    assert results[0] == results[1]


# -- the mapping table ----------------------------------------------------------------------

def extents(*rows):
    t = ffi.new("struct pykvm_blk_extent[]", len(rows))
    for c, (off, n, fd, host, flags) in zip(t, rows):
        c.offset, c.length, c.fd, c.host_offset, c.flags = off, n, fd, host, flags
    return t


@pytest.mark.parametrize("offset,length,write,expect", [
    (0, 512, False, (5, 100)),
    (0, 512, True, None),                 # extent 0 is not writable
    (512, 3584, True, (5, 612)),
    (0, 4096, False, (5, 100)),           # continues into the next extent, same file
    (0, 4096, True, None),
    (8192, 512, False, None),             # a hole: unmapped
    (4096, 1024, False, None),            # runs into the hole
    (12288, 4096, True, (7, 0)),
    (8192 + 2048, 4096, False, None),     # crosses into another file
    (16384, 1, False, None),              # past the end
])
def test_map_lookup(offset, length, write, expect):
    t = extents((0, 512, 5, 100, 0), (512, 4096 - 512, 5, 612, 1), (12288, 4096, 7, 0, 1))
    fd = ffi.new("int32_t *")
    host = ffi.new("uint64_t *")
    got = lib.pykvm_blk_map_lookup(t, 3, offset, length, write, fd, host)
    assert (got, (fd[0], host[0]) if got else None) == (expect is not None, expect)


def test_set_map_punts_unmapped_ranges(rig, image):
    fast = rig.dev._fast
    fd = rig.backend.driver.fd
    gen = fast.set_map([fastpath.Extent(0, 8192, fd, 0, False)])
    assert gen == 1
    status, data = aligned_read(rig.drv, 8, 4096)          # mapped: C
    assert fast.map_generation() == 1
    assert rig.dev.counters()["punts"] == 0
    assert aligned_read(rig.drv, 32, 4096)[1] == image.read_bytes()[32 * 512:32 * 512 + 4096]
    assert rig.dev.counters()["punts"] == 1               # unmapped: Python
    assert aligned_write(rig.drv, 4, pattern(512, 8)) == B.S_OK  # read-only extent: Python
    assert rig.dev.counters()["punts"] == 2
    assert (status, data) == (B.S_OK, image.read_bytes()[4096:8192])


def test_io_error_is_logged_and_reported(image, transport, engine, caplog):
    r = Rig(image, transport, engine)
    try:
        fast = r.dev._fast
        bad = os.open("/dev/null", os.O_RDONLY)
        try:   # data "lives" in a file we may not write: EBADF from the engine
            fast.set_map([fastpath.Extent(0, DISK, bad, 0, True)])
            aligned_read(r.drv, 0, 512)  # let the thread take the new map
            with caplog.at_level(logging.WARNING, logger="pykvm"):
                assert aligned_write(r.drv, 8, bytes(512)) == B.S_IOERR
            assert [m.getMessage() for m in caplog.records] == \
                [f"virtio-blk: I/O error: {os.strerror(errno.EBADF)}"]
            assert not r.drv.needs_reset
        finally:
            r.close()
            os.close(bad)
    finally:
        pass


def test_c_path_that_cannot_start_falls_back_to_python(image, transport, engine, monkeypatch,
                                                        caplog):
    def refuse(*args, **kw):
        raise fastpath.FastPathError("virtio-blk: the C fast path cannot start: no threads left")
    monkeypatch.setattr(fastpath, "FastPath", refuse)
    with caplog.at_level(logging.WARNING, logger="pykvm"):
        r = Rig(image, transport, engine)
    try:
        assert r.dev._fast is None and r.dev.threads
        assert [m.getMessage() for m in caplog.records] == [
            "virtio-blk: the C fast path cannot start: no threads left; serving it with the "
            "Python path"]
        status, data, _ = r.drv.read(8, 4096)
        assert (status, data) == (B.S_OK, image.read_bytes()[4096:8192])
    finally:
        r.close()


# -- one C thread per queue (iothread=queue) ------------------------------------------------

@pytest.mark.parametrize("iothread, threads", [("device", 1), ("queue", 4)])
def test_c_threads_per_device_or_per_queue(image, transport, iothread, threads, engine):
    r = Rig(image, transport, engine, num_queues=4, iothread=iothread)
    try:
        assert r.dev._fast.c_threads == threads
        exercise_every_queue(r, 4)
        c = r.dev.counters()
        assert c["requests"] == 8 and c["bytes_written"] == 4 * 4096   # summed over threads
        assert not r.drv.needs_reset
    finally:
        r.close()


def test_per_queue_threads_only_for_queues_the_driver_set_up(image, transport, engine):
    r = Rig(image, transport, engine, num_queues=4, iothread="queue", features=~B.F_MQ,
            driver_queues=1)
    try:
        assert r.dev._fast.c_threads == 1
        assert r.drv.write(8, pattern(512, 5)) == B.S_OK
    finally:
        r.close()


def test_per_queue_punts_and_logs_come_back_on_their_queue(image, transport, caplog, engine):
    r = Rig(image, transport, engine, num_queues=3, iothread="queue")
    try:
        d = r.drv
        seg = d.vq.arena.readable(struct.pack("<QII", 0, 8, 0))
        assert d.request([d.header(T_DISCARD), seg, d.vq.arena.writable(1)], queue=2)[0] == B.S_OK
        assert r.dev.counters()["punts"] == 1
        assert image.read_bytes()[:4096] == bytes(4096)
        with caplog.at_level(logging.WARNING, logger="pykvm"):
            status, used = d.request([d.header(T_IN, 1), d.vq.arena.writable(100),
                                      d.vq.arena.writable(1)], queue=1)
        assert (status, used) == (B.S_IOERR, 1)
        assert [m.getMessage() for m in caplog.records] == \
            ["virtio-blk: queue 1, chain 0: data length 100 is not a multiple of 512"]
        assert all(not vq.reap() for vq in d.vqs)
    finally:
        r.close()


def test_per_queue_masked_vector_is_forwarded(image, engine):
    r = Rig(image, "pci", engine, num_queues=3, iothread="queue")
    try:
        mask_then_unmask(r, 2)
        assert len(r.drv.vqs[2].reap()) == 1
    finally:
        r.close()


def test_per_queue_quiesce_returns_every_request(image, transport, engine):
    r = Rig(image, transport, engine, num_queues=2, iothread="queue")
    try:
        d = r.drv
        for k in range(2):
            for i in range(8):
                d.submit([d.header(T_IN, 8 * i), d.vq.arena.writable(4096),
                          d.vq.arena.writable(1)], notify=False, queue=k)
            d.t.notify(k)
        # both threads have taken their 8; quiesce must give every one back
        deadline = time.monotonic() + 10
        while r.dev.counters()["requests"] < 16 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert r.dev.quiesce(10)
        assert [len(vq.reap()) for vq in d.vqs] == [8, 8]
    finally:
        r.close()


# -- request limits: the same on both paths ------------------------------------------------

def test_request_limits_are_the_same_in_c():
    assert lib.PYKVM_BLK_MAX_SEGMENTS == B.MAX_SEGMENTS
    assert lib.PYKVM_BLK_MAX_REQUEST_BYTES == B.MAX_REQUEST_BYTES


@pytest.mark.parametrize("nsegs,rtype", [(B.MAX_SEGMENTS, T_IN), (B.MAX_SEGMENTS + 1, T_IN),
                                         (B.MAX_SEGMENTS + 1, T_OUT)])
def test_segment_limit_on_both_paths(tmp_path, engine, caplog, nsegs, rtype):
    """A read or write of more data buffers than MAX_SEGMENTS is IOERR with one log
    line on either path (empty buffers do not count); one at the limit is served."""
    results = []
    for e in (Engine("python", engine.cache), engine):
        img = tmp_path / f"{e.name}.img"
        img.write_bytes(pattern(DISK))
        r = Rig(img, "mmio", e, queue=2048)
        caplog.clear()
        try:
            d = r.drv
            one = d.vq.arena.writable(512) if rtype == T_IN else \
                d.vq.arena.readable(pattern(512, 3))
            bufs = [d.header(rtype, 0)] + [one] * nsegs + [(one[0], 0, one[2])] + \
                [d.vq.arena.writable(1)]
            with caplog.at_level(logging.WARNING, logger="pykvm"):
                d.submit(bufs)
                used = d.wait_used()
            status = r.mem.read_u(bufs[-1][0], 1)
            results.append((status, used[0][1], [m.getMessage() for m in caplog.records]))
        finally:
            r.close()
    assert results[0] == results[1]
    status, used, logs = results[0]
    if nsegs > B.MAX_SEGMENTS:
        assert (status, used) == (B.S_IOERR, 1)
        assert len(logs) == 1 and f"request of {nsegs} data buffers exceeds 1024" in logs[0]
    else:
        assert (status, used, logs) == (B.S_OK, nsegs * 512 + 1, [])
