"""The split virtqueue, device side (virtio 1.x, section 2.7 "Split Virtqueues").

Three guest areas make a queue of ``size`` entries (a power of 2, at most 32768):

    area              bytes         align  layout
    descriptor table  16 * size     16     {le64 addr, le32 len, le16 flags, le16 next}[size]
    avail ring        6 + 2 * size  2      le16 flags, le16 idx, le16 ring[size], le16 used_event
    used ring         6 + 8 * size  4      le16 flags, le16 idx, {le32 id, le32 len}[size],
                                           le16 avail_event

The driver offers chains through the avail ring; the device takes them with
``pop``, returns them with ``add_used`` and asks ``needs_notification`` whether
to interrupt. Guest memory is passed into every operation and never kept: the
queue caches only the validated configuration (gpas and size) and its indices.

Every guest value is hostile and checked once, where it is read. A failed
check raises ``QueueError``, after which the device must set
DEVICE_NEEDS_RESET and stop serving the queue. No other exception can come out
of ``pop`` for any content of guest memory. The checks are listed in
``README.md`` next to this file; ``QueueError.check`` names the one that failed.
"""
from __future__ import annotations

import struct
import threading

from ..errors import PykvmError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
# An indirect table may hold max(size, INDIRECT_MIN_ENTRIES) descriptors. QEMU
# refuses chains of more than 1024 elements; Linux builds tables no longer than
# its segment limit (seg_max, which a device reports below the queue size).
INDIRECT_MIN_ENTRIES = 1024
# "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total" (2.7.5.2).
# One byte less is accepted, so that the used element's le32 len can always say
# how much was written.
MAX_CHAIN_BYTES = (1 << 32) - 1

# vhost-user's inflight region of a split queue (vhost-user.rst, "Inflight I/O
# tracking"): a header {le64 features, le16 version, le16 desc_num, le16
# last_batch_head, le16 used_idx}, then per descriptor {u8 inflight, u8 pad[5],
# le16 next, le64 counter}.
INFLIGHT_HEADER = 16
INFLIGHT_DESC = 16
_INFLIGHT_COUNTER = struct.Struct("<Q")

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_U64_MAX = (1 << 64) - 1
_FENCE = threading.Lock()


def smp_mb() -> None:
    """A full memory barrier (the C twin's __atomic_thread_fence(SEQ_CST)).

    Taking and dropping an uncontended lock is two locked read-modify-writes,
    each a full barrier on x86, done without releasing the GIL. A call into
    the native library would release it, and on a busy I/O thread getting it
    back costs a thread switch per barrier.
    """
    _FENCE.acquire()
    _FENCE.release()


class QueueError(PykvmError):
    """A fatal guest error on a queue: the device must go to DEVICE_NEEDS_RESET.

    ``check`` is a short stable name of the failed check (e.g. ``"head-index"``);
    ``str()`` is one line: queue, check, and the values that failed it.
    """

    def __init__(self, queue: int, check: str, detail: str):
        self.queue = queue
        self.check = check
        super().__init__(f"virtqueue {queue}: {check}: {detail}")


