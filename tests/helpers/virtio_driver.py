"""A virtio driver in Python for device-model tests without KVM.

It speaks to a transport's registers directly (``MmioDriver``: the 4 KiB
window; ``PciDriver``: BAR 0 and config space of a VirtioPci) and drives one
queue through MockVirtq. ``BlkDriver`` adds virtio-blk requests on top:
each builds a chain, publishes it, notifies the device and waits for the
used element, as a guest driver would.
"""
from __future__ import annotations

import os
import select
import struct

from pykvm.virtio.device import ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK
from pykvm.virtio.transport import mmio as M
from pykvm.virtio.transport import pci as P
from tests.helpers.mock_virtq import MockVirtq

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def wait_fd(fd: int, timeout: float = 5.0) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(timeout * 1000):
        return False
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    return True


class MmioDriver:
    def __init__(self, transport: M.VirtioMmio):
        self.t = transport

    def r(self, off):
        return self.t.read(off, 4)

    def w(self, off, value):
        self.t.write(off, 4, value)

    def status(self) -> int:
        return self.r(M.STATUS)

    def set_status(self, value):
        self.w(M.STATUS, value)

    def device_features(self) -> int:
        self.w(M.DEVICE_FEATURES_SEL, 0)
        lo = self.r(M.DEVICE_FEATURES)
        self.w(M.DEVICE_FEATURES_SEL, 1)
        return lo | self.r(M.DEVICE_FEATURES) << 32

    def write_features(self, f):
        for sel in (0, 1):
            self.w(M.DRIVER_FEATURES_SEL, sel)
            self.w(M.DRIVER_FEATURES, (f >> (32 * sel)) & 0xFFFFFFFF)

    def setup_queue(self, index, vq: MockVirtq):
        self.w(M.QUEUE_SEL, index)
        self.w(M.QUEUE_NUM, vq.size)
        for lo, addr in ((M.QUEUE_DESC_LOW, vq.desc_table), (M.QUEUE_DRIVER_LOW, vq.avail_ring),
                         (M.QUEUE_DEVICE_LOW, vq.used_ring)):
            self.w(lo, addr & 0xFFFFFFFF)
            self.w(lo + 4, addr >> 32)
        self.w(M.QUEUE_READY, 1)

    def queue_max(self, index) -> int:
        self.w(M.QUEUE_SEL, index)
        return self.r(M.QUEUE_NUM_MAX)

    def notify(self, index):
        self.w(M.QUEUE_NOTIFY, index)

    def config(self, offset, size):
        return self.t.read(M.CONFIG + offset, size)

    def write_config(self, offset, size, value):
        self.t.write(M.CONFIG + offset, size, value)

    def interrupt_fd(self, index) -> int:
        return self.t.interrupt.fd

    def config_fd(self) -> int:
        return self.t.interrupt.fd

    def ack_interrupts(self):
        self.w(M.INTERRUPT_ACK, self.r(M.INTERRUPT_STATUS))


class PciDriver:
    """Through BAR 0 of a VirtioPci (offsets per its layout) and its MSI-X table."""

    def __init__(self, fn: P.VirtioPci):
        self.fn = fn
        # MSI-X on, every vector unmasked: vector 0 config, vector 1+i queue i
        fn.config_write(fn.msix_cap + 2, 2, P.MSIX_ENABLE)
        for v in range(fn.msix.n):
            fn.bar_write(P.MSIX_TABLE + 16 * v, 4, 0xFEE00000)
            fn.bar_write(P.MSIX_TABLE + 16 * v + 8, 4, 0x30 + v)
            fn.bar_write(P.MSIX_TABLE + 16 * v + 12, 4, 0)
        fn.bar_write(P.C_MSIX, 2, 0)

    def c(self, off, size):
        return self.fn.bar_read(P.COMMON + off, size)

    def cw(self, off, size, value):
        self.fn.bar_write(P.COMMON + off, size, value)

    def status(self) -> int:
        return self.c(P.C_STATUS, 1)

    def set_status(self, value):
        self.cw(P.C_STATUS, 1, value)
        if value == 0:
            self.fn.bar_write(P.C_MSIX, 2, 0)

    def device_features(self) -> int:
        self.cw(P.C_DFSELECT, 4, 0)
        lo = self.c(P.C_DF, 4)
        self.cw(P.C_DFSELECT, 4, 1)
        return lo | self.c(P.C_DF, 4) << 32

    def write_features(self, f):
        for sel in (0, 1):
            self.cw(P.C_GFSELECT, 4, sel)
            self.cw(P.C_GF, 4, (f >> (32 * sel)) & 0xFFFFFFFF)

    def setup_queue(self, index, vq: MockVirtq):
        self.cw(P.C_QSELECT, 2, index)
        self.cw(P.C_QSIZE, 2, vq.size)
        self.cw(P.C_QMSIX, 2, 1 + index)
        self.cw(P.C_QDESC, 8, vq.desc_table)
        self.cw(P.C_QAVAIL, 4, vq.avail_ring & 0xFFFFFFFF)
        self.cw(P.C_QAVAIL + 4, 4, vq.avail_ring >> 32)
        self.cw(P.C_QUSED, 8, vq.used_ring)
        self.cw(P.C_QENABLE, 2, 1)

    def queue_max(self, index) -> int:
        self.cw(P.C_QSELECT, 2, index)
        return self.c(P.C_QSIZE, 2)

    def notify(self, index):
        self.fn.bar_write(P.NOTIFY + P.NOTIFY_MULTIPLIER * index, 2, index)

    def config(self, offset, size):
        return self.fn.bar_read(P.DEVICE_CFG + offset, size)

    def write_config(self, offset, size, value):
        self.fn.bar_write(P.DEVICE_CFG + offset, size, value)

    def interrupt_fd(self, index) -> int:
        return self.fn.msix.fds[1 + index]

    def config_fd(self) -> int:
        return self.fn.msix.fds[0]

    def ack_interrupts(self):
        self.fn.bar_read(P.ISR, 1)


