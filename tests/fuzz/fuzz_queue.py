"""The split virtqueue, differential: the Python ``SplitQueue`` and its C twin
(``fastpath.CQueue``, native/vq.c) on two copies of the same guest memory.

The bytes are the ring state and then a list of device operations:

    [config][start idx: u16][descriptor table: 16*size][avail ring: 4+2*size+2]
    [an indirect table at TABLE: 256 bytes][operations...]

config: size = 2**(bits 0-2), bit 3 event index, bit 4 indirect descriptors.
Each operation byte: 0 pop, 1 add_used of a popped chain (next byte picks it,
the one after its used length), 2 set_notification on/off (bit 7),
3 needs_notification, 4 the driver publishes more (avail idx += next byte).
Both twins must give the same chains, the same QueueError (check name and
message: the NEEDS_RESET decision), the same indices, notification answers
and used ring bytes. A QueueError is the documented answer to a broken ring:
the device goes to NEEDS_RESET, so the input ends there. A difference is an
AssertionError, a crash.
"""
import struct

from pykvm.memory import GuestMemory
from pykvm.virtio import fastpath
from pykvm.virtio.queue import QueueError, SplitQueue
from tests.helpers.mock_virtq import MockVirtq

EXPECTED = (QueueError,)

RAM = 1 << 20
TABLE = 0x20000
TABLE_BYTES = 256
MEMS = [GuestMemory(RAM, hugepages=False) for _ in range(2)]


def _queues(size: int, event_idx: bool, indirect: bool, start: int):
    out = []
    for cls, mem in zip((SplitQueue, fastpath.CQueue), MEMS):
        mem.fill(0, RAM, 0)
        drv = MockVirtq(mem, size=size, start_idx=start)
        q = cls(0, size)
        q.size = size
        q.desc_table, q.avail_ring, q.used_ring = drv.desc_table, drv.avail_ring, drv.used_ring
        q.event_idx, q.indirect, q.ready = event_idx, indirect, True
        q.activate(mem, last_avail_idx=start, used_idx=start)
        out.append(q)
    return out, drv


def _both(qs, op, *args):
    out = []
    for q, mem in zip(qs, MEMS):
        try:
            r = getattr(q, op)(mem, *args)
            if r is not None and not isinstance(r, bool):
                r = (r.head, r.readable, r.writable)
            out.append(("ok", r))
        except QueueError as e:
            out.append(("error", e.check, str(e)))
    assert out[0] == out[1], (op, args, out)
    py, c = qs
    assert (py.last_avail_idx, py.used_idx, py.in_flight) == \
        (c.last_avail_idx, c.used_idx, c.in_flight), (op, args)
    return out[0]


def one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    size = 1 << (data[0] & 7)
    event_idx, indirect = bool(data[0] & 8), bool(data[0] & 16)
    start = struct.unpack_from("<H", data, 1)[0]
    qs, drv = _queues(size, event_idx, indirect, start)
    pos = 3
    desc = data[pos:pos + 16 * size]
    pos += 16 * size
    avail = data[pos:pos + 6 + 2 * size]
    pos += 6 + 2 * size
    table = data[pos:pos + TABLE_BYTES]
    pos += TABLE_BYTES
    for mem in MEMS:
        mem.write(drv.desc_table, desc)
        mem.write(drv.avail_ring, avail)
        mem.write(TABLE, table)
    ops = data[pos:]
    popped = []
    i = 0
    try:
        while i < len(ops):
            op = (ops[i] & 0x7F) % 5
            arg = ops[i + 1] if i + 1 < len(ops) else 0
            if op == 0:
                out = _both(qs, "pop")
                if out[0] == "error":
                    return
                if out[1] is not None:
                    popped.append(out[1])
            elif op == 1 and popped:
                head = popped.pop(arg % len(popped))[0]
                length = ops[i + 2] if i + 2 < len(ops) else 0
                if _both(qs, "add_used", head, length)[0] == "error":
                    return
                i += 2
            elif op == 2:
                _both(qs, "set_notification", bool(ops[i] & 0x80))
            elif op == 3:
                _both(qs, "needs_notification")
            elif op == 4:
                idx = struct.unpack_from("<H", MEMS[0].read(drv.avail_ring + 2, 2))[0]
                for mem in MEMS:
                    mem.write(drv.avail_ring + 2, struct.pack("<H", (idx + arg) & 0xFFFF))
                i += 1
            i += 1
    finally:
        a, b = MEMS
        assert a.read(0, 0x30000) == b.read(0, 0x30000), "guest memory differs"
