"""virtio-PCI, modern interface only (virtio 1.x spec 4.1), with MSI-X.

One 64-bit memory BAR (BAR 0) holds every structure:

  0x0000  common configuration      (VIRTIO_PCI_CAP_COMMON_CFG)
  0x1000  ISR status                (VIRTIO_PCI_CAP_ISR_CFG, read-to-clear)
  0x2000  device configuration      (VIRTIO_PCI_CAP_DEVICE_CFG)
  0x3000  notifications             (VIRTIO_PCI_CAP_NOTIFY_CFG, 4 bytes per queue)
  0x4000  MSI-X table, 0x5000 PBA   (one vector for config changes + one per queue)

plus the VIRTIO_PCI_CAP_PCI_CFG window in config space. Vendor 0x1af4, device
0x1040 + device id. There is no INTx: a queue whose vector is NO_VECTOR only
sets the ISR bit. MSI-X vectors are KVM MSI routes with an irqfd each; a
masked vector sets its PBA bit and fires when unmasked.
"""
from __future__ import annotations

import logging
import os
import struct
import threading

from ...devices.pci import Bar, PciFunction
from ..device import DRIVER_OK, Interrupt, VirtioCore

log = logging.getLogger("pykvm.virtio")

VENDOR = 0x1AF4
DEVICE_BASE = 0x1040
SUBSYS_ID = 0x1100

BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON, ISR, DEVICE_CFG, NOTIFY, MSIX_TABLE, MSIX_PBA = (0x0000, 0x1000, 0x2000, 0x3000,
                                                        0x4000, 0x5000)
NOTIFY_MULTIPLIER = 4
NO_VECTOR = 0xFFFF

CAP_VENDOR, CAP_MSIX = 0x09, 0x11
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5

MSIX_ENABLE, MSIX_MASKALL = 1 << 15, 1 << 14

# common configuration layout (spec 4.1.4.3)
(C_DFSELECT, C_DF, C_GFSELECT, C_GF, C_MSIX, C_NUMQ, C_STATUS, C_CFGGEN, C_QSELECT, C_QSIZE,
 C_QMSIX, C_QENABLE, C_QNOFF, C_QDESC, C_QAVAIL, C_QUSED) = (
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x20, 0x28, 0x30)
COMMON_SIZE = 0x38


