"""Guest RAM: its regions, bounds-checked access, and the table C translates with.

``GuestMemory`` is the RAM of a VM of ours. RAM starts at guest-physical 0.
Below 4 GiB it stops at ``HOLE_START`` (the device hole: virtio-MMIO windows,
PCI BARs, IOAPIC, LAPIC); anything above goes to 4 GiB and up. One host mapping
backs all of it (MADV_HUGEPAGE, as QEMU does: on this host THP is available for
anonymous memory only, so no memfd).

Every access is bounds-checked against the region table: a range must lie
wholly inside one region, or GuestMemoryError is raised. The same table, as an
array of ``struct pykvm_mem_region``, is what the C fast path translates with.

``FdMemory`` is RAM a vhost-user front-end shares by file descriptor: the same
accessors over regions mapped from its fds.
"""
from __future__ import annotations

import collections
import fcntl
import mmap
import os

from ._native import ffi
from .errors import GuestMemoryError

HOLE_START = 0xC000_0000
HIGH_START = 0x1_0000_0000
PAGE_SIZE = 4096


class Region(collections.namedtuple("Region", "gpa size hva")):
    """RAM at [gpa, gpa+size), mapped in this process at ``hva``."""

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.gpa + self.size


class _Mapped(collections.namedtuple("_Mapped", "gpa end hva view u16")):
    """One region as the accessors use it: its bytes and a uint16_t pointer."""

    __slots__ = ()


class MappedMemory:
    """Guest RAM as a set of regions, each mapped in this process.

    ``regions`` is sorted by gpa and never overlaps; ``table`` is the same as
    the C fast path's ``struct pykvm_mem_region`` array. Subclasses say where
    the bytes come from (an anonymous mapping for a VM of ours, the front-end's
    file descriptors for vhost-user).
    """

    def _set_regions(self, parts) -> None:
        """``parts``: (gpa, buffer) per region; each buffer stays alive here."""
        parts = sorted(parts, key=lambda p: p[0])
        end = 0
        for gpa, buf in parts:  # checked before anything is exported from the buffers
            if gpa < end:
                raise ValueError(f"memory regions overlap at {gpa:#x}")
            end = gpa + memoryview(buf).nbytes
        regions, mapped = [], []
        for gpa, buf in parts:
            view = memoryview(buf).cast("B")
            if view.nbytes == 0:
                continue
            cbuf = ffi.from_buffer(view)
            hva = int(ffi.cast("uintptr_t", cbuf))
            regions.append(Region(gpa, view.nbytes, hva))
            mapped.append(_Mapped(gpa, gpa + view.nbytes, hva, view,
                                  ffi.cast("volatile uint16_t *", cbuf)))
        self.regions = regions
        self._mapped = mapped
        # the accessors' fast path: (gpa, end, view, u16) per region, plain tuples
        self._spans = tuple((m.gpa, m.end, m.view, m.u16) for m in mapped)
        self.size = sum(r.size for r in regions)
        self.table = ffi.new("struct pykvm_mem_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            self.table[i].gpa = r.gpa
            self.table[i].size = r.size
            self.table[i].hva = r.hva

    # -- translation -------------------------------------------------------

    def _locate(self, gpa: int, length: int) -> tuple[_Mapped, int]:
        """The region holding [gpa, gpa+length) and the offset in it; raise
        unless the range lies wholly inside one region."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(gpa, max(length, 0), "has a negative address or length")
        for m in self._mapped:
            if m.gpa <= gpa < m.end or (length == 0 and gpa == m.end):
                if length > m.end - gpa:
                    raise GuestMemoryError(gpa, length, "crosses the end of guest RAM")
                return m, gpa - m.gpa
        raise GuestMemoryError(gpa, length)

    # The accessors below try the common case first (a range starting inside
    # a region and not longer than what is left of it) and otherwise ask
    # _locate, which also decides the edge cases (zero length at a region's
    # end) and raises the errors: same answers, fewer steps per access.

    def contains(self, gpa: int, length: int) -> bool:
        for start, end, _, _ in self._spans:
            if start <= gpa < end:
                if 0 <= length <= end - gpa:
                    return True
                break
        try:
            self._locate(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def hva_of(self, gpa: int, length: int = 1) -> int:
        """Host virtual address of a checked guest range (for iovecs and C)."""
        m, off = self._locate(gpa, length)
        return m.hva + off

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of a checked range."""
        for start, end, view, _ in self._spans:
            if start <= gpa < end:
                if 0 <= length <= end - gpa:
                    return view[gpa - start:gpa - start + length]
                break
        m, off = self._locate(gpa, length)
        return m.view[off:off + length]

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
        if not gpa & 1:
            for start, end, _, u16 in self._spans:
                if start <= gpa < end:
                    if gpa + 2 <= end:
                        return u16[(gpa - start) >> 1]
                    break
        m, off = self._locate(gpa, 2)
        if gpa & 1:
            raise GuestMemoryError(gpa, 2, "is not 2-byte aligned")
        return m.u16[off >> 1]

    def store_u16(self, gpa: int, value: int) -> None:
        """One aligned 16-bit store, never seen half-done by the guest."""
        if not gpa & 1:
            for start, end, _, u16 in self._spans:
                if start <= gpa < end:
                    if gpa + 2 <= end:
                        u16[(gpa - start) >> 1] = value & 0xFFFF
                        return
                    break
        m, off = self._locate(gpa, 2)
        if gpa & 1:
            raise GuestMemoryError(gpa, 2, "is not 2-byte aligned")
        m.u16[off >> 1] = value & 0xFFFF

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        m, off = self._locate(gpa, length)
        chunk = bytes([byte]) * min(length, 1 << 20)
        while length:
            n = min(length, len(chunk))
            m.view[off:off + n] = chunk[:n]
            off += n
            length -= n

    def close(self) -> None:
        self.table = None
        for m in self._mapped:
            try:
                m.view.release()
            except BufferError:
                pass
        self._mapped = []
        self._spans = ()
        for mp in self._maps:
            try:
                mp.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with the process
        self._maps = []


class GuestMemory(MappedMemory):
    """All RAM of a VM of ours: one anonymous mapping on transparent huge pages."""

    def __init__(self, size: int, hugepages: bool = True):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size:#x} is not a positive multiple of 4 KiB")
        mp = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       mmap.PROT_READ | mmap.PROT_WRITE)
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mp.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # THP disabled on the host: 4 KiB pages still work
        self._maps = [mp]
        whole = memoryview(mp)
        low = min(size, HOLE_START)
        parts = [(0, whole[:low])]
        if size > low:
            parts.append((HIGH_START, whole[low:]))
        self._set_regions(parts)
        self.hva = self.regions[0].hva
        whole.release()