class Chain:
    """One descriptor chain as popped: device-readable buffers, then device-writable ones.

    Every ``(gpa, length)`` lies wholly inside guest RAM (length 0 is allowed,
    at any gpa inside RAM or at the end of a RAM region).
    """

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[tuple[int, int]],
                 writable: list[tuple[int, int]]):
        self.head = head
        self.readable = readable
        self.writable = writable

    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True when ``event`` lies in the 16-bit window (old, new]: the other
    side asked to be told once the index moved past ``event``."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class SplitQueue:
    """Device side of one split virtqueue, driven by one thread at a time.

    The transport writes ``size``, ``desc_table``, ``avail_ring``,
    ``used_ring`` and ``ready`` as the driver sets them, and ``event_idx`` /
    ``indirect`` from the negotiated features, then calls ``activate``. Until
    then (and after ``reset``) the queue is inactive: ``pop`` finds nothing, so
    a kick on a queue that was never set up is harmless.
    """

    def __init__(self, index: int, max_size: int):
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"virtqueue {index}: max_size {max_size} is not a power of 2 "
                             f"in [1, {MAX_QUEUE_SIZE}]")
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the power-on state: size ``max_size``, addresses 0, not ready,
        no features, indices 0, inactive."""
        self.size = self.max_size
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.ready = False
        self.event_idx = False
        self.indirect = False
        self._active = False
        # vhost-user inflight tracking: this queue's region (a writable
        # memoryview of at least INFLIGHT_HEADER + INFLIGHT_DESC * size bytes,
        # checked by whoever sets it) and the next fetch counter, or None
        self.inflight = None
        self.inflight_counter = 0
        self._start(0, 0)

    def _start(self, last_avail_idx: int, used_idx: int) -> None:
        self.last_avail_idx = last_avail_idx  # next avail ring entry to pop (16-bit)
        self.used_idx = used_idx              # the device's shadow of used->idx (16-bit)
        self.in_flight = 0                    # popped, not yet add_used (informational)
        self._pending = 0                     # entries known available past last_avail_idx
        self._signalled_used = used_idx       # used_idx when needs_notification last ran

    def activate(self, mem, *, last_avail_idx: int = 0, used_idx: int = 0) -> None:
        """Validate the configuration the driver wrote, once, and start serving.

        Checks: ``size`` is a power of 2 in [1, max_size]; ``desc_table`` is
        16-aligned, ``avail_ring`` 2-aligned, ``used_ring`` 4-aligned; each area
        (at its full size, event fields included) lies wholly inside guest RAM.
        Raises QueueError otherwise. The indices start at 0; other start values
        are for restoring a queue (vhost-user SET_VRING_BASE) and for tests.
        """
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(self.index, "queue-size",
                             f"size {size} is not a power of 2 in [1, {self.max_size}]")
        areas = (("desc_table", self.desc_table, 16, DESC_SIZE * size),
                 ("avail_ring", self.avail_ring, 2, 6 + 2 * size),
                 ("used_ring", self.used_ring, 4, 6 + 8 * size))
        for name, gpa, align, length in areas:
            if gpa % align:
                raise QueueError(self.index, "area-alignment",
                                 f"{name} {gpa:#x} is not {align}-byte aligned")
            if not mem.contains(gpa, length):
                raise QueueError(self.index, "area-outside-ram",
                                 f"{name} [{gpa:#x}, {gpa + length:#x}) is not inside guest RAM")
        self._size = size
        self._mask = size - 1
        self._desc = self.desc_table
        self._avail = self.avail_ring
        self._used = self.used_ring
        self._max_indirect = max(size, INDIRECT_MIN_ENTRIES)
        self._start(last_avail_idx & 0xFFFF, used_idx & 0xFFFF)
        self._active = True

    # -- driver -> device ----------------------------------------------------

    def _avail_ahead(self, mem) -> int:
        """Read avail->idx (one 16-bit load: the driver may be storing it right
        now); return how many entries it is ahead of last_avail_idx. Checks: at
        most ``size`` ahead (16-bit)."""
        idx = mem.load_u16(self._avail + 2)
        ahead = (idx - self.last_avail_idx) & 0xFFFF
        if ahead > self._size:
            raise QueueError(self.index, "avail-idx",
                             f"avail->idx {idx} is {ahead} ahead of last_avail_idx "
                             f"{self.last_avail_idx}, more than the queue size {self._size}")
        return ahead

    def pop(self, mem) -> Chain | None:
        """Take the next available chain, or return None when the ring is empty.

        Guest values read and checked here: avail->idx (see ``_avail_ahead``),
        the avail ring entry (head < size), and every descriptor of the chain
        (see ``_walk``). Raises QueueError on any violation; nothing is consumed
        then.
        """
        if not self._active:
            return None
        if not self._pending:
            self._pending = self._avail_ahead(mem)
            if not self._pending:
                return None
            # Read barrier: the ring entry and the descriptors are loaded after
            # avail->idx. Pairs with the driver's write barrier between filling
            # the ring and storing avail->idx (2.7.13.3.1). x86 keeps load-load
            # order, so no instruction is needed.
        last = self.last_avail_idx
        head = mem.load_u16(self._avail + 4 + 2 * (last & self._mask))
        if head >= self._size:
            raise QueueError(self.index, "head-index",
                             f"avail ring entry {last & self._mask} holds head {head}, "
                             f"not below the queue size {self._size}")
        chain = self._walk(mem, head)
        if self.inflight is not None:
            d = INFLIGHT_HEADER + INFLIGHT_DESC * head
            _INFLIGHT_COUNTER.pack_into(self.inflight, d + 8, self.inflight_counter)
            self.inflight_counter += 1
            # Write barrier: the counter is stored before the flag that makes
            # the entry count; pairs with the reader at reconnect (a new
            # process). x86 keeps store-store order.
            self.inflight[d] = 1
        self._pending -= 1
        self.last_avail_idx = (last + 1) & 0xFFFF
        self.in_flight += 1
        return chain

    def resubmit(self, mem, head: int) -> Chain:
        """The chain at ``head``, which the inflight region records as taken
        and not returned by an earlier back-end process (vhost-user reconnect).
        Checked as ``pop`` checks a chain; ``last_avail_idx`` is not moved
        (the caller sets it past every resubmitted chain)."""
        if not self._active:
            raise QueueError(self.index, "queue-size", "resubmit on an inactive queue")
        if head >= self._size:
            raise QueueError(self.index, "head-index",
                             f"inflight entry holds head {head}, not below the queue size "
                             f"{self._size}")
        chain = self._walk(mem, head)
        self.in_flight += 1
        return chain

    def _walk(self, mem, head: int) -> Chain:
        """Read the chain starting at descriptor ``head`` (already < size).

        Each descriptor is read once and checked: NEXT points inside its table;
        a chain has at most as many descriptors as its table has entries (so
        loops end); a buffer's addr+len does not pass 2^64 and lies wholly in
        RAM; no readable buffer follows a writable one; the chain carries at
        most 2^32 - 1 bytes. INDIRECT is refused unless negotiated, inside an
        indirect table, or together with NEXT; the table's length must be a
        non-zero multiple of 16 of at most max(size, 1024) entries, wholly in
        RAM. The WRITE flag of a descriptor that points to a table is ignored
        (2.7.5.3.2). Direct descriptors may precede the indirect one.
        """
        table = mem.view(self._desc, DESC_SIZE * self._size)
        entries = self._size
        table_gpa = None  # gpa of the indirect table being walked, if any
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        count = 0
        i = head
        while True:
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * i)
            count += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                n = self._check_indirect(mem, head, i, table_gpa, addr, length, flags)
                table = mem.view(addr, length)
                entries = n
                table_gpa = addr
                count = 0
                i = 0
                continue
            if addr + length > _U64_MAX:
                raise self._desc_error(head, i, table_gpa, "buffer-overflow",
                                       f"addr {addr:#x} + len {length:#x} passes 2^64")
            if not mem.contains(addr, length):
                raise self._desc_error(head, i, table_gpa, "buffer-outside-ram",
                                       f"buffer [{addr:#x}, {addr + length:#x}) is not inside "
                                       f"guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise self._desc_error(head, i, table_gpa, "readable-after-writable",
                                       f"device-readable buffer {addr:#x} follows "
                                       f"{len(writable)} device-writable one(s)")
            else:
                readable.append((addr, length))
            total += length
            if total > MAX_CHAIN_BYTES:
                raise self._desc_error(head, i, table_gpa, "chain-too-large",
                                       f"chain carries {total} bytes, more than {MAX_CHAIN_BYTES}")
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            if count >= entries:
                raise self._desc_error(head, i, table_gpa, "chain-too-long",
                                       f"chain has more than {entries} descriptors (a loop?)")
            if nxt >= entries:
                raise self._desc_error(head, i, table_gpa, "next-index",
                                       f"next {nxt} is not below the table's {entries} entries")
            i = nxt

    def _check_indirect(self, mem, head: int, i: int, table_gpa, addr: int, length: int,
                        flags: int) -> int:
        """Checks of a descriptor with INDIRECT set; returns the table's entry count."""
        if table_gpa is not None:
            raise self._desc_error(head, i, table_gpa, "indirect-nested",
                                   "INDIRECT set inside an indirect table")
        if not self.indirect:
            raise self._desc_error(head, i, None, "indirect-not-negotiated",
                                   "INDIRECT set but VIRTIO_F_INDIRECT_DESC was not negotiated")
        if flags & VIRTQ_DESC_F_NEXT:
            raise self._desc_error(head, i, None, "indirect-with-next",
                                   f"flags {flags:#x} set both INDIRECT and NEXT")
        n = length // DESC_SIZE
        if not length or length % DESC_SIZE or n > self._max_indirect:
            raise self._desc_error(head, i, None, "indirect-table-size",
                                   f"table length {length} is not a non-zero multiple of "
                                   f"{DESC_SIZE} of at most {self._max_indirect} entries")
        if not mem.contains(addr, length):
            raise self._desc_error(head, i, None, "indirect-table-outside-ram",
                                   f"table [{addr:#x}, {addr + length:#x}) is not inside "
                                   f"guest RAM")
        return n

    def _desc_error(self, head: int, i: int, table_gpa, check: str, detail: str) -> QueueError:
        where = (f"descriptor {i}" if table_gpa is None
                 else f"indirect descriptor {i} of table {table_gpa:#x}")
        return QueueError(self.index, check, f"chain {head}, {where}: {detail}")

    def has_pending(self, mem) -> bool:
        """True when the driver has made chains available that ``pop`` has not
        taken. Reads avail->idx, with the same check as ``pop``."""
        if not self._active:
            return False
        if not self._pending:
            self._pending = self._avail_ahead(mem)
        return self._pending > 0

    # -- device -> driver ----------------------------------------------------

    def add_used(self, mem, head: int, length: int) -> None:
        """Return chain ``head`` (from a Chain this queue popped) with ``length``
        (< 2^32) bytes written: the used element, then used->idx. Reads no guest
        value."""
        used = mem.view(self._used, 4 + 8 * self._size)
        idx = self.used_idx
        inflight = self.inflight
        if inflight is not None:  # head is in the last batch, until used_idx says done
            _U16.pack_into(inflight, INFLIGHT_HEADER + INFLIGHT_DESC * head + 6,
                           _U16.unpack_from(inflight, 12)[0])
            _U16.pack_into(inflight, 12, head)
        _USED_ELEM.pack_into(used, 4 + 8 * (idx & self._mask), head, length)
        # Write barrier: the used element is stored before used->idx. Pairs with
        # the driver's read barrier between loading used->idx and the element
        # (2.7.8.2: "The device MUST set len prior to updating the used idx").
        # x86 keeps store-store order, so no instruction is needed.
        idx = (idx + 1) & 0xFFFF
        mem.store_u16(self._used + 2, idx)  # one store: the driver polls it
        self.used_idx = idx
        self.in_flight -= 1
        if inflight is not None:
            inflight[INFLIGHT_HEADER + INFLIGHT_DESC * head] = 0
            # Write barrier: the flag is cleared before used_idx records the
            # batch as finished (x86 keeps store-store order).
            _U16.pack_into(inflight, 14, idx)

    def needs_notification(self, mem) -> bool:
        """After add_used(s): should the device send a used buffer notification now?

        Covers the used entries added since the previous call (none: False).
        With EVENT_IDX, reads used_event (any 16-bit value is valid) and tells
        whether used->idx moved past it (``vring_need_event``); without, reads
        avail->flags and tells whether VIRTQ_AVAIL_F_NO_INTERRUPT is clear (bits
        other than bit 0 are ignored). 2.7.7.2.
        """
        new, old = self.used_idx, self._signalled_used
        if new == old:
            return False
        self._signalled_used = new
        # Full barrier: used->idx (stored by add_used) before used_event or
        # avail->flags is loaded. Pairs with the driver's barrier between storing
        # used_event (or flags) and re-reading used->idx (2.7.14, the note).
        smp_mb()
        if self.event_idx:
            used_event = mem.load_u16(self._avail + 4 + 2 * self._size)
            return vring_need_event(used_event, new, old)
        flags = mem.load_u16(self._avail)
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notification(self, mem, enable: bool) -> bool:
        """Ask the driver for available buffer notifications (kicks), or suppress them.

        Without EVENT_IDX: used->flags = 0 or VIRTQ_USED_F_NO_NOTIFY. With
        EVENT_IDX, used->flags stays 0 (2.7.10.2); enabling writes avail_event =
        last_avail_idx ("kick me once you publish the entry I pop next"), and
        disabling writes nothing (the stale avail_event falls behind).

        Protocol: a device that disabled kicks while it drained the ring calls
        ``set_notification(mem, True)`` when ``pop`` returns None. That re-checks
        avail->idx after a full barrier and returns True if chains arrived in
        the meantime: the device must then pop again (their kick may have been
        suppressed). Disabling always returns False.
        """
        if not self._active:
            return False
        if self.event_idx:
            if not enable:
                return False
            mem.store_u16(self._used + 4 + 8 * self._size, self.last_avail_idx)
        else:
            mem.store_u16(self._used, 0 if enable else VIRTQ_USED_F_NO_NOTIFY)
            if not enable:
                return False
        # Full barrier: avail_event (or used->flags) is stored before avail->idx
        # is re-loaded. Pairs with the driver's barrier between storing
        # avail->idx and reading used->flags / avail_event (2.7.13.4.1).
        smp_mb()
        return self.has_pending(mem)