class MsixInterrupt(Interrupt):
    """MSI-X vectors: table, PBA, masking, and one eventfd (irqfd) per vector."""

    def __init__(self, nvectors: int, vm=None, routing=None):
        self.n = nvectors
        self.table = bytearray(16 * nvectors)
        for v in range(nvectors):
            struct.pack_into("<I", self.table, 16 * v + 12, 1)  # masked at reset
        self.pending = 0
        self.control = 0           # message control bits 15 (enable) and 14 (function mask)
        self.config_vector = NO_VECTOR
        self.queue_vectors: list[int] = []
        self.isr = 0
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(nvectors)]
        self.vm = vm
        self.routing = routing
        self.gsis = [routing.allocate() for _ in self.fds] if vm is not None else []
        self._irqfds_on = False
        self._lock = threading.Lock()

    def _masked(self, v: int) -> bool:
        return bool(self.control & MSIX_MASKALL or self.table[16 * v + 12] & 1)

    def _fire(self, v: int) -> None:
        """Deliver vector v now, or leave it pending; caller holds the lock."""
        if v == NO_VECTOR or v >= self.n or not self.control & MSIX_ENABLE:
            return
        if self._masked(v):
            self.pending |= 1 << v
            return
        os.eventfd_write(self.fds[v], 1)

    def signal_queue(self, index: int) -> None:
        with self._lock:
            self.isr |= 1
            v = self.queue_vectors[index] if index < len(self.queue_vectors) else NO_VECTOR
            self._fire(v)

    def signal_config(self) -> None:
        with self._lock:
            self.isr |= 2
            self._fire(self.config_vector)

    def call_fd(self, index: int) -> int | None:
        with self._lock:
            v = self.queue_vectors[index] if index < len(self.queue_vectors) else NO_VECTOR
            if v == NO_VECTOR or v >= self.n or not self.control & MSIX_ENABLE or self._masked(v):
                return None
            return self.fds[v]

    def read_isr(self) -> int:
        with self._lock:
            isr, self.isr = self.isr, 0
            return isr

    # -- guest writes --------------------------------------------------------

    def _route(self, v: int) -> None:
        if self.vm is None:
            return
        lo, hi, data, _ = struct.unpack_from("<IIII", self.table, 16 * v)
        self.routing.set_msi(self.gsis[v], (hi << 32) | lo, data)
        if not self._irqfds_on:
            for fd, gsi in zip(self.fds, self.gsis):
                self.vm.irqfd(fd, gsi)
            self._irqfds_on = True

    def _unmasked(self) -> None:
        """After any unmask: program routes and deliver what was pending."""
        for v in range(self.n):
            if not self._masked(v) and self.control & MSIX_ENABLE:
                self._route(v)
                if self.pending & (1 << v):
                    self.pending &= ~(1 << v)
                    os.eventfd_write(self.fds[v], 1)

    def table_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset + size > len(self.table):
                return 0
            return int.from_bytes(self.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset + size > len(self.table):
                return
            was_masked = [self._masked(v) for v in range(self.n)]
            self.table[offset:offset + size] = value.to_bytes(size, "little")
            for v in range(self.n):  # vector control: only the mask bit is writable
                ctrl = struct.unpack_from("<I", self.table, 16 * v + 12)[0]
                struct.pack_into("<I", self.table, 16 * v + 12, ctrl & 1)
            v = offset // 16
            if not self._masked(v) and self.control & MSIX_ENABLE:
                self._route(v)  # a live entry changed, or was just unmasked
            if any(m and not self._masked(i) for i, m in enumerate(was_masked)):
                self._unmasked()

    def pba_read(self, offset: int, size: int) -> int:
        with self._lock:
            return (self.pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def set_control(self, control: int) -> None:
        with self._lock:
            self.control = control & (MSIX_ENABLE | MSIX_MASKALL)
            self._unmasked()

    def reset(self) -> None:
        with self._lock:
            self.config_vector = NO_VECTOR
            self.queue_vectors = [NO_VECTOR] * len(self.queue_vectors)
            self.isr = 0

    def close(self) -> None:
        if self.vm is not None and self._irqfds_on:
            for fd, gsi in zip(self.fds, self.gsis):
                try:
                    self.vm.irqfd(fd, gsi, deassign=True)
                except Exception:
                    pass
        for fd in self.fds:
            os.close(fd)


class VirtioPci(PciFunction):
    def __init__(self, core: VirtioCore, vm=None, routing=None):
        dev = core.device
        super().__init__(VENDOR, DEVICE_BASE + dev.device_id, class_code=0x018000, revision=1,
                         subsys_vendor=VENDOR, subsys_id=SUBSYS_ID)
        self.core = core
        self.vm = vm
        nq = len(core.queues)
        self.msix = MsixInterrupt(nq + 1, vm, routing)
        self.msix.queue_vectors = [NO_VECTOR] * nq
        core.interrupt = self.msix
        self.dfselect = self.gfselect = self.qselect = 0
        self._notify_at: int | None = None
        self._warned: set[str] = set()
        self.add_bar(Bar(BAR_INDEX, BAR_SIZE, _BarHandler(self), is64=True))
        self.msix_cap = self.add_capability(CAP_MSIX, struct.pack(
            "<HII", nq, MSIX_TABLE | BAR_INDEX, MSIX_PBA | BAR_INDEX))
        for cfg_type, off, length in ((CFG_COMMON, COMMON, COMMON_SIZE), (CFG_ISR, ISR, 1),
                                      (CFG_DEVICE, DEVICE_CFG, 0x100)):
            self.add_capability(CAP_VENDOR, struct.pack("<BBBBBBII", 16, cfg_type, BAR_INDEX, 0,
                                                         0, 0, off, length))
        self.add_capability(CAP_VENDOR, struct.pack("<BBBBBBIII", 20, CFG_NOTIFY, BAR_INDEX, 0, 0,
                                                     0, NOTIFY, NOTIFY_MULTIPLIER * nq,
                                                     NOTIFY_MULTIPLIER))
        self.pci_cfg_cap = self.add_capability(CAP_VENDOR, struct.pack(
            "<BBBBBBIII", 20, CFG_PCI, 0, 0, 0, 0, 0, 0, 0))

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: " + msg, self.core.name, *args)

    # -- config space: MSI-X control and the PCI-cfg access window ---------------

    def capability_write_byte(self, off: int, byte: int) -> None:
        if off == self.msix_cap + 3:  # message control, high byte: enable and function mask
            self.config[off] = byte & 0xC0
        elif self.pci_cfg_cap + 4 <= off < self.pci_cfg_cap + 5:  # cap.bar
            self.config[off] = byte
        elif self.pci_cfg_cap + 8 <= off < self.pci_cfg_cap + 20:  # offset, length, data
            self.config[off] = byte

    def after_config_write(self, offset: int, size: int) -> None:
        if offset <= self.msix_cap + 3 < offset + size:
            self.msix.set_control(struct.unpack_from("<H", self.config, self.msix_cap + 2)[0])
            self.core.device.interrupts_changed()
        data = self.pci_cfg_cap + 16
        if offset < data + 4 and offset + size > data:
            self._pci_cfg_access(write=True)

    def config_read(self, offset: int, size: int) -> int:
        data = self.pci_cfg_cap + 16
        if offset < data + 4 and offset + size > data:
            self._pci_cfg_access(write=False)
        return super().config_read(offset, size)

    def _pci_cfg_access(self, write: bool) -> None:
        cap = self.pci_cfg_cap
        bar = self.config[cap + 4]
        off, length = struct.unpack_from("<II", self.config, cap + 8)
        if bar != BAR_INDEX or length not in (1, 2, 4) or off + length > BAR_SIZE:
            return
        handler = self.bars[BAR_INDEX].handler
        if write:
            value = int.from_bytes(self.config[cap + 16:cap + 16 + length], "little")
            handler.write(off, length, value)
        else:
            value = handler.read(off, length)
            self.config[cap + 16:cap + 20] = value.to_bytes(4, "little")

    # -- BAR moves: the notify ioeventfds follow the BAR ----------------------------

    def bar_moved(self, bar: Bar) -> None:
        if self.vm is None:
            return
        for i, fd in enumerate(self.core.kicks):
            if self._notify_at is not None:
                self.vm.ioeventfd(fd, self._notify_at + NOTIFY + NOTIFY_MULTIPLIER * i, 2,
                                  deassign=True)
            if bar.mapped_at is not None:
                self.vm.ioeventfd(fd, bar.mapped_at + NOTIFY + NOTIFY_MULTIPLIER * i, 2)
        self._notify_at = bar.mapped_at

    # -- BAR contents ------------------------------------------------------------

    def bar_read(self, offset: int, size: int) -> int:
        if offset < COMMON + COMMON_SIZE:
            return self._common_read(offset, size)
        if offset == ISR:
            return self.msix.read_isr()
        if DEVICE_CFG <= offset < DEVICE_CFG + 0x100:
            return self.core.device.read_config(offset - DEVICE_CFG, size)
        if MSIX_TABLE <= offset < MSIX_PBA:
            return self.msix.table_read(offset - MSIX_TABLE, size)
        if MSIX_PBA <= offset < MSIX_PBA + 8:
            return self.msix.pba_read(offset - MSIX_PBA, size)
        return 0

    def bar_write(self, offset: int, size: int, value: int) -> None:
        if offset < COMMON + COMMON_SIZE:
            self._common_write(offset, size, value)
        elif DEVICE_CFG <= offset < DEVICE_CFG + 0x100:
            self.core.device.write_config(offset - DEVICE_CFG, size, value)
        elif NOTIFY <= offset < NOTIFY + NOTIFY_MULTIPLIER * len(self.core.kicks):
            q = (offset - NOTIFY) // NOTIFY_MULTIPLIER
            os.eventfd_write(self.core.kicks[q], 1)
        elif MSIX_TABLE <= offset < MSIX_PBA:
            self.msix.table_write(offset - MSIX_TABLE, size, value)
            self.core.device.interrupts_changed()

    def _queue(self):
        qs = self.core.queues
        return qs[self.qselect] if self.qselect < len(qs) else None

    def _common_read(self, offset: int, size: int) -> int:
        core = self.core
        q = self._queue()
        fields = {
            C_DFSELECT: (4, self.dfselect),
            C_DF: (4, core.device_features_word(self.dfselect)),
            C_GFSELECT: (4, self.gfselect),
            C_GF: (4, (core.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF
                   if self.gfselect < 2 else 0),
            C_MSIX: (2, self.msix.config_vector),
            C_NUMQ: (2, len(core.queues)),
            C_STATUS: (1, core.status),
            C_CFGGEN: (1, core.config_generation),
            C_QSELECT: (2, self.qselect),
            C_QSIZE: (2, q.size if q else 0),
            C_QMSIX: (2, self.msix.queue_vectors[self.qselect] if q else NO_VECTOR),
            C_QENABLE: (2, int(q.ready) if q else 0),
            C_QNOFF: (2, self.qselect if q else 0),
            C_QDESC: (8, q.desc_table if q else 0),
            C_QAVAIL: (8, q.avail_ring if q else 0),
            C_QUSED: (8, q.used_ring if q else 0),
        }
        return _field_read(fields, offset, size)

    def _common_write(self, offset: int, size: int, value: int) -> None:
        core = self.core
        q = self._queue()
        if offset == C_DFSELECT and size == 4:
            self.dfselect = value
        elif offset == C_GFSELECT and size == 4:
            self.gfselect = value
        elif offset == C_GF and size == 4:
            core.set_driver_features_word(self.gfselect, value)
        elif offset == C_MSIX and size == 2:
            self.msix.config_vector = value if value < self.msix.n else NO_VECTOR
        elif offset == C_STATUS and size == 1:
            if value == 0:
                self.msix.reset()
            core.write_status(value)
        elif offset == C_QSELECT and size == 2:
            self.qselect = value
        elif q is None:
            self._warn_once("qsel", "queue %d does not exist", self.qselect)
        elif offset == C_QMSIX and size == 2:
            self.msix.queue_vectors[self.qselect] = value if value < self.msix.n else NO_VECTOR
            self.core.device.interrupts_changed()
        elif offset == C_QENABLE and size == 2:
            if value == 1:
                q.ready = True
        elif q.ready or core.status & DRIVER_OK:
            self._warn_once("qlive", "queue %d reconfigured while enabled; ignored", q.index)
        elif offset == C_QSIZE and size == 2:
            q.size = value
        elif offset in (C_QDESC, C_QDESC + 4, C_QAVAIL, C_QAVAIL + 4, C_QUSED, C_QUSED + 4) \
                and size in (4, 8):
            base = offset & ~7
            attr = {C_QDESC: "desc_table", C_QAVAIL: "avail_ring", C_QUSED: "used_ring"}[base]
            old = getattr(q, attr)
            if size == 8:
                new = value
            elif offset == base:
                new = (old & ~0xFFFFFFFF) | value
            else:
                new = (old & 0xFFFFFFFF) | (value << 32)
            setattr(q, attr, new)
        else:
            self._warn_once(f"c{offset}.{size}", "%d-byte write to common config %#x ignored",
                            size, offset)

    def close(self) -> None:
        self.core.close()
        self.msix.close()


def _field_read(fields: dict, offset: int, size: int) -> int:
    """Read ``size`` bytes at ``offset`` from a map of {offset: (width, value)}."""
    out = 0
    for i in range(size):
        byte = 0
        for start, (width, value) in fields.items():
            if start <= offset + i < start + width:
                byte = (value >> (8 * (offset + i - start))) & 0xFF
                break
        out |= byte << (8 * i)
    return out


class _BarHandler:
    """The bus device for BAR 0 (the MMIO bus hands it BAR-relative offsets)."""

    def __init__(self, fn: VirtioPci):
        self.fn = fn

    def read(self, offset: int, size: int) -> int:
        return self.fn.bar_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.fn.bar_write(offset, size, value)
