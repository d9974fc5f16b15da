"""Guest RAM: an anonymous mapping on transparent huge pages, and its regions.

RAM starts at guest-physical 0. Below 4 GiB it stops at ``HOLE_START`` (the
device hole: virtio-MMIO windows, PCI BARs, IOAPIC, LAPIC); anything above goes
to 4 GiB and up. One host mapping backs all of it (MADV_HUGEPAGE, as QEMU
does: on this host THP is available for anonymous memory only, so no memfd).

Every access is bounds-checked against the region table: a range must lie
wholly inside one region, or GuestMemoryError is raised. The same table, as an
array of ``struct pykvm_mem_region``, is what the C fast path translates with.
"""
from __future__ import annotations

import collections
import mmap

from ._native import ffi
from .errors import GuestMemoryError

HOLE_START = 0xC000_0000
HIGH_START = 0x1_0000_0000
PAGE_SIZE = 4096


class Region(collections.namedtuple("Region", "gpa size offset")):
    """RAM at [gpa, gpa+size), at ``offset`` inside the host mapping."""

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """All guest RAM. ``regions`` is sorted by gpa and never overlaps."""

    def __init__(self, size: int, hugepages: bool = True):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size:#x} is not a positive multiple of 4 KiB")
        self.size = size
        self._map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # THP disabled on the host: 4 KiB pages still work
        self._view = memoryview(self._map)
        self._cbuf = ffi.from_buffer(self._map)
        self._u16 = ffi.cast("volatile uint16_t *", self._cbuf)
        self.hva = int(ffi.cast("uintptr_t", self._cbuf))
        low = min(size, HOLE_START)
        regions = [Region(0, low, 0)]
        if size > low:
            regions.append(Region(HIGH_START, size - low, low))
        self.regions = regions
        self.table = ffi.new("struct pykvm_mem_region[]", len(regions))
        for i, r in enumerate(regions):
            self.table[i].gpa = r.gpa
            self.table[i].size = r.size
            self.table[i].hva = self.hva + r.offset

    # -- translation -------------------------------------------------------

    def _offset(self, gpa: int, length: int) -> int:
        """Host-mapping offset of [gpa, gpa+length); raise unless inside one region."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(gpa, max(length, 0), "has a negative address or length")
        for r in self.regions:
            if r.gpa <= gpa < r.end or (length == 0 and gpa == r.end):
                if length > r.end - gpa:
                    raise GuestMemoryError(gpa, length, "crosses the end of guest RAM")
                return r.offset + (gpa - r.gpa)
        raise GuestMemoryError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._offset(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def hva_of(self, gpa: int, length: int = 1) -> int:
        """Host virtual address of a checked guest range (for iovecs and C)."""
        return self.hva + self._offset(gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of a checked range."""
        off = self._offset(gpa, length)
        return self._view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_u(self, gpa: int, size: int, value: int) -> None:
        self.view(gpa, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def load_u16(self, gpa: int) -> int:
        """One aligned 16-bit load, never torn by a concurrent guest store.

        struct and memoryview copy byte by byte; ring indices shared with a
        running guest (avail->idx, used_event, ...) must use this instead.
        """
        off = self._offset(gpa, 2)
        if off & 1:
            raise GuestMemoryError(gpa, 2, "is not 2-byte aligned")
        return self._u16[off >> 1]

    def store_u16(self, gpa: int, value: int) -> None:
        """One aligned 16-bit store, never seen half-done by the guest."""
        off = self._offset(gpa, 2)
        if off & 1:
            raise GuestMemoryError(gpa, 2, "is not 2-byte aligned")
        self._u16[off >> 1] = value & 0xFFFF

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        off = self._offset(gpa, length)
        chunk = bytes([byte]) * min(length, 1 << 20)
        while length:
            n = min(length, len(chunk))
            self._view[off:off + n] = chunk[:n]
            off += n
            length -= n

    def close(self) -> None:
        self._cbuf = None
        self._u16 = None
        self.table = None
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
