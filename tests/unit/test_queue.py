"""SplitQueue (pykvm/virtio/queue.py) against the mock driver: no KVM.

Happy paths, 16-bit wrap-around, notification suppression both ways, one test
per hostile-guest check, and a seeded fuzz run over random ring contents.
Each on both queue twins (the ``queue_twin`` fixture, tests/conftest.py): the
Python SplitQueue and the C one (fastpath.CQueue, native/vq.c), which must
give the same chains and the same QueueError check names and messages.
"""
import random

import pytest

from pykvm.memory import GuestMemory
from pykvm.virtio.queue import (MAX_CHAIN_BYTES, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
                                Chain, QueueError, SplitQueue, vring_need_event)
from pykvm.virtio.fastpath import CQueue
from tests.helpers.mock_virtq import MockVirtq

RAM = 1 << 20
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def mem():
    m = GuestMemory(RAM, hugepages=False)
    yield m
    m.close()


@pytest.fixture
def drv(mem, queue_twin):
    return MockVirtq(mem, size=8, queue_class=queue_twin)


def request(drv, data_len=4096, write=False):
    """A virtio-blk shaped chain: 16-byte header, data, 1-byte status."""
    a = drv.arena
    data = a.writable(data_len) if write else a.readable(bytes(data_len))
    return [a.readable(b"H" * 16), data, a.writable(1)]


def test_the_queue_is_the_twin_it_names(request, drv, queue_twin):
    want = {"python": SplitQueue, "c": CQueue}[request.node.callspec.params["queue_twin"]]
    assert queue_twin is want and type(drv.queue()) is want


# -- happy paths ----------------------------------------------------------------

def test_empty_ring_pops_none(mem, drv):
    q = drv.queue()
    assert q.pop(mem) is None
    assert not q.has_pending(mem)


def test_single_readable_descriptor(mem, drv):
    q = drv.queue()
    buf = drv.arena.readable(b"hello")
    head = drv.add_chain([buf])
    drv.publish()
    assert q.has_pending(mem)
    chain = q.pop(mem)
    assert (chain.head, chain.readable, chain.writable) == (head, [buf[:2]], [])
    assert (chain.readable_len(), chain.writable_len()) == (5, 0)
    assert q.pop(mem) is None
    assert (q.last_avail_idx, q.in_flight) == (1, 1)


def test_readable_then_writable_chain_and_add_used(mem, drv):
    q = drv.queue()
    bufs = request(drv, 4096, write=True)
    head = drv.add_chain(bufs)
    drv.publish()
    chain = q.pop(mem)
    assert chain.readable == [bufs[0][:2]]
    assert chain.writable == [bufs[1][:2], bufs[2][:2]]
    assert (chain.readable_len(), chain.writable_len()) == (16, 4097)
    q.add_used(mem, chain.head, 4097)
    assert drv.used() == [(head, 4097)]
    assert (q.used_idx, q.in_flight, drv.used_idx()) == (1, 0, 1)


def test_indirect_chain(mem, drv):
    q = drv.queue(indirect=True)
    bufs = request(drv, 512)
    head = drv.add_chain(bufs, indirect=True)
    drv.publish()
    chain = q.pop(mem)
    assert chain.head == head
    assert chain.readable == [b[:2] for b in bufs[:2]]
    assert chain.writable == [bufs[2][:2]]


def test_direct_descriptors_then_indirect_table(mem, drv):
    """2.7.5.3.2: zero or more direct descriptors followed by one indirect one."""
    q = drv.queue(indirect=True)
    hdr, data, status = request(drv, 512, write=True)
    table = drv.arena.alloc(32)
    drv.write_table(table, [(data[0], data[1], WRITE | NEXT, 1), (status[0], 1, WRITE, 0)])
    drv.write_desc(5, hdr[0], 16, NEXT, 2)
    drv.write_desc(2, table, 32, INDIRECT | WRITE, 0)  # WRITE on the table pointer is ignored
    drv.write_avail_entry(0, 5)
    drv.set_avail_idx(1)
    chain = q.pop(mem)
    assert (chain.head, chain.readable) == (5, [hdr[:2]])
    assert chain.writable == [data[:2], (status[0], 1)]


