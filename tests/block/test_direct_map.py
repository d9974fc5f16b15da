"""The qcow2 direct map: the table of plain data a device's own I/O thread
(the C fast path) serves without asking the driver, and its invalidation.

``direct_extents()`` must be exactly the image's allocated, uncompressed data
(``qemu-img map`` is the oracle), writable exactly where an in-place write
needs no metadata change. Before the driver changes what a published range
means (discard, write-zeroes, copy-on-write, snapshots) the range must have
left the table: the listener is called while the old mapping still stands."""
import json
import random

import pytest

from pykvm.block import BlockBackend
from pykvm.block.driver import open_image, write_range
from pykvm.block.qcow2 import Qcow2Driver

from .conftest import Disk, as_raw, assert_clean, needs_qemu, pattern, qemu_img, qemu_io
from .test_interop import OPTIONS, SIZE, qemu_made

MiB = 1 << 20


def runs(pairs):
    """(guest offset, length, host offset) pieces, merged where contiguous in both."""
    out = []
    for g, n, h in sorted(pairs):
        if out and out[-1][0] + out[-1][1] == g and out[-1][2] + out[-1][1] == h:
            out[-1][1] += n
        else:
            out.append([g, n, h])
    return [tuple(r) for r in out]


def qemu_data(path):
    """qemu-img map's plain data of the top image: (guest, length, host offset)."""
    m = json.loads(qemu_img("map", "--output=json", path).stdout)
    return runs((e["start"], e["length"], e["offset"]) for e in m
                if e["data"] and e["depth"] == 0 and "offset" in e
                and not e.get("compressed", False))


def ours(drv):
    return runs((e.offset, e.length, e.host_offset) for e in drv.direct_extents())


@needs_qemu
@pytest.mark.parametrize("opts", OPTIONS)
def test_direct_extents_are_qemu_img_maps_data(tmp_path, opts):
    p = qemu_made(tmp_path, opts)
    drv = open_image(str(p))
    try:
        ext = drv.direct_extents()
        assert ext, "the image has data"
        assert ours(drv) == qemu_data(p)
        assert all(e.writable for e in ext)       # no snapshot: every cluster has refcount 1
        assert all(e.fd == drv.fd for e in ext)
        # sorted, disjoint, merged
        for a, b in zip(ext, ext[1:]):
            assert a.offset + a.length <= b.offset
            assert not (a.offset + a.length == b.offset and
                        a.host_offset + a.length == b.host_offset and a.writable == b.writable)
        # after our own writes too (they allocate, some contiguously)
        rnd = random.Random(opts)
        for i in range(20):
            off = rnd.randrange(SIZE)
            n = min(rnd.randrange(1, 150000), SIZE - off)
            write_range(drv, off, pattern(n, i))
        assert ours(drv) == qemu_data(p)
    finally:
        drv.close()


@needs_qemu
def test_compressed_zero_and_backing_clusters_are_left_out(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(2 * MiB, 1))
    src = tmp_path / "src.raw"
    src.write_bytes(pattern(MiB, 2) + bytes(MiB))
    comp = tmp_path / "comp.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, comp)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", comp.name, "-F", "qcow2", top, 2 * MiB)
    qemu_io(top, "write -P 5 64k 64k", "write -z 256k 128k", "write -P 6 1M 4k")
    drv = open_image(str(comp))
    try:
        assert drv.direct_extents() == []           # every cluster compressed
    finally:
        drv.close()
    drv = open_image(str(top))
    try:
        assert ours(drv) == qemu_data(top) == [(64 << 10, 64 << 10, ours(drv)[0][2]),
                                              (MiB, 64 << 10, ours(drv)[1][2])]
    finally:
        drv.close()


@needs_qemu
def test_shared_clusters_are_read_only_and_read_only_images_have_no_writable(tmp_path):
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", p, 4 * MiB)
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 2 256k 64k")                # copied: refcount 1 again
    drv = open_image(str(p))
    try:
        ext = drv.direct_extents()
        assert ours(drv) == qemu_data(p)
        w = [(e.offset, e.length) for e in ext if e.writable]
        assert w == [(256 << 10, 64 << 10)]
    finally:
        drv.close()
    b = BlockBackend(str(p), read_only=True)
    try:
        assert b.direct_extents() and not any(e.writable for e in b.direct_extents())
    finally:
        b.close()
    b = BlockBackend(str(p), detect_zeroes="on")
    try:
        assert not any(e.writable for e in b.direct_extents())
    finally:
        b.close()