class FdMemory(MappedMemory):
    """RAM another process shares with us by file descriptor (a vhost-user
    front-end's SET_MEM_TABLE): ``(gpa, size, fd, fd_offset)`` per region.

    The fds are mapped shared and may be closed afterwards. A region that
    cannot be mapped raises OSError (a bad fd) or ValueError (a size past
    the end of its file, overlapping regions), and nothing stays mapped.
    """

    def __init__(self, regions):
        self._maps = []
        parts = []
        try:
            for gpa, size, fd, fd_offset in regions:
                if size <= 0 or gpa < 0 or fd_offset < 0 or fd_offset % 8 or \
                        gpa % 8 or gpa + size > 1 << 64:
                    raise ValueError(f"memory region at {gpa:#x} has size {size:#x} "
                                     f"and offset {fd_offset:#x}")
                # a mapping past the end of its file would fault (SIGBUS) on
                # access: refuse one, and seal a memfd against shrinking where
                # the front-end allows it (QEMU seals its memfds itself)
                try:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
                except OSError:
                    pass
                if os.fstat(fd).st_size < fd_offset + size:
                    raise ValueError(f"memory region at {gpa:#x}: {size:#x} bytes at offset "
                                     f"{fd_offset:#x} run past the end of its file")
                # map from the file's start: mmap offsets must be page aligned,
                # the front-end's need not be
                mp = mmap.mmap(fd, fd_offset + size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
                self._maps.append(mp)
                parts.append((gpa, memoryview(mp)[fd_offset:]))
            self._set_regions(parts)
        except BaseException:
            for _, v in parts:
                v.release()
            for mp in self._maps:
                try:
                    mp.close()
                except BufferError:
                    pass  # still exported somewhere: unmapped when collected
            raise