def test_batch_and_out_of_order_completion(mem, drv):
    q = drv.queue()
    heads = [drv.add_chain(request(drv, 512)) for _ in range(2)]
    heads.append(drv.add_chain([drv.arena.writable(8)]))
    drv.publish()
    chains = [q.pop(mem) for _ in range(3)]
    assert [c.head for c in chains] == heads
    assert q.pop(mem) is None and q.in_flight == 3
    for c, n in ((chains[2], 8), (chains[0], 1), (chains[1], 1)):
        q.add_used(mem, c.head, n)
    assert drv.used() == [(heads[2], 8), (heads[0], 1), (heads[1], 1)]
    assert q.in_flight == 0


def test_publish_in_steps(mem, drv):
    q = drv.queue()
    for _ in range(3):
        drv.add_chain([drv.arena.writable(4)])
    drv.publish(1)
    assert q.pop(mem) is not None and q.pop(mem) is None
    drv.publish(2)
    assert q.pop(mem) is not None and q.pop(mem) is not None and q.pop(mem) is None


def test_full_ring_of_size_entries(mem, drv):
    q = drv.queue()
    for _ in range(8):
        drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    assert [q.pop(mem).head for _ in range(8)] == list(range(8))
    assert q.pop(mem) is None


def test_chain_as_long_as_the_queue(mem, drv):
    q = drv.queue()
    drv.add_chain([drv.arena.writable(4) for _ in range(8)])
    drv.publish()
    assert len(q.pop(mem).writable) == 8


def test_zero_length_buffers_inside_ram_and_at_its_end(mem, drv):
    q = drv.queue()
    drv.add_chain([(0x8000, 0, False), (RAM, 0, True)])
    drv.publish()
    chain = q.pop(mem)
    assert (chain.readable, chain.writable) == ([(0x8000, 0)], [(RAM, 0)])


def test_inactive_queue_finds_nothing(mem, drv, queue_twin):
    q = queue_twin(0, 8)  # never activated: a kick before DRIVER_OK
    drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    assert q.pop(mem) is None and not q.has_pending(mem)
    assert q.set_notification(mem, True) is False and drv.used_flags() == 0


def test_reset_restores_power_on_state(mem, drv):
    q = drv.queue(event_idx=True, indirect=True)
    drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    q.pop(mem)
    q.size = 4
    q.reset()
    assert (q.size, q.desc_table, q.avail_ring, q.used_ring) == (8, 0, 0, 0)
    assert (q.ready, q.event_idx, q.indirect) == (False, False, False)
    assert (q.last_avail_idx, q.used_idx, q.in_flight) == (0, 0, 0)
    assert q.pop(mem) is None


# -- 16-bit wrap-around ----------------------------------------------------------

@pytest.mark.parametrize("start", [65530, 65535])
def test_indices_wrap_at_65536(mem, start, queue_twin):
    drv = MockVirtq(mem, queue_class=queue_twin, size=4, start_idx=start)
    q = drv.queue()
    buf = drv.arena.writable(8)
    for n in range(40):
        heads = [drv.add_chain([buf]) for _ in range(1 + n % 3)]
        drv.publish()
        chains = []
        while (c := q.pop(mem)) is not None:
            chains.append(c)
        assert [c.head for c in chains] == heads
        for c in reversed(chains):
            q.add_used(mem, c.head, 8)
        assert drv.reap() == [(h, 8) for h in reversed(heads)]
    assert q.last_avail_idx == q.used_idx == drv.avail_idx() == drv.used_idx()
    assert q.last_avail_idx < start  # it wrapped


def test_wraps_from_zero_after_65536_round_trips(mem, queue_twin):
    """The slow honest way: no preset indices."""
    drv = MockVirtq(mem, queue_class=queue_twin, size=2)
    q = drv.queue()
    buf = drv.arena.writable(4)
    for _ in range(65536 + 3):
        drv.add_chain([buf])
        drv.publish()
        q.add_used(mem, q.pop(mem).head, 4)
        drv.reap()
    assert q.last_avail_idx == q.used_idx == drv.used_idx() == 3


# -- used buffer notifications (driver -> device suppression) ---------------------

@pytest.mark.parametrize("event,new,old,expect", [
    (0, 1, 0, True),          # "used_event 0: notify after the first buffer"
    (1, 1, 0, False),
    (4, 6, 2, True),          # inside (old, new]
    (2, 6, 2, True),          # the entry at index 2 (idx went 2 -> 3) is in the window
    (1, 6, 2, False),         # already passed
    (6, 6, 2, False),         # not yet: that is the entry idx 6 -> 7
    (65535, 1, 65534, True),  # window wraps
    (0, 1, 65534, True),
    (1, 1, 65534, False),
])
def test_vring_need_event(event, new, old, expect):
    assert vring_need_event(event, new, old) is expect


