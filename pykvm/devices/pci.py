"""PCI: a host bridge on bus 0 reached by configuration mechanism #1, and the
type-0 configuration header every function shares.

Ports 0xcf8 (CONFIG_ADDRESS: enable bit 31, bus 23:16, device 15:11,
function 10:8, register 7:2) and 0xcfc-0xcff (CONFIG_DATA). Only bus 0
exists; absent functions read as all-ones. There is no firmware: the VMM
assigns every BAR at start and enables memory decoding; the guest may size
and move BARs (``PciFunction`` re-maps them on the MMIO bus as it does).
"""
from __future__ import annotations

import logging
import struct
import threading

log = logging.getLogger("pykvm.pci")

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC

# Header offsets
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, HEADER_TYPE = 0x08, 0x09, 0x0E
BAR0 = 0x10
SUBSYS_VENDOR, SUBSYS_ID = 0x2C, 0x2E
CAP_PTR, INTERRUPT_LINE, INTERRUPT_PIN = 0x34, 0x3C, 0x3D

CMD_IO, CMD_MEMORY, CMD_BUS_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
STATUS_CAP_LIST = 0x10
BAR_MEM64 = 0x4
CONFIG_SIZE = 256


class Bar:
    """A memory BAR: ``size`` (power of two >= 4 KiB), 64-bit or not, and a
    handler with read(offset, size)/write(offset, size, value)."""

    def __init__(self, index: int, size: int, handler, is64: bool = True):
        if size & (size - 1) or size < 0x1000:
            raise ValueError(f"BAR size {size:#x} is not a power of two >= 4 KiB")
        self.index = index
        self.size = size
        self.handler = handler
        self.is64 = is64
        self.address = 0
        self.mapped_at: int | None = None


