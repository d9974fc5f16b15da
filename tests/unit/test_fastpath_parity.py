"""The C virtqueue (native/vq.c) against its Python twin (SplitQueue).

Every test of tests/unit/test_queue.py runs on both queue twins (the
``queue_twin`` fixture: SplitQueue and ``fastpath.CQueue``, same interface,
same QueueError check names and messages), hostile cases included. Here a
differential fuzz feeds both the same random rings, on twin copies of guest
memory, and compares every chain, error, used ring, notification decision and
byte of memory they leave behind.
"""
import random

import pytest

from pykvm._native import ffi, lib
from pykvm.memory import GuestMemory
from pykvm.virtio import fastpath
from pykvm.virtio.queue import QueueError, SplitQueue, vring_need_event
from tests.helpers.mock_virtq import MockVirtq
from tests.unit.test_queue import RAM


@pytest.mark.parametrize("event,new,old", [(e, n, o) for e in (0, 1, 2, 6, 65535)
                                           for n in (0, 1, 3, 6) for o in (0, 2, 65534)])
def test_vring_need_event_same_in_c(event, new, old):
    assert bool(lib.pykvm_vring_need_event(event, new, old)) is vring_need_event(event, new, old)


def test_check_names_are_the_readme_table():
    names = {ffi.string(lib.pykvm_vq_check_name(i)).decode() for i in range(1, 17)}
    with open("pykvm/virtio/README.md") as f:
        readme = f.read()
    for name in names:
        assert f"| `{name}` |" in readme, name
    assert len(names) == 16


# -- differential fuzz: the same inputs to both, every outcome compared -----------------

class Twin:
    """A Python queue and a C queue over two copies of the same guest memory."""

    def __init__(self, mems, size, event_idx, indirect, start=0):
        self.mems = mems
        self.drvs = [MockVirtq(m, size=size, start_idx=start) for m in mems]
        self.qs = []
        for cls, drv in zip((SplitQueue, fastpath.CQueue), self.drvs):
            q = cls(0, size)
            q.size = size
            q.desc_table, q.avail_ring, q.used_ring = drv.desc_table, drv.avail_ring, drv.used_ring
            q.event_idx, q.indirect, q.ready = event_idx, indirect, True
            q.activate(drv.mem, last_avail_idx=start, used_idx=start)
            self.qs.append(q)

    def sync_memory(self):
        """Copy the Python side's guest memory over the C side's."""
        a, b = self.mems
        b.write(0, a.read(0, a.size))

    def both(self, op, *args):
        """Run op on both queues; return the one outcome, asserting they agree."""
        out = []
        for q, m in zip(self.qs, self.mems):
            try:
                r = getattr(q, op)(m, *args)
                if r is not None and not isinstance(r, bool):
                    r = (r.head, r.readable, r.writable)
                out.append(("ok", r))
            except QueueError as e:
                out.append(("error", e.check, str(e)))
        assert out[0] == out[1], (op, out)
        py, c = self.qs
        assert (py.last_avail_idx, py.used_idx, py.in_flight) == \
            (c.last_avail_idx, c.used_idx, c.in_flight), op
        return out[0]

    def same_memory(self):
        a, b = self.mems
        assert a.read(0, 0x40000) == b.read(0, 0x40000)


@pytest.fixture
def mems():
    ms = [GuestMemory(RAM, hugepages=False) for _ in range(2)]
    yield ms
    for m in ms:
        m.close()


def random_rings(rng, drv, mem, size, table):
    if rng.random() < 0.2:
        mem.write(drv.desc_table, rng.randbytes(drv.used_ring - drv.desc_table))
        mem.write(table, rng.randbytes(16 * 8))
        return
    descs = []
    for _ in range(size):
        addr = rng.choice([rng.randrange(RAM)] * 4 + [rng.randrange(RAM - 64, RAM + 64),
                                                       rng.getrandbits(64), table, 0x30000])
        length = rng.choice([rng.randrange(64)] * 3 + [rng.getrandbits(32), 16 * rng.randrange(5),
                                                        0])
        descs.append((addr, length, rng.getrandbits(3), rng.randrange(size + 2)))
    for i, d in enumerate(descs):
        drv.write_desc(i, *d)
    drv.write_table(table, [d[:3] + (rng.randrange(6),) for d in rng.sample(descs, 4)])
    for k in range(size):
        drv.write_avail_entry(drv.next_avail + k, rng.randrange(size + 2))
    drv.set_avail_idx((drv.next_avail + rng.choice([rng.randrange(size + 1)] * 9
                                                   + [rng.getrandbits(16)])) & 0xFFFF)
    drv.set_used_event(rng.getrandbits(16) if rng.random() < 0.3 else rng.randrange(4))
    drv.set_avail_flags(rng.getrandbits(16) if rng.random() < 0.3 else 0)


@pytest.mark.parametrize("seed", range(4))
def test_differential_fuzz(mems, seed):
    rng = random.Random(seed)
    size = 16
    table = 0x20000
    seen = {"ok": 0, "error": 0}
    for _ in range(600):
        start = rng.choice([0, 0, 65530, rng.getrandbits(16)])
        t = Twin(mems, size, event_idx=rng.random() < 0.5, indirect=rng.random() < 0.7,
                 start=start)
        drv = t.drvs[0]
        random_rings(rng, drv, mems[0], size, table)
        t.sync_memory()
        popped = []
        for _ in range(size + 1):
            out = t.both("pop")
            seen[out[0]] += 1
            if out[0] == "error" or out[1] is None:
                break
            popped.append(out[1])
            if rng.random() < 0.3:
                t.both("set_notification", False)
        rng.shuffle(popped)
        for head, _, writable in popped:
            t.both("add_used", head, sum(n for _, n in writable) & 0xFFFFFFFF)
            if rng.random() < 0.5:
                t.both("needs_notification")
        t.both("needs_notification")
        t.both("set_notification", rng.random() < 0.8)
        t.both("has_pending")
        t.same_memory()
    assert seen["ok"] and seen["error"], seen


def test_differential_driver_and_device_loop(mems):
    """A well-behaved driver and device taking turns over wrap-around, with
    notifications both ways: the same decisions at every step."""
    rng = random.Random(7)
    t = Twin(mems, 8, event_idx=True, indirect=True, start=65500)
    decisions = []
    for step in range(300):
        for drv in t.drvs:
            drv.reap()
        n = min(rng.randrange(1, 5), len(t.drvs[0].free) // 2)
        shape = [(rng.randrange(0x40000, 0x80000), rng.randrange(1, 600), rng.random() < 0.5)
                 for _ in range(rng.randrange(1, 3))]
        shape.sort(key=lambda b: b[2])  # readable first
        use_indirect = rng.random() < 0.3
        ahead = rng.randrange(4)
        for drv in t.drvs:
            for _ in range(n):
                drv.add_chain(shape, indirect=use_indirect, table=0x30000 if use_indirect else None)
            drv.set_used_event((drv.last_used + ahead) & 0xFFFF)
            drv.publish()
        popped = []
        while True:
            out = t.both("pop")
            if out[1] is None:
                if not t.both("set_notification", True)[1]:
                    break
                continue
            popped.append(out[1])
        rng.shuffle(popped)
        for head, _, _ in popped:
            t.both("add_used", head, 1)
        decisions.append(t.both("needs_notification")[1])
        t.same_memory()
    assert any(decisions) and not all(decisions)