def test_event_idx_notification(mem, drv):
    q = drv.queue(event_idx=True)
    drv.set_used_event(1)  # "tell me when the entry at index 1 is used"
    for _ in range(3):
        drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    chains = [q.pop(mem) for _ in range(3)]
    assert not q.needs_notification(mem)  # nothing used yet
    q.add_used(mem, chains[0].head, 4)
    assert not q.needs_notification(mem)  # used idx 0 -> 1: index 0 written
    q.add_used(mem, chains[1].head, 4)
    q.add_used(mem, chains[2].head, 4)
    assert q.needs_notification(mem)      # 1 -> 3 covers index 1
    assert not q.needs_notification(mem)  # no new entries since
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    drv.set_used_event(3)
    drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    q.add_used(mem, q.pop(mem).head, 4)
    assert q.needs_notification(mem)


def test_event_idx_notification_across_wrap(mem, queue_twin):
    drv = MockVirtq(mem, queue_class=queue_twin, size=4, start_idx=65534)
    q = drv.queue(event_idx=True)
    drv.set_used_event(65535)
    for _ in range(2):
        drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    c1, c2 = q.pop(mem), q.pop(mem)
    q.add_used(mem, c1.head, 4)
    assert not q.needs_notification(mem)  # wrote index 65534
    q.add_used(mem, c2.head, 4)
    assert q.used_idx == 0 and q.needs_notification(mem)  # wrote index 65535


def test_no_interrupt_flag_without_event_idx(mem, drv):
    q = drv.queue()
    for _ in range(2):
        drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(mem, q.pop(mem).head, 4)
    assert not q.needs_notification(mem)
    drv.set_avail_flags(0)
    drv.set_used_event(100)  # ignored without EVENT_IDX
    q.add_used(mem, q.pop(mem).head, 4)
    assert q.needs_notification(mem)
    assert not q.needs_notification(mem)


# -- available buffer notifications (device -> driver suppression) ----------------

def test_no_notify_flag_without_event_idx(mem, drv):
    q = drv.queue()
    assert q.set_notification(mem, False) is False
    assert drv.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    assert q.set_notification(mem, True) is False  # nothing pending
    assert drv.used_flags() == 0
    drv.add_chain([drv.arena.writable(4)])
    drv.publish()
    assert q.set_notification(mem, True) is True  # arrived while suppressed: pop again
    assert drv.read_avail_event() == 0  # avail_event untouched without EVENT_IDX


def test_event_idx_set_notification_writes_avail_event(mem, drv):
    q = drv.queue(event_idx=True)
    for _ in range(3):
        drv.add_chain([drv.arena.writable(4)])
    drv.publish(2)
    q.pop(mem)
    assert q.set_notification(mem, False) is False
    assert drv.read_avail_event() == 0 and drv.used_flags() == 0
    assert q.set_notification(mem, True) is True  # one more is pending
    assert drv.read_avail_event() == 1
    q.pop(mem)
    assert q.set_notification(mem, True) is False
    assert drv.read_avail_event() == 2 and drv.used_flags() == 0
    drv.publish(1)
    assert q.has_pending(mem)


# -- configuration checks (activate) -------------------------------------------------

def configured(drv, **over):
    q = drv.queue_class(3, 8)
    q.size = drv.size
    q.desc_table, q.avail_ring, q.used_ring = drv.desc_table, drv.avail_ring, drv.used_ring
    for k, v in over.items():
        setattr(q, k, v)
    return q


@pytest.mark.parametrize("over,check", [
    ({"size": 0}, "queue-size"),
    ({"size": 6}, "queue-size"),
    ({"size": 16}, "queue-size"),          # above max_size
    ({"desc_table": 0x1008}, "area-alignment"),
    ({"avail_ring": 0x1081}, "area-alignment"),
    ({"used_ring": 0x10A2}, "area-alignment"),
    ({"desc_table": RAM - 64}, "area-outside-ram"),
    ({"avail_ring": RAM - 20}, "area-outside-ram"),   # ring fits, used_event does not
    ({"used_ring": RAM - 68}, "area-outside-ram"),    # ring fits, avail_event does not
    ({"used_ring": 0xC000_0000}, "area-outside-ram"),
])
def test_activate_refuses_bad_configuration(mem, drv, over, check):
    q = configured(drv, **over)
    with pytest.raises(QueueError) as e:
        q.activate(mem)
    assert e.value.check == check
    assert str(e.value).startswith(f"virtqueue 3: {check}: ")