class PciFunction:
    """A type-0 function: config space, BARs and a capability list.

    Subclasses build their capabilities with ``add_capability`` and react to
    BAR moves in ``bar_moved``. Writes are honoured only in writable fields;
    every other byte keeps its value, whatever the guest writes.
    """

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsys_vendor: int = 0, subsys_id: int = 0):
        self.config = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        self.config[REVISION] = revision
        self.config[CLASS_PROG:CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        struct.pack_into("<HH", self.config, SUBSYS_VENDOR, subsys_vendor, subsys_id)
        self.bars: dict[int, Bar] = {}
        self._cap_end = 0x40
        self._last_cap: int | None = None
        self.mmio_bus = None   # set by PciHost.attach
        self._lock = threading.RLock()

    # -- building ------------------------------------------------------------

    def add_bar(self, bar: Bar) -> None:
        self.bars[bar.index] = bar
        flags = BAR_MEM64 if bar.is64 else 0
        struct.pack_into("<I", self.config, BAR0 + 4 * bar.index, flags)

    def add_capability(self, cap_id: int, body: bytes) -> int:
        """Append a capability (id, next, body...) and return its offset."""
        off = self._cap_end
        length = 2 + len(body)
        if off + length > CONFIG_SIZE:
            raise ValueError("PCI capabilities overflow config space")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        self.config[off + 2:off + length] = body
        if self._last_cap is None:
            self.config[CAP_PTR] = off
            struct.pack_into("<H", self.config, STATUS,
                             struct.unpack_from("<H", self.config, STATUS)[0] | STATUS_CAP_LIST)
        else:
            self.config[self._last_cap + 1] = off
        self._last_cap = off
        self._cap_end = (off + length + 3) & ~3
        return off

    # -- config space access (called with the function's offset) ---------------

    def config_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset + size > CONFIG_SIZE:
                return (1 << (8 * size)) - 1
            return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset + size > CONFIG_SIZE:
                return
            for i in range(size):
                self._config_write_byte(offset + i, (value >> (8 * i)) & 0xFF)
            self._after_config_write(offset, size)

    def _config_write_byte(self, off: int, byte: int) -> None:
        if off in (COMMAND, COMMAND + 1):
            mask = (CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE) >> (8 * (off - COMMAND))
            self.config[off] = (self.config[off] & ~mask & 0xFF) | (byte & mask)
        elif BAR0 <= off < BAR0 + 24:
            self.config[off] = byte  # BAR sizing is resolved in _after_config_write
        elif off == INTERRUPT_LINE:
            self.config[off] = byte
        elif off >= 0x40:
            self.capability_write_byte(off, byte)

    def capability_write_byte(self, off: int, byte: int) -> None:
        """Writable capability bytes are the subclass's business; others stay."""

    def _after_config_write(self, offset: int, size: int) -> None:
        if offset < BAR0 + 24 and offset + size > BAR0:
            self._fix_bars()
        if offset <= COMMAND < offset + size or offset < BAR0 + 24 and offset + size > BAR0:
            self._remap()
        self.after_config_write(offset, size)

    def after_config_write(self, offset: int, size: int) -> None:
        """Hook for subclasses (capability side effects)."""

    def _fix_bars(self) -> None:
        """Apply the size mask: the low bits of an address the guest wrote read
        back as the BAR's flags, so writing all-ones reads back ~(size-1)."""
        for i in range(6):
            bar = self.bars.get(i)
            reg = BAR0 + 4 * i
            if bar is None:
                owner = self.bars.get(i - 1)
                if owner is not None and owner.is64:
                    hi = struct.unpack_from("<I", self.config, reg)[0]
                    lo = struct.unpack_from("<I", self.config, reg - 4)[0] & ~0xF
                    addr = ((hi << 32) | lo) & ~(owner.size - 1) & ((1 << 64) - 1)
                    owner.address = addr
                    struct.pack_into("<I", self.config, reg, addr >> 32)
                else:
                    struct.pack_into("<I", self.config, reg, 0)
                continue
            raw = struct.unpack_from("<I", self.config, reg)[0]
            flags = BAR_MEM64 if bar.is64 else 0
            lo = raw & ~(bar.size - 1) & 0xFFFFFFF0
            struct.pack_into("<I", self.config, reg, lo | flags)
            hi = struct.unpack_from("<I", self.config, reg + 4)[0] if bar.is64 else 0
            bar.address = (hi << 32) | lo

    def set_bar_address(self, index: int, address: int) -> None:
        """What firmware would do: program a BAR (the VMM does it at start)."""
        bar = self.bars[index]
        with self._lock:
            struct.pack_into("<I", self.config, BAR0 + 4 * index,
                             (address & 0xFFFFFFF0) | (BAR_MEM64 if bar.is64 else 0))
            if bar.is64:
                struct.pack_into("<I", self.config, BAR0 + 4 * index + 4, address >> 32)
            self._fix_bars()
            self._remap()

    def enable(self, command: int = CMD_MEMORY | CMD_BUS_MASTER) -> None:
        self.config_write(COMMAND, 2, command)

    def _remap(self) -> None:
        """Place each BAR on the MMIO bus where its register and COMMAND say."""
        if self.mmio_bus is None:
            return
        decode = self.config[COMMAND] & CMD_MEMORY
        for bar in self.bars.values():
            want = bar.address if decode and bar.address else None
            if want is not None and want + bar.size > self.mmio_bus.limit:
                want = None  # mid-sizing (all-ones) or beyond the physical address space
            if want == bar.mapped_at:
                continue
            if bar.mapped_at is not None:
                self.mmio_bus.unregister(bar.mapped_at)
                bar.mapped_at = None
            if want is not None:
                try:
                    self.mmio_bus.register(want, bar.size, bar.handler)
                    bar.mapped_at = want
                except ValueError as e:  # the guest placed it over something else
                    log.warning("BAR%d at %#x not mapped: %s", bar.index, want, e)
            self.bar_moved(bar)

    def bar_moved(self, bar: Bar) -> None:
        """Hook: ``bar.mapped_at`` changed (None: unmapped)."""


class HostBridge(PciFunction):
    def __init__(self):
        # Red Hat's generic PCI host bridge id, as QEMU uses for its own
        super().__init__(0x1B36, 0x0008, class_code=0x060000)


class PciHost:
    """Configuration mechanism #1 over bus 0; a PIO bus device at 0xcf8..0xcff."""

    def __init__(self, mmio_bus):
        self.mmio_bus = mmio_bus
        self.address = 0
        self.functions: dict[tuple[int, int], PciFunction] = {}
        self.attach(HostBridge(), slot=0)

    def attach(self, fn: PciFunction, slot: int | None = None) -> int:
        if slot is None:
            slot = next(s for s in range(1, 32) if (s, 0) not in self.functions)
        if (slot, 0) in self.functions:
            raise ValueError(f"PCI slot {slot} is taken")
        fn.mmio_bus = self.mmio_bus
        self.functions[(slot, 0)] = fn
        return slot

    def _target(self):
        a = self.address
        if not a & 0x80000000 or (a >> 16) & 0xFF:
            return None, 0
        return self.functions.get(((a >> 11) & 0x1F, (a >> 8) & 7)), a & 0xFC

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            if offset == 0 and size == 4:
                return self.address
            return (1 << (8 * size)) - 1
        fn, reg = self._target()
        if fn is None:
            return (1 << (8 * size)) - 1
        return fn.config_read(reg + (offset - 4), size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value & 0x80FFFFFC
            return
        fn, reg = self._target()
        if fn is not None:
            fn.config_write(reg + (offset - 4), size, value)