class Listener:
    """Stands for the C fast path: records each table and, at the moment it is
    installed, what the driver's metadata said then (so a test can see that a
    range left the table *before* its cluster changed)."""

    def __init__(self, backend, watch=None):
        self.b = backend
        self.watch = watch or (lambda: None)
        self.calls = []
        backend.set_map_listener(self, backend.direct_extents())

    def __call__(self, extents, wait):
        assert wait, "a table must be in use before the backend goes on"
        self.calls.append((list(extents), self.watch()))

    @property
    def table(self):
        return self.calls[-1][0] if self.calls else self.b._published


def covers(table, offset, length, write=False):
    """Some extent lets the fast path touch a byte of [offset, offset+length)."""
    return any(e.offset < offset + length and offset < e.offset + e.length and
               (e.writable or not write) for e in table)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "d.qcow2"
    Qcow2Driver.create(str(p), 4 * MiB)
    d = Disk(p)
    assert d.write(0, pattern(2 * MiB, 3)) == 2 * MiB
    d.close()
    return p


@needs_qemu
@pytest.mark.parametrize("op", ["discard", "write_zeroes", "write_zeroes_unmap"])
def test_discard_and_write_zeroes_leave_the_table_first(image, op, disk_factory):
    d = disk_factory(image)
    drv = d.b.driver
    host = drv.map(MiB, 1)[0].host_offset
    lst = Listener(d.b, watch=lambda: (drv.map(MiB, 1)[0].kind, drv.refcount(host >> 16)))
    assert covers(lst.table, MiB, 128 << 10, write=True)
    if op == "discard":
        assert d.discard(MiB, 128 << 10) == 0
    else:
        assert d.write_zeroes(MiB, 128 << 10, unmap=op.endswith("unmap")) == 0
    assert lst.calls          # (then maybe a rebuild at the completion's reap)
    table, (kind, rc) = lst.calls[0]
    assert (kind, rc) == ("data", 1)                 # the cluster was still there
    assert not covers(table, MiB, 128 << 10)
    assert covers(table, 0, MiB, write=True) and covers(table, MiB + (128 << 10), 1, True)
    assert d.read(MiB, 128 << 10) == bytes(128 << 10)
    # a later rebuild does not bring the range back
    d.b.refresh_map(force=True)
    assert not covers(lst.table, MiB, 128 << 10)
    assert lst.table == d.b.direct_extents()
    d.close()
    assert_clean(image)


def test_nothing_published_means_no_call(image, disk_factory):
    d = disk_factory(image)
    lst = Listener(d.b)
    assert d.discard(3 * MiB, MiB) == 0              # never written: not in the table
    assert lst.calls == []
    d.close()


@needs_qemu
def test_snapshot_makes_the_table_read_only_before_refcounts_change(image):
    drv = open_image(str(image))
    b = BlockBackend.__new__(BlockBackend)            # the listener bookkeeping alone
    b.driver, b.read_only, b.detect_zeroes = drv, False, "off"
    b.wlog = b.volatile = None                       # (no node that takes writes from C)
    lst = Listener(b, watch=lambda: drv.refcount(drv.map(0, 1)[0].host_offset >> 16))
    assert covers(lst.table, 0, 2 * MiB, write=True)
    drv.snapshot_create("s1")
    table, rc = lst.calls[0]
    assert rc == 1                                    # called before the refcounts went up
    assert not covers(table, 0, 4 * MiB, write=True)
    assert covers(table, 0, 2 * MiB)                  # still readable: same data
    # copy-on-write away from a shared cluster: it leaves the table before commit
    n = len(lst.calls)
    old = drv.map(MiB, 1)[0].host_offset
    lst.watch = lambda: drv.map(MiB, 1)[0].host_offset
    write_range(drv, MiB, pattern(4096, 9))
    assert len(lst.calls) == n + 1
    table, host_then = lst.calls[-1]
    assert host_then == old
    assert not covers(table, MiB, 64 << 10)
    assert drv.map(MiB, 1)[0].host_offset != old
    # rebuilt: the copy is writable, the rest still read-only
    lst.watch = lambda: None
    assert b.refresh_map(force=True)
    w = [(e.offset, e.length) for e in lst.table if e.writable]
    assert w == [(MiB, 64 << 10)]
    drv.snapshot_apply("s1")
    assert lst.calls[-1][0] == [] or not covers(lst.calls[-1][0], 0, 4 * MiB)
    drv.close()
    assert_clean(image)
    assert as_raw(image, image.parent)[:2 * MiB] == pattern(2 * MiB, 3)


