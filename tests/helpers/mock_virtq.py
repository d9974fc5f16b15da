"""A driver-side model of a split virtqueue over plain GuestMemory (no KVM), for unit tests.

``MockVirtq`` plays the guest's virtio driver: it lays out the descriptor
table, avail ring and used ring, adds chains (direct or through an indirect
table), publishes them and reads back what the device returned. The raw
helpers write any value at all into the rings, for hostile tests.

    mem = GuestMemory(1 << 20)
    drv = MockVirtq(mem, size=8)
    q = drv.queue(event_idx=True)                      # a SplitQueue, configured and activated
    head = drv.add_chain([drv.arena.readable(b"hdr"), drv.arena.writable(512)])
    drv.publish()
    chain = q.pop(mem)
    q.add_used(mem, chain.head, 512)
    assert drv.used() == [(head, 512)]
"""
from __future__ import annotations

import struct

from pykvm.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                SplitQueue)

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def linked(descs: list[tuple[int, int, int]], slots) -> list[tuple[int, int, int, int]]:
    """``(addr, len, flags)`` descriptors held in table ``slots``, as ``(addr, len,
    flags, next)``: each but the last gets NEXT and the following slot."""
    slots = list(slots)
    out = [(a, n, f | VIRTQ_DESC_F_NEXT, slots[k + 1]) for k, (a, n, f) in enumerate(descs[:-1])]
    return out + [(*descs[-1], 0)]


class BufferArena:
    """Bump allocator for data buffers (and indirect tables) in [base, base+size) of guest RAM."""

    def __init__(self, mem, base: int, size: int):
        self.mem = mem
        self.base = base
        self.end = base + size
        self.next = base

    def alloc(self, length: int, data: bytes | None = None, align: int = 16) -> int:
        gpa = align_up(self.next, align)
        assert gpa + length <= self.end, f"arena exhausted: {length} bytes at {gpa:#x}"
        self.next = gpa + length
        if data is not None:
            self.mem.write(gpa, data)
        return gpa

    def readable(self, data: bytes) -> tuple[int, int, bool]:
        """A device-readable buffer holding ``data``, as an add_chain element."""
        return (self.alloc(len(data), data), len(data), False)

    def writable(self, length: int) -> tuple[int, int, bool]:
        """A zeroed device-writable buffer of ``length`` bytes, as an add_chain element."""
        gpa = self.alloc(length)
        self.mem.fill(gpa, length)
        return (gpa, length, True)