class BlkDriver:
    """virtio-blk requests over either transport: ``queues`` queues of ``size``
    entries (queue 0's rings at 0x10000, queue k's at 0x2000 * k below it;
    all take buffers from queue 0's arena). ``vq`` is queue 0."""

    def __init__(self, mem, transport_driver, size: int = 64, features: int | None = None,
                 queues: int = 1):
        assert 1 <= queues <= 7
        self.mem = mem
        self.t = transport_driver
        self.nqueues = queues
        self.size = size
        self.features_wanted = features
        self.init()

    def init(self) -> int:
        t = self.t
        t.set_status(0)
        assert t.status() == 0
        t.set_status(ACKNOWLEDGE)
        t.set_status(ACKNOWLEDGE | DRIVER)
        offered = t.device_features()
        want = offered if self.features_wanted is None else offered & self.features_wanted
        t.write_features(want)
        t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        assert t.status() & FEATURES_OK, "device refused our features"
        self.features = want
        self.vq = MockVirtq(self.mem, self.size, base=0x10000)
        self.vqs = [self.vq]
        for k in range(1, self.nqueues):
            vq = MockVirtq(self.mem, self.size, base=0x2000 * k)
            assert vq.used_ring + 6 + 8 * self.size <= 0x2000 * (k + 1)
            vq.arena = self.vq.arena
            self.vqs.append(vq)
        for k, vq in enumerate(self.vqs):
            t.setup_queue(k, vq)
        t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return want

    @property
    def needs_reset(self) -> bool:
        return bool(self.t.status() & DEVICE_NEEDS_RESET)

    def header(self, rtype, sector=0):
        return self.vq.arena.readable(struct.pack("<IIQ", rtype, 0, sector))

    def submit(self, bufs, indirect=False, notify=True, queue=0) -> int:
        vq = self.vqs[queue]
        head = vq.add_chain(bufs, indirect=indirect)
        vq.publish()
        if notify:
            self.t.notify(queue)
        return head

    def wait_used(self, count=1, timeout=5.0, queue=0):
        vq = self.vqs[queue]
        got = []
        while len(got) < count:
            got += vq.reap()
            if len(got) >= count:
                break
            # Re-arm, as Linux's virtqueue_enable_cb does: with EVENT_IDX,
            # "interrupt me once used->idx passes what I have seen".
            vq.set_used_event(vq.last_used)
            more = vq.reap()
            got += more
            if len(got) >= count:
                break
            if more:
                # used->idx moved past the event index just set: the device
                # may have decided against an interrupt for what was reaped
                # here, and will not send one for the next ones before the
                # event index passes them (virtqueue_enable_cb's loop). Re-arm.
                continue
            if not wait_fd(self.t.interrupt_fd(queue), timeout):
                got += vq.reap()
                if len(got) < count:
                    raise TimeoutError(f"{len(got)} of {count} requests completed")
        return got

    def request(self, bufs, indirect=False, queue=0):
        """Submit one chain whose last buffer is the status byte; return (status, used_len)."""
        head = self.submit(bufs, indirect, queue=queue)
        used = self.wait_used(queue=queue)
        assert used[0][0] == head
        status_gpa = bufs[-1][0] + bufs[-1][1] - 1
        return self.mem.read_u(status_gpa, 1), used[0][1]

    def read(self, sector, nbytes, segments=1, indirect=False):
        seg = nbytes // segments
        data = [self.vq.arena.writable(seg) for _ in range(segments)]
        status, used_len = self.request([self.header(T_IN, sector), *data,
                                         self.vq.arena.writable(1)], indirect)
        return status, b"".join(self.mem.read(g, n) for g, n, _ in data), used_len

    def write(self, sector, data: bytes, indirect=False):
        return self.request([self.header(T_OUT, sector), self.vq.arena.readable(data),
                             self.vq.arena.writable(1)], indirect)[0]

    def flush(self):
        return self.request([self.header(T_FLUSH), self.vq.arena.writable(1)])[0]

    def get_id(self):
        buf = self.vq.arena.writable(20)
        status, used_len = self.request([self.header(T_GET_ID), buf, self.vq.arena.writable(1)])
        return status, self.mem.read(buf[0], 20)

    def ranged(self, rtype, sector, nsectors, flags=0):
        seg = self.vq.arena.readable(struct.pack("<QII", sector, nsectors, flags))
        return self.request([self.header(rtype), seg, self.vq.arena.writable(1)])[0]