@pytest.mark.matrix(queue_twin="python")   # transports write 64 bits: never reaches the C queue
def test_activate_refuses_an_address_past_64_bits(mem, drv):
    q = configured(drv, desc_table=1 << 64)
    with pytest.raises(QueueError) as e:
        q.activate(mem)
    assert e.value.check == "area-outside-ram"
    assert str(e.value).startswith("virtqueue 3: area-outside-ram: ")


def test_activate_accepts_smaller_power_of_two(mem, drv):
    q = configured(drv, size=2)
    q.activate(mem)
    assert q.pop(mem) is None


def test_max_size_must_be_a_power_of_two(queue_twin):
    with pytest.raises(ValueError):
        queue_twin(0, 48)
    with pytest.raises(ValueError):
        queue_twin(0, 65536)


# -- hostile guests (pop) -----------------------------------------------------------

def expect_queue_error(mem, q, check):
    """pop raises QueueError(check) with a one-line message; nothing was consumed."""
    before = (q.last_avail_idx, q.in_flight)
    with pytest.raises(QueueError) as e:
        q.pop(mem)
    assert e.value.check == check, str(e.value)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"virtqueue {q.index}: {check}")
    assert (q.last_avail_idx, q.in_flight) == before
    return e.value


def one_chain(drv, descs, head=0):
    """Raw descriptors {index: (addr, len, flags, next)}, head in the ring, published."""
    for i, d in descs.items():
        drv.write_desc(i, *d)
    drv.write_avail_entry(0, head)
    drv.set_avail_idx(1)


def test_avail_idx_too_far_ahead(mem, drv):
    q = drv.queue()
    drv.set_avail_idx(9)
    err = expect_queue_error(mem, q, "avail-idx")
    assert "avail->idx 9" in str(err) and "queue size 8" in str(err)


def test_avail_idx_moved_backwards(mem, queue_twin):
    drv = MockVirtq(mem, queue_class=queue_twin, size=8, start_idx=100)
    q = drv.queue()
    drv.set_avail_idx(99)
    expect_queue_error(mem, q, "avail-idx")
    with pytest.raises(QueueError):
        q.has_pending(mem)


def test_head_out_of_range(mem, drv):
    q = drv.queue()
    drv.write_avail_entry(0, 8)
    drv.set_avail_idx(1)
    expect_queue_error(mem, q, "head-index")


def test_next_out_of_range(mem, drv):
    q = drv.queue()
    one_chain(drv, {0: (0x8000, 4, NEXT, 8)})
    expect_queue_error(mem, q, "next-index")


@pytest.mark.parametrize("descs", [
    {0: (0x8000, 4, NEXT, 0)},                                  # self loop
    {0: (0x8000, 4, NEXT, 1), 1: (0x8000, 4, NEXT, 0)},         # two-cycle
    {i: (0x8000, 4, NEXT, (i + 1) % 8) for i in range(8)},      # through every entry
])
def test_descriptor_loop(mem, drv, descs):
    q = drv.queue()
    one_chain(drv, descs)
    expect_queue_error(mem, q, "chain-too-long")


@pytest.mark.parametrize("addr,length", [
    (RAM, 1),                # just past the end
    (RAM - 4, 8),            # crosses the end
    (RAM + 1, 0),            # empty, but not at a valid address
    (0xC000_0000, 16),       # device hole
    ((1 << 64) - 17, 16),    # ends just below 2^64
])
def test_buffer_outside_ram(mem, drv, addr, length):
    q = drv.queue()
    one_chain(drv, {0: (addr, length, WRITE, 0)})
    expect_queue_error(mem, q, "buffer-outside-ram")


@pytest.mark.parametrize("addr", [(1 << 64) - 8, (1 << 64) - 16])  # end past / at 2^64
def test_buffer_address_plus_length_overflows(mem, drv, addr):
    q = drv.queue()
    one_chain(drv, {0: (addr, 16, 0, 0)})
    expect_queue_error(mem, q, "buffer-overflow")


def test_readable_after_writable(mem, drv):
    q = drv.queue()
    one_chain(drv, {0: (0x8000, 4, WRITE | NEXT, 1), 1: (0x9000, 4, 0, 0)})
    expect_queue_error(mem, q, "readable-after-writable")


def test_readable_after_writable_inside_indirect_table(mem, drv):
    q = drv.queue(indirect=True)
    drv.write_table(0x20000, [(0x8000, 4, WRITE | NEXT, 1), (0x9000, 4, 0, 0)])
    one_chain(drv, {0: (0x20000, 32, INDIRECT, 0)})
    err = expect_queue_error(mem, q, "readable-after-writable")
    assert "indirect descriptor 1 of table 0x20000" in str(err)


