"""virtio-blk end to end without KVM: a Python driver (tests/helpers) on the
MMIO and PCI register maps, the device's I/O thread, the block backend and a
real image file.

On every engine and transport of the matrix (tests/conftest.py): on
aio=python the device's Python I/O thread serves the queues, on threads,
native (cache=none) and io_uring the C fast path does (native/blk.c; what
only it has is in test_fastpath_blk.py). The few tests that watch the Python
path's own calls run on python only; their C versions are in
test_fastpath_blk.py."""
import logging
import os
import struct

import pytest

from pykvm.memory import GuestMemory
from pykvm.virtio import blk as B
from pykvm.virtio.device import DEVICE_NEEDS_RESET, DRIVER_OK, VirtioCore
from pykvm.virtio.transport.mmio import VirtioMmio
from pykvm.virtio.transport.pci import VirtioPci
from tests.conftest import Engine
from tests.helpers.virtio_driver import (T_DISCARD, T_FLUSH, T_IN, T_OUT,
                                         T_WRITE_ZEROES, BlkDriver, MmioDriver, PciDriver, wait_fd)

DISK = 4 << 20


def pattern(n: int, seed: int = 0) -> bytes:
    period = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (period * (n // 256 + 1))[:n]


class Rig:
    """A VirtioBlk on ``path`` behind ``transport``, its disk on a fresh engine
    of ``engine`` (a tests/conftest.py Engine; the Python one by default), in
    the engine's cache mode unless ``cache`` says otherwise; a BlkDriver on it.
    ``backend``: more BlockBackend keywords (``throttle=``)."""

    def __init__(self, path, transport="mmio", engine=None, cache=None, read_only=False,
                 queue=64, features=None, discard="unmap", driver_queues=None, backend=None,
                 **device):
        self.mem = GuestMemory(32 << 20)
        engine = engine or Engine("python", cache or "writeback")
        self.backend = engine.backend(path, cache=cache, read_only=read_only, discard=discard,
                                      **(backend or {}))
        self.dev = B.VirtioBlk(self.backend, serial="serial-0123456789abcdefXYZ", queue_size=queue,
                               **device)
        self.core = VirtioCore(self.dev, self.mem)
        if transport == "mmio":
            self.t = VirtioMmio(self.core, 0xD0000000, 5)
            tdrv = MmioDriver(self.t)
        else:
            self.t = VirtioPci(self.core)
            tdrv = PciDriver(self.t)
        self.drv = BlkDriver(self.mem, tdrv, size=queue, features=features,
                             queues=driver_queues or self.dev.num_queues)

    def close(self):
        self.t.close()
        self.mem.close()


def test_the_rig_runs_on_the_engine_it_names(rig, engine, transport):
    assert rig.backend.engine.name == engine.name and rig.backend.cache_name == engine.cache
    assert (rig.dev._fast is not None) == engine.c_path       # C engines: the C I/O thread
    assert isinstance(rig.t, VirtioMmio if transport == "mmio" else VirtioPci)
    assert rig.drv.read(0, 512)[0] == B.S_OK
    assert rig.dev.counters()["requests"] == 1


def test_config_space(rig):
    d = rig.drv.t
    assert d.config(0, 8) == DISK // 512                   # capacity
    assert d.config(12, 4) == 62                           # seg_max = queue size - 2
    assert d.config(20, 4) == 512                          # blk_size
    assert d.config(32, 1) == 1                            # writeback cache on
    assert d.config(34, 2) == 1                            # one queue
    assert rig.drv.features & (B.F_FLUSH | B.F_DISCARD | B.F_WRITE_ZEROES | B.F_CONFIG_WCE)
    assert d.queue_max(0) == 64


@pytest.mark.parametrize("segments,indirect", [(1, False), (4, False), (8, True)])
def test_read(rig, image, segments, indirect):
    status, data, used_len = rig.drv.read(8, 4096, segments, indirect)
    assert status == B.S_OK
    assert data == image.read_bytes()[8 * 512:8 * 512 + 4096]
    assert used_len == 4097  # data written plus the status byte


def test_write_lands_in_the_file(rig, image):
    data = pattern(8192, seed=99)
    assert rig.drv.write(100, data) == B.S_OK
    assert image.read_bytes()[100 * 512:100 * 512 + 8192] == data
    status, back, _ = rig.drv.read(100, 8192)
    assert back == data


@pytest.mark.matrix(engine="python")     # the C path: test_flush_is_counted
def test_flush_reaches_fdatasync(rig, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    assert rig.drv.flush() == B.S_OK
    assert calls == [rig.backend.driver.fd]


def test_get_id_returns_the_serial(rig):
    status, ident = rig.drv.get_id()
    assert status == B.S_OK
    assert ident == b"serial-0123456789abc"  # 20 bytes, no terminator when full


def test_discard_punches_a_hole(rig, image):
    before = os.stat(image).st_blocks
    assert rig.drv.ranged(T_DISCARD, 0, 2048) == B.S_OK  # the first MiB
    assert os.stat(image).st_blocks <= before - 2048 + 64
    assert image.read_bytes()[:1 << 20] == bytes(1 << 20)


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(rig, image, unmap):
    assert rig.drv.ranged(T_WRITE_ZEROES, 16, 16, flags=unmap) == B.S_OK
    content = image.read_bytes()
    assert content[16 * 512:32 * 512] == bytes(16 * 512)
    assert content[15 * 512:16 * 512] == pattern(DISK)[15 * 512:16 * 512]


@pytest.mark.parametrize("build,status", [
    # sector range past the capacity, and overflowing
    (lambda d: [d.header(T_IN, DISK // 512), d.vq.arena.writable(512), d.vq.arena.writable(1)],
     B.S_IOERR),
    (lambda d: [d.header(T_IN, (1 << 64) - 1), d.vq.arena.writable(1024), d.vq.arena.writable(1)],
     B.S_IOERR),
    # data not a multiple of 512
    (lambda d: [d.header(T_IN, 0), d.vq.arena.writable(100), d.vq.arena.writable(1)], B.S_IOERR),
    # read whose data buffer is device-readable
    (lambda d: [d.header(T_IN, 0), d.vq.arena.readable(bytes(512)), d.vq.arena.writable(1)],
     B.S_IOERR),
    # header shorter than 16 bytes
    (lambda d: [d.vq.arena.readable(bytes(8)), d.vq.arena.writable(1)], B.S_IOERR),
    # unknown request type
    (lambda d: [d.header(99, 0), d.vq.arena.writable(1)], B.S_UNSUPP),
    # discard with the unmap flag (only write-zeroes has it), and with unknown flags
    (lambda d: [d.header(T_DISCARD), d.vq.arena.readable(struct.pack("<QII", 0, 1, 1)),
                d.vq.arena.writable(1)], B.S_UNSUPP),
    (lambda d: [d.header(T_WRITE_ZEROES), d.vq.arena.readable(struct.pack("<QII", 0, 1, 6)),
                d.vq.arena.writable(1)], B.S_UNSUPP),
    # a write-zeroes range past the end
    (lambda d: [d.header(T_WRITE_ZEROES),
                d.vq.arena.readable(struct.pack("<QII", DISK // 512 - 1, 2, 0)),
                d.vq.arena.writable(1)], B.S_IOERR),
])
def test_bad_requests_get_an_error_status(rig, image, build, status, caplog):
    before = image.read_bytes()
    with caplog.at_level(logging.WARNING, logger="pykvm"):
        got, used_len = rig.drv.request(build(rig.drv))
    assert got == status and used_len == 1
    assert not rig.drv.needs_reset
    assert len([r for r in caplog.records if r.name.startswith("pykvm")]) == 1
    assert image.read_bytes() == before
    assert rig.drv.read(0, 512)[0] == B.S_OK  # and the device carries on


def test_read_only_disk_refuses_writes(image, transport, engine):
    r = Rig(image, transport, engine, read_only=True)
    try:
        assert r.drv.features & B.F_RO
        assert not r.drv.features & (B.F_DISCARD | B.F_WRITE_ZEROES)
        assert r.drv.write(0, bytes(512)) == B.S_IOERR
        assert r.drv.read(0, 512)[0] == B.S_OK
    finally:
        r.close()
    assert image.read_bytes()[:512] == pattern(512)


def hostile_cases():
    """Each breaks the ring itself: the device must go to DEVICE_NEEDS_RESET."""
    def out_of_ram(d):
        d.vq.add_chain([(0x7_0000_0000, 512, False), d.vq.arena.writable(1)])

    def loop(d):
        head = d.vq.add_chain([d.header(T_IN), d.vq.arena.writable(512), d.vq.arena.writable(1)])
        d.vq.write_desc(head + 2, d.vq.arena.alloc(1), 1, 2 | 1, head)  # WRITE|NEXT back to head

    def bad_head(d):
        d.vq.write_avail_entry(d.vq.next_avail, d.vq.size + 3)
        d.vq.next_avail += 1

    def avail_ahead(d):
        d.vq.add_chain([d.header(T_FLUSH), d.vq.arena.writable(1)])
        d.vq.next_avail += d.vq.size + 1

    def readable_after_writable(d):
        d.vq.add_chain([d.header(T_IN), d.vq.arena.writable(512), d.vq.arena.readable(b"x")])

    def no_status(d):
        d.vq.add_chain([d.header(T_OUT), d.vq.arena.readable(bytes(512))])

    return {"out_of_ram": out_of_ram, "loop": loop, "bad_head": bad_head,
            "avail_ahead": avail_ahead, "readable_after_writable": readable_after_writable,
            "no_status": no_status}


@pytest.mark.parametrize("case", sorted(hostile_cases()))
def test_broken_ring_needs_reset_then_recovers(rig, image, case, caplog):
    d = rig.drv
    with caplog.at_level(logging.ERROR, logger="pykvm"):
        hostile_cases()[case](d)
        d.vq.publish()
        d.t.notify(0)
        assert wait_fd(d.t.config_fd(), 5), "no configuration-change interrupt"
    assert d.needs_reset
    assert d.t.status() & DRIVER_OK  # NEEDS_RESET is added, nothing else changes
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "needs reset" in errors[0].getMessage()
    d.init()  # reset and start over
    assert not d.needs_reset
    status, data, _ = d.read(0, 512)
    assert (status, data) == (B.S_OK, image.read_bytes()[:512])


def test_many_in_flight_complete(rig, image):
    d = rig.drv
    heads = []
    bufs = []
    for i in range(20):  # 60 of the queue's 64 descriptors
        data = d.vq.arena.writable(4096)
        bufs.append((i, data))
        heads.append(d.submit([d.header(T_IN, i * 8), data, d.vq.arena.writable(1)], notify=False))
    d.t.notify(0)
    used = d.wait_used(20)
    assert sorted(h for h, _ in used) == sorted(heads)
    content = image.read_bytes()
    for i, (gpa, n, _) in bufs:
        assert rig.mem.read(gpa, n) == content[i * 4096:(i + 1) * 4096]


@pytest.mark.matrix(engine="python")     # the C path: test_event_idx_suppresses_interrupts_in_c
def test_event_idx_suppresses_interrupts(image, transport, engine):
    r = Rig(image, transport, engine)
    try:
        d = r.drv
        assert d.features & (1 << 29)
        d.vq.set_used_event(5)  # "interrupt me once used->idx passes 5"
        for i in range(3):
            d.submit([d.header(T_FLUSH), d.vq.arena.writable(1)])
        assert not wait_fd(d.t.interrupt_fd(0), 0.5)
        assert len(d.vq.reap()) == 3
        assert r.dev.stats["interrupts"] == 0 and r.dev.stats["interrupts_suppressed"] >= 1
    finally:
        r.close()


@pytest.mark.matrix(engine="python")     # the C path: test_writethrough_flushes_each_write
def test_guest_toggles_the_write_cache(image, transport, monkeypatch, engine):
    r = Rig(image, transport, engine)
    try:
        calls = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
        assert r.drv.write(0, bytes(512)) == B.S_OK
        assert calls == []                           # writeback: no flush per write
        r.drv.t.write_config(32, 1, 0)               # guest turns the cache off
        assert r.drv.t.config(32, 1) == 0
        assert r.drv.write(0, bytes(512)) == B.S_OK
        assert len(calls) == 1                       # writethrough: each write flushed
    finally:
        r.close()


def test_cache_none_bounces_unaligned_buffers(image, transport, engine):
    r = Rig(image, transport, engine, cache="none")
    try:
        d = r.drv
        odd = d.vq.arena.alloc(4096 + 8) + 8  # not 512-aligned in memory
        r.mem.fill(odd, 4096)
        status, _ = d.request([d.header(T_IN, 4), (odd, 4096, True), d.vq.arena.writable(1)])
        assert status == B.S_OK
        assert r.mem.read(odd, 4096) == image.read_bytes()[2048:2048 + 4096]
        r.mem.write(odd, pattern(4096, seed=5))
        status, _ = d.request([d.header(T_OUT, 16), (odd, 4096, False), d.vq.arena.writable(1)])
        assert status == B.S_OK
        assert image.read_bytes()[16 * 512:16 * 512 + 4096] == pattern(4096, seed=5)
    finally:
        r.close()


def test_features_not_offered_are_refused(image, transport, engine):
    r = Rig(image, transport, engine)
    try:
        t = r.drv.t
        t.set_status(0)
        t.set_status(1)
        t.set_status(3)
        t.write_features(r.drv.features | 1 << 40)
        t.set_status(0xB)
        assert not t.status() & 8  # FEATURES_OK did not stick
        t.set_status(0)
        t.set_status(3)
        t.write_features(0)  # no VERSION_1: we have no legacy interface
        t.set_status(0xB)
        assert not t.status() & 8
    finally:
        r.close()


def test_bad_queue_configuration_needs_reset(image, transport, engine):
    r = Rig(image, transport, engine)
    try:
        t = r.drv.t
        t.set_status(0)
        t.set_status(3)
        t.write_features(r.drv.features)
        t.set_status(0xB)
        r.drv.vq.desc_table = 0x7_0000_0000  # outside RAM
        t.setup_queue(0, r.drv.vq)
        t.set_status(0xF)
        assert t.status() & DEVICE_NEEDS_RESET
    finally:
        r.close()


def test_reset_waits_for_in_flight_io(image, transport, engine):
    r = Rig(image, transport, engine)
    d = r.drv
    for i in range(16):
        d.submit([d.header(T_IN, i), d.vq.arena.writable(512), d.vq.arena.writable(1)],
                 notify=False)
    d.t.notify(0)
    d.t.set_status(0)  # reset with requests in flight
    assert r.backend.in_flight == 0
    assert d.t.status() == 0
    r.close()


# -- several request queues (VIRTIO_BLK_F_MQ) -----------------------------------------

def test_one_queue_offers_no_mq(rig):
    assert not rig.drv.t.device_features() & B.F_MQ
    assert rig.drv.t.queue_max(1) == 0


def test_mq_config(image, transport, engine):
    r = Rig(image, transport, engine, num_queues=4)
    try:
        d = r.drv.t
        assert r.drv.features & B.F_MQ
        assert d.config(34, 2) == 4
        assert [d.queue_max(k) for k in range(5)] == [64, 64, 64, 64, 0]
    finally:
        r.close()


def exercise_every_queue(r, n):
    """Writes in flight on all ``n`` queues at once, then each queue reads back
    what the next one wrote: every completion comes back on its own ring."""
    d = r.drv
    heads = []
    for k in range(n):
        data = pattern(4096, seed=k + 1)
        heads.append(d.submit([d.header(T_OUT, 64 + 8 * k), d.vq.arena.readable(data),
                               d.vq.arena.writable(1)], queue=k))
    for k in range(n):
        assert [h for h, _ in d.wait_used(queue=k)] == [heads[k]]
    for k in range(n):
        j = (k + 1) % n
        buf = d.vq.arena.writable(4096)
        status, _ = d.request([d.header(T_IN, 64 + 8 * j), buf, d.vq.arena.writable(1)], queue=k)
        assert status == B.S_OK
        assert r.mem.read(buf[0], 4096) == pattern(4096, seed=j + 1)
    assert all(not vq.reap() for vq in d.vqs)   # nothing strayed onto another ring


def test_requests_complete_on_their_own_queue(image, transport, engine):
    r = Rig(image, transport, engine, num_queues=4)
    try:
        exercise_every_queue(r, 4)
        assert not r.drv.needs_reset
    finally:
        r.close()


def test_driver_without_mq_drives_queue_zero(image, transport, engine):
    r = Rig(image, transport, engine, num_queues=4, features=~B.F_MQ, driver_queues=1)
    try:
        assert not r.drv.features & B.F_MQ
        assert r.drv.write(8, pattern(512, 3)) == B.S_OK
        assert r.drv.read(8, 512)[1] == pattern(512, 3)
    finally:
        r.close()


@pytest.mark.parametrize("kw", [{"num_queues": 0}, {"num_queues": B.MAX_QUEUES + 1},
                                {"iothread": "vcpu"}])
def test_bad_queue_options(image, kw, engine):
    backend = engine.backend(image)
    try:
        with pytest.raises(ValueError):
            B.VirtioBlk(backend, **kw)
    finally:
        backend.close()


def test_seg_max_is_the_segment_limit_on_large_queues(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(DISK))
    for queue, seg_max in ((64, 62), (4096, B.MAX_SEGMENTS)):
        r = Rig(img, queue=queue)
        try:
            assert r.dev.read_config(12, 4) == seg_max
        finally:
            r.close()


def test_discard_segment_length_is_checked_before_it_is_read(tmp_path, caplog):
    """A discard whose range-segment buffer is large is refused before a byte
    of it is copied out of guest memory."""
    import tracemalloc
    img = tmp_path / "d.img"
    img.write_bytes(bytes(DISK))
    r = Rig(img)
    try:
        d = r.drv
        big = (d.vq.arena.writable(1)[0] + 4096, 24 << 20, False)   # 24 MiB, readable
        tracemalloc.start()
        with caplog.at_level(logging.WARNING, logger="pykvm"):
            status, used = d.request([d.header(T_DISCARD), big, d.vq.arena.writable(1)])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (status, used) == (B.S_UNSUPP, 1)     # a multiple of 16: several segments
        assert peak < 4 << 20, peak
        assert any(f"{24 << 20} bytes of range segments" in m.getMessage() for m in caplog.records)
    finally:
        r.close()
