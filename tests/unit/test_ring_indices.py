"""Ring indices the other side stores are read in one 16-bit load, by the
device (both queue twins) and by the test driver (tests/helpers/mock_virtq.py).

A read in two parts sees half of each value when the store falls between
them (0x00ff -> 0x0100 reads 0x01ff). tests/helpers/interleave.py puts the
store there on purpose, with a hardware watchpoint, so each test is exact.
The mock driver once read used->idx with MappedMemory.read_u (memcpy: byte
0, then the word): the multiqueue stress run (tests/stress/mq_verify.py) on
a busy host then reaped 256 entries past the real used->idx, stale ones
from the ring's earlier laps, and failed on a used entry for a head that
was not in flight.
"""
import struct

import pytest

from pykvm.memory import GuestMemory
from tests.helpers import interleave
from tests.helpers.interleave import store_between
from tests.helpers.mock_virtq import MockVirtq


@pytest.fixture
def mem():
    why = interleave.available()        # (compiles the helper once per process)
    if why:
        pytest.skip(why)
    m = GuestMemory(1 << 20, hugepages=False)
    yield m
    m.close()


def _hva(mem, gpa):
    return mem.hva_of(gpa, 2)


@pytest.mark.parametrize("field", ["used_idx", "read_avail_event", "used_flags"])
def test_the_driver_reads_what_the_device_stores_in_one_load(mem, field):
    drv = MockVirtq(mem, size=8)
    gpa = {"used_idx": drv.used_ring + 2, "read_avail_event": drv.used_ring + 4 + 8 * 8,
           "used_flags": drv.used_ring}[field]
    mem.store_u16(gpa, 0x00FF)
    with store_between(_hva(mem, gpa), 0x0100) as w:
        got = getattr(drv, field)()
    assert w.fired == 1, "the store was not made"
    assert got in (0x00FF, 0x0100), f"{field} read {got:#06x}: half of 0x00ff, half of 0x0100"
    assert getattr(drv, field)() == 0x0100


def test_reap_takes_only_what_the_device_published(mem):
    """The stress run's failure: used->idx moves from 0x00ff to 0x0100 while
    the driver reads it. reap() must return the one entry published before
    the read, then the next one, and nothing from the ring's earlier laps."""
    drv = MockVirtq(mem, size=8, start_idx=0xFE)
    q = drv.queue()
    a = drv.add_chain([drv.arena.writable(16)])
    b = drv.add_chain([drv.arena.writable(16)])
    drv.publish()
    assert q.pop(mem).head == a and q.pop(mem).head == b
    q.add_used(mem, a, 16)                                # used->idx 0x00ff
    # the device adds b: the element first, then used->idx, between the driver's loads
    mem.write(drv.used_ring + 4 + 8 * (0xFF % 8), struct.pack("<II", b, 16))
    with store_between(_hva(mem, drv.used_ring + 2), 0x0100) as w:
        first = drv.reap()
    assert w.fired == 1
    assert first in ([(a, 16)], [(a, 16), (b, 16)]), f"reaped {len(first)} entries: {first[:4]}"
    assert first + drv.reap() == [(a, 16), (b, 16)]


def test_pop_reads_avail_idx_in_one_load(mem, queue_twin):
    """The device's side (SplitQueue: MappedMemory.load_u16; C: one 16-bit
    load): avail->idx published between its loads is seen whole, old or new."""
    drv = MockVirtq(mem, size=8, start_idx=0xFF, queue_class=queue_twin)
    q = drv.queue()
    c = drv.add_chain([drv.arena.writable(16)])           # avail ring entry 0xff
    with store_between(_hva(mem, drv.avail_ring + 2), 0x0100) as w:
        chain = q.pop(mem)                                 # a torn 0x01ff: QueueError
    assert w.fired == 1
    if chain is None:                                      # it read 0x00ff: nothing yet
        chain = q.pop(mem)
    assert chain.head == c and q.pop(mem) is None