def test_readable_in_table_after_writable_direct_descriptor(mem, drv):
    q = drv.queue(indirect=True)
    drv.write_table(0x20000, [(0x9000, 4, 0, 0)])
    one_chain(drv, {0: (0x8000, 4, WRITE | NEXT, 1), 1: (0x20000, 16, INDIRECT, 0)})
    expect_queue_error(mem, q, "readable-after-writable")


def test_indirect_not_negotiated(mem, drv):
    q = drv.queue(indirect=False)
    drv.add_chain([drv.arena.writable(4)], indirect=True)
    drv.publish()
    expect_queue_error(mem, q, "indirect-not-negotiated")


def test_nested_indirect(mem, drv):
    q = drv.queue(indirect=True)
    drv.write_table(0x20000, [(0x8000, 4, NEXT, 1), (0x21000, 16, INDIRECT, 0)])
    drv.write_table(0x21000, [(0x9000, 4, 0, 0)])
    one_chain(drv, {0: (0x20000, 32, INDIRECT, 0)})
    expect_queue_error(mem, q, "indirect-nested")


def test_indirect_with_next(mem, drv):
    q = drv.queue(indirect=True)
    drv.write_table(0x20000, [(0x8000, 4, 0, 0)])
    one_chain(drv, {0: (0x20000, 16, INDIRECT | NEXT, 1), 1: (0x9000, 4, 0, 0)})
    expect_queue_error(mem, q, "indirect-with-next")


@pytest.mark.parametrize("length", [0, 8, 24, 16 * 1025])
def test_indirect_table_size(mem, drv, length):
    q = drv.queue(indirect=True)
    one_chain(drv, {0: (0x20000, length, INDIRECT, 0)})
    expect_queue_error(mem, q, "indirect-table-size")


def test_indirect_table_of_1024_entries_is_accepted(mem, drv):
    q = drv.queue(indirect=True)
    drv.write_table(0x20000, [(0x8000, 1, NEXT, i + 1) for i in range(1023)] + [(0x8000, 1, 0, 0)])
    one_chain(drv, {0: (0x20000, 16 * 1024, INDIRECT, 0)})
    assert q.pop(mem).readable_len() == 1024


@pytest.mark.parametrize("addr", [RAM - 16, 0xC000_0000, (1 << 64) - 16])
def test_indirect_table_outside_ram(mem, drv, addr):
    q = drv.queue(indirect=True)
    one_chain(drv, {0: (addr, 32, INDIRECT, 0)})
    expect_queue_error(mem, q, "indirect-table-outside-ram")


def test_indirect_next_out_of_range(mem, drv):
    q = drv.queue(indirect=True)
    drv.write_table(0x20000, [(0x8000, 4, NEXT, 2), (0x8000, 4, 0, 0)])
    one_chain(drv, {0: (0x20000, 32, INDIRECT, 0)})
    err = expect_queue_error(mem, q, "next-index")
    assert "table's 2 entries" in str(err)


def test_indirect_loop(mem, drv):
    q = drv.queue(indirect=True)
    drv.write_table(0x20000, [(0x8000, 4, NEXT, 1), (0x8000, 4, NEXT, 0)])
    one_chain(drv, {0: (0x20000, 32, INDIRECT, 0)})
    expect_queue_error(mem, q, "chain-too-long")


@pytest.mark.parametrize("short", [1, 0])
def test_chain_bytes_limit(short, queue_twin):
    """Buffers may overlap: 64 descriptors over 64 MiB of RAM carry 2^32 bytes, one
    more than a used element's 32-bit len can count; one byte less is accepted."""
    mem = GuestMemory(64 << 20, hugepages=False)
    try:
        drv = MockVirtq(mem, queue_class=queue_twin, size=8)
        q = drv.queue(indirect=True)
        n = (MAX_CHAIN_BYTES + 1) // mem.size
        drv.write_table(0x20000, [(0, mem.size, WRITE | NEXT, i + 1) for i in range(n - 1)]
                        + [(0, mem.size - short, WRITE, 0)])
        one_chain(drv, {0: (0x20000, 16 * n, INDIRECT, 0)})
        if short:
            assert q.pop(mem).writable_len() == MAX_CHAIN_BYTES
        else:
            expect_queue_error(mem, q, "chain-too-large")
    finally:
        mem.close()