class MockVirtq:
    """The driver's half of one split virtqueue of ``size`` entries.

    Areas are laid out from ``base``: descriptor table, avail ring, used ring
    (each at its spec alignment); the rest of RAM from the next page on is the
    ``arena``. ``start_idx`` presets avail->idx and used->idx (the queue from
    ``queue()`` starts at the same index), for wrap-around tests.
    ``queue_class``: the device side ``queue()`` makes (SplitQueue, or its C
    twin fastpath.CQueue).
    """

    def __init__(self, mem, size: int, base: int = 0x1000, start_idx: int = 0,
                 queue_class=SplitQueue):
        self.mem = mem
        self.queue_class = queue_class
        self.size = size
        self.desc_table = align_up(base, 16)
        self.avail_ring = self.desc_table + 16 * size
        self.used_ring = align_up(self.avail_ring + 6 + 2 * size, 4)
        rings_end = self.used_ring + 6 + 8 * size
        mem.fill(self.desc_table, rings_end - self.desc_table)
        self.start_idx = start_idx & 0xFFFF
        self.next_avail = self.start_idx  # avail idx once everything added is published
        self.last_used = self.start_idx   # used entries the driver has consumed
        self.set_avail_idx(self.start_idx)
        mem.store_u16(self.used_ring + 2, self.start_idx)
        self.free = list(range(size))     # free descriptor indices
        self.chains: dict[int, list[int]] = {}  # head -> descriptors it holds
        self.returned: list[tuple[int, int]] = []
        arena_base = align_up(rings_end, 4096)
        self.arena = BufferArena(mem, arena_base, mem.size - arena_base)

    def queue(self, index: int = 0, *, max_size: int | None = None, event_idx: bool = False,
              indirect: bool = False) -> SplitQueue:
        """A device-side queue (``queue_class``) configured for this layout and activated."""
        q = self.queue_class(index, max_size or self.size)
        q.size = self.size
        q.desc_table, q.avail_ring, q.used_ring = self.desc_table, self.avail_ring, self.used_ring
        q.event_idx, q.indirect, q.ready = event_idx, indirect, True
        q.activate(self.mem, last_avail_idx=self.start_idx, used_idx=self.start_idx)
        return q

    # -- well-behaved driver ---------------------------------------------------

    def add_chain(self, bufs: list[tuple[int, int, bool]], indirect: bool = False,
                  table: int | None = None) -> int:
        """Add a chain of ``(gpa, len, writable)`` buffers and its avail ring entry
        (not yet published); return its head. With ``indirect``, the buffers go
        into an indirect table at ``table`` (default: allocated from the arena)."""
        assert bufs, "a chain has at least one buffer"
        descs = [(gpa, length, VIRTQ_DESC_F_WRITE if w else 0) for gpa, length, w in bufs]
        if indirect:
            table = self.arena.alloc(16 * len(descs)) if table is None else table
            self.write_table(table, linked(descs, range(len(descs))))
            descs = [(table, 16 * len(descs), VIRTQ_DESC_F_INDIRECT)]
        assert len(descs) <= len(self.free), "no free descriptors"
        idxs = [self.free.pop(0) for _ in descs]
        for i, desc in zip(idxs, linked(descs, idxs)):
            self.write_desc(i, *desc)
        head = idxs[0]
        self.chains[head] = idxs
        self.write_avail_entry(self.next_avail, head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return head

    def publish(self, n: int | None = None) -> None:
        """avail->idx += n (default: up to every chain added so far)."""
        idx = self.avail_idx()
        self.set_avail_idx(self.next_avail if n is None else idx + n)

    def reap(self) -> list[tuple[int, int]]:
        """Used elements (id, len) the device returned since the last reap; their
        descriptors go back to the free list."""
        new = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.used_ring + 4 + 8 * (self.last_used % self.size)
            elem = USED_ELEM.unpack(self.mem.read(slot, 8))
            self.free.extend(self.chains.pop(elem[0], []))
            new.append(elem)
            self.last_used = (self.last_used + 1) & 0xFFFF
        self.returned.extend(new)
        return new

    def used(self) -> list[tuple[int, int]]:
        """Every (id, len) the device has returned so far, in used ring order."""
        self.reap()
        return list(self.returned)

    # -- raw access, for hostile tests -----------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Descriptor ``i`` of the table (``i`` unchecked: any slot, any value)."""
        self.mem.write(self.desc_table + 16 * i, DESC.pack(addr, length, flags, next))

    def write_table(self, gpa: int, descs: list[tuple[int, int, int, int]]) -> None:
        """An indirect table of ``(addr, len, flags, next)`` descriptors at ``gpa``."""
        self.mem.write(gpa, b"".join(DESC.pack(*d) for d in descs))

    # Ring indices and flags are shared with a device that may be running
    # (a C I/O thread): each is read and written with one 16-bit access, as
    # the device does. read_u/write_u copy with memcpy, which loads byte 0
    # and then the word: a used->idx stored in between reads half old, half
    # new (0x00ff -> 0x0100 reads 0x01ff), and reap() would take 256 stale
    # entries (tests/unit/test_ring_indices.py).

    def write_avail_entry(self, idx: int, head: int) -> None:
        """avail->ring[idx % size] = head."""
        self.mem.store_u16(self.avail_ring + 4 + 2 * (idx % self.size), head)

    def avail_idx(self) -> int:
        return self.mem.load_u16(self.avail_ring + 2)

    def set_avail_idx(self, value: int) -> None:
        self.mem.store_u16(self.avail_ring + 2, value)

    def set_avail_flags(self, value: int) -> None:
        self.mem.store_u16(self.avail_ring, value)

    def set_used_event(self, value: int) -> None:
        self.mem.store_u16(self.avail_ring + 4 + 2 * self.size, value)

    def read_avail_event(self) -> int:
        return self.mem.load_u16(self.used_ring + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self.mem.load_u16(self.used_ring)

    def used_idx(self) -> int:
        return self.mem.load_u16(self.used_ring + 2)
