"""virtio-MMIO, version 2 only (virtio 1.x spec 4.2.2).

One 4 KiB window per device. Registers are 32-bit and accessed 32 bits at a
time (anything else reads 0 / is ignored, with a log line); the device config
space from 0x100 takes any width. Queue notifications arrive on each queue's
kick eventfd: KVM writes it through an ioeventfd on QueueNotify (datamatch =
queue index), and a notify write that reaches us as an exit anyway (e.g. no
KVM) writes it by hand. The interrupt is an irqfd on the window's IOAPIC line
plus the InterruptStatus bits.
"""
from __future__ import annotations

import logging
import os
import threading

from ..device import Interrupt, VirtioCore

log = logging.getLogger("pykvm.virtio")

WINDOW_SIZE = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D56_4B50  # "PKVM"

MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

INT_USED_BUFFER = 1
INT_CONFIG = 2


class MmioInterrupt(Interrupt):
    """InterruptStatus bits plus one eventfd (an irqfd on the window's GSI)."""

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.status = 0
        self._lock = threading.Lock()

    def _raise(self, bit: int) -> None:
        with self._lock:
            self.status |= bit
        os.eventfd_write(self.fd, 1)

    def signal_queue(self, index: int) -> None:
        self._raise(INT_USED_BUFFER)

    def signal_config(self) -> None:
        self._raise(INT_CONFIG)

    def ack(self, bits: int) -> None:
        with self._lock:
            self.status &= ~bits

    def call_fd(self, index: int) -> int | None:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


class VirtioMmio:
    """The register window of one device (a bus device at ``base``)."""

    def __init__(self, core: VirtioCore, base: int, gsi: int, vm=None):
        self.core = core
        self.base = base
        self.gsi = gsi
        self.vm = vm
        self.interrupt = MmioInterrupt()
        core.interrupt = self.interrupt
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self._warned: set[str] = set()
        if vm is not None:
            vm.irqfd(self.interrupt.fd, gsi)
            for i, fd in enumerate(core.kicks):
                vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=i)

    @property
    def cmdline(self) -> str:
        """How a Linux guest learns of this device without ACPI."""
        return f"virtio_mmio.device={WINDOW_SIZE // 1024}K@{self.base:#x}:{self.gsi}"

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: " + msg, self.core.name, *args)

    def _queue(self):
        if self.queue_sel < len(self.core.queues):
            return self.core.queues[self.queue_sel]
        return None

    # -- bus device ------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            return self.core.device.read_config(offset - CONFIG, size)
        if size != 4 or offset & 3:
            self._warn_once(f"r{offset}", "%d-byte read of register %#x ignored", size, offset)
            return 0
        core = self.core
        q = self._queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return core.device.device_id
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return core.device_features_word(self.device_features_sel)
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt.status
        if offset == STATUS:
            return core.status
        if offset == CONFIG_GENERATION:
            return core.config_generation
        if offset == SHM_LEN_LOW or offset == SHM_LEN_HIGH:
            return 0xFFFFFFFF  # no shared memory regions: length -1
        if offset in (QUEUE_NUM, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                      QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH) and q is not None:
            return {QUEUE_NUM: q.size,
                    QUEUE_DESC_LOW: q.desc_table & 0xFFFFFFFF, QUEUE_DESC_HIGH: q.desc_table >> 32,
                    QUEUE_DRIVER_LOW: q.avail_ring & 0xFFFFFFFF, QUEUE_DRIVER_HIGH: q.avail_ring >> 32,
                    QUEUE_DEVICE_LOW: q.used_ring & 0xFFFFFFFF, QUEUE_DEVICE_HIGH: q.used_ring >> 32,
                    }[offset]
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        core = self.core
        if offset >= CONFIG:
            core.device.write_config(offset - CONFIG, size, value)
            return
        if size != 4 or offset & 3:
            self._warn_once(f"w{offset}", "%d-byte write to register %#x ignored", size, offset)
            return
        if offset == QUEUE_NOTIFY:
            if value < len(core.kicks):
                os.eventfd_write(core.kicks[value], 1)
            else:
                self._warn_once("notify", "notify of queue %d, which does not exist", value)
            return
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            core.set_driver_features_word(self.driver_features_sel, value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset == STATUS:
            core.write_status(value)
        elif offset in (QUEUE_NUM, QUEUE_READY, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW,
                        QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            self._write_queue(offset, value)
        else:
            self._warn_once(f"w{offset}", "write to read-only or unknown register %#x ignored",
                            offset)

    def _write_queue(self, offset: int, value: int) -> None:
        q = self._queue()
        if q is None:
            self._warn_once("qsel", "queue %d does not exist", self.queue_sel)
            return
        if offset == QUEUE_READY:
            q.ready = bool(value & 1)
            return
        if q.ready or self.core.status & 4:  # DRIVER_OK
            self._warn_once("qlive", "queue %d reconfigured while live; ignored", q.index)
            return
        if offset == QUEUE_NUM:
            q.size = value  # validated at DRIVER_OK (power of two, <= max)
        elif offset == QUEUE_DESC_LOW:
            q.desc_table = (q.desc_table & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc_table = (q.desc_table & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_ring = (q.avail_ring & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_ring = (q.avail_ring & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            q.used_ring = (q.used_ring & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_ring = (q.used_ring & 0xFFFFFFFF) | (value << 32)

    def close(self) -> None:
        if self.vm is not None:
            try:
                self.vm.irqfd(self.interrupt.fd, self.gsi, deassign=True)
                for i, fd in enumerate(self.core.kicks):
                    self.vm.ioeventfd(fd, self.base + QUEUE_NOTIFY, 4, datamatch=i, deassign=True)
            except Exception:
                pass
        self.core.close()
        self.interrupt.close()