# -- fuzz -----------------------------------------------------------------------------

def test_random_rings_give_valid_chains_or_queue_errors(mem, queue_twin):
    """Random descriptor tables and avail rings (structured, or raw random bytes):
    pop returns chains whose buffers are all inside RAM, or raises QueueError;
    never anything else, never hangs. Completing the chains and deciding on
    notifications over the same random rings never fails either."""
    rng = random.Random(0x5EED)
    size = 16
    drv = MockVirtq(mem, queue_class=queue_twin, size=size)
    table = 0x20000
    outcomes = {"chain": 0, "error": 0, "empty": 0}
    for _ in range(3000):
        q = drv.queue(event_idx=rng.random() < 0.5, indirect=rng.random() < 0.7)
        if rng.random() < 0.2:
            mem.write(drv.desc_table, rng.randbytes(drv.used_ring - drv.desc_table))
            mem.write(table, rng.randbytes(16 * 8))
        else:
            descs = []
            for _ in range(size):
                addr = rng.choice([rng.randrange(RAM)] * 4 + [rng.randrange(RAM - 64, RAM + 64),
                                                               rng.getrandbits(64), table])
                length = rng.choice([rng.randrange(64)] * 3
                                    + [rng.getrandbits(32), 16 * rng.randrange(5)])
                descs.append((addr, length, rng.getrandbits(3), rng.randrange(size + 2)))
            for i, d in enumerate(descs):
                drv.write_desc(i, *d)
            drv.write_table(table, [d[:3] + (rng.randrange(6),) for d in rng.sample(descs, 4)])
            for k in range(size):
                drv.write_avail_entry(k, rng.randrange(size + 2))
            drv.set_avail_idx(rng.choice([rng.randrange(size + 1)] * 9 + [rng.getrandbits(16)]))
        for _ in range(size + 1):
            try:
                chain = q.pop(mem)
            except QueueError:
                outcomes["error"] += 1
                break
            if chain is None:
                outcomes["empty"] += 1
                break
            outcomes["chain"] += 1
            assert isinstance(chain, Chain) and 0 <= chain.head < size
            for gpa, length in chain.readable + chain.writable:
                assert mem.contains(gpa, length)
            assert chain.readable_len() + chain.writable_len() <= MAX_CHAIN_BYTES
            q.add_used(mem, chain.head, chain.writable_len())
        q.needs_notification(mem)
        try:
            q.set_notification(mem, True)
        except QueueError as e:
            assert e.check == "avail-idx"
    assert all(outcomes.values()), outcomes  # every outcome was exercised


# -- vhost-user inflight tracking (both twins record the same) ---------------------

def test_inflight_region_records_pops_and_returns(mem, drv):
    import struct

    from pykvm.virtio.queue import INFLIGHT_DESC, INFLIGHT_HEADER
    region = bytearray(INFLIGHT_HEADER + INFLIGHT_DESC * drv.size)
    q = drv.queue()
    q.inflight = memoryview(region)
    q.inflight_counter = 7
    heads = [drv.add_chain([drv.arena.writable(1)]) for _ in range(3)]
    drv.publish()
    chains = [q.pop(mem) for _ in range(3)]
    assert [c.head for c in chains] == heads

    def desc(h):
        d = INFLIGHT_HEADER + INFLIGHT_DESC * h
        return region[d], struct.unpack_from("<H", region, d + 6)[0], \
            struct.unpack_from("<Q", region, d + 8)[0]

    assert [desc(h)[0] for h in heads] == [1, 1, 1]
    assert [desc(h)[2] for h in heads] == [7, 8, 9]       # fetch order
    assert q.inflight_counter == 10
    q.add_used(mem, heads[1], 0)
    q.add_used(mem, heads[0], 0)
    assert [desc(h)[0] for h in heads] == [0, 0, 1]
    assert desc(heads[0])[1] == heads[1]                  # the batch list links back
    last_batch_head, used_idx = struct.unpack_from("<HH", region, 12)
    assert (last_batch_head, used_idx) == (heads[0], 2)


def test_resubmit_walks_a_recorded_head_without_moving_the_ring(mem, drv):
    head = drv.add_chain(request(drv))
    drv.publish()
    q = drv.queue()
    chain = q.resubmit(mem, head)
    assert chain.head == head and len(chain.readable) == 2 and len(chain.writable) == 1
    assert q.last_avail_idx == 0 and q.in_flight == 1
    with pytest.raises(QueueError) as e:
        q.resubmit(mem, drv.size)
    assert e.value.check == "head-index"