def test_allocations_are_added_rate_limited(image, disk_factory):
    d = disk_factory(image)
    lst = Listener(d.b)
    d.b.MAP_REFRESH_MIN = 3600                        # only the first rebuild is due
    assert d.write(3 * MiB, pattern(4096, 1)) == 4096
    assert covers(lst.table, 3 * MiB, 4096)           # rebuilt at the first reap after it
    assert d.write(3 * MiB + (64 << 10), pattern(4096, 2)) == 4096
    assert not covers(lst.table, 3 * MiB + (64 << 10), 4096)   # not yet: rate-limited
    assert d.b.refresh_map(force=True)
    assert covers(lst.table, 3 * MiB + (64 << 10), 4096, write=True)
    assert not d.b.refresh_map(force=True)            # nothing new
    d.close()


def test_direct_runs_match_an_entry_by_entry_walk(tmp_path):
    """_dx_runs finds runs by comparing slices with ranges; an entry-by-entry
    walk over random tables (runs, gaps, zero and compressed entries, flags
    that change inside a run, hosts at and past the end of the file) agrees."""
    from pykvm.block.qcow2 import COMPRESSED, COPIED, OFFSET_MASK, ZERO
    p = tmp_path / "t.qcow2"
    Qcow2Driver.create(str(p), 64 << 20)
    d = open_image(str(p), "qcow2", read_only=False)
    cs = d.cluster_size
    try:
        d.eof = 200 * cs + 100          # not cluster-aligned, as a file may be
        rnd = random.Random(5)
        for trial in range(200):
            n = rnd.choice([1, 2, 7, 64, 1024])
            table, host = [], cs * rnd.randrange(0, 4)
            while len(table) < n:
                kind = rnd.random()
                k = rnd.randrange(1, 40)
                if kind < 0.5:          # a run, maybe with a flag change inside
                    flag = COPIED if rnd.random() < 0.7 else 0
                    for i in range(k):
                        if rnd.random() < 0.05:
                            flag ^= COPIED
                        table.append((host + i * cs) | flag)
                    host += k * cs + cs * rnd.randrange(0, 3)
                elif kind < 0.7:
                    table += [0] * k
                elif kind < 0.8:
                    table += [ZERO] * k
                elif kind < 0.9:
                    table += [COMPRESSED | (cs * 3)] * k
                else:
                    host = cs * rnd.randrange(150, 220)
            table = table[:n]
            first = rnd.randrange(0, 16)
            n = min(n, (d.size + cs - 1) // cs - first)
            got = [tuple(x) for x in d._dx_runs(table, first, n)]
            want = []
            for j in range(n):
                e = table[j]
                h = e & OFFSET_MASK
                if not e or e & (COMPRESSED | ZERO) or h < cs or h >= d.eof:
                    continue
                g, length, w = (first + j) * cs, min(cs, d.size - (first + j) * cs), bool(e & COPIED)
                if want and want[-1][0] + want[-1][1] == g and want[-1][3] + want[-1][1] == h \
                        and want[-1][4] == w:
                    want[-1] = (want[-1][0], want[-1][1] + length, d.fd, want[-1][3], w)
                else:
                    want.append((g, length, d.fd, h, w))
            assert got == want, (trial, table[:20])
    finally:
        d.close()
