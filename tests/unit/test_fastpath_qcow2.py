"""A qcow2 disk on the C fast path: allocated data clusters are served in C
(the driver's direct map), everything else goes to Python, and a cluster
leaves C's table before Python frees or shares it. On the C engines of the
matrix (tests/conftest.py: threads, native with cache=none, io_uring)."""
import subprocess

import pytest

from pykvm.block import open_image
from pykvm.block.qcow2 import Qcow2Driver
from pykvm.virtio import blk as B
from tests.conftest import C_ENGINES
from tests.helpers.virtio_driver import T_DISCARD, T_WRITE_ZEROES
from tests.unit.test_fastpath_blk import aligned_read, aligned_write
from tests.unit.test_virtio_blk import Rig, pattern

MiB = 1 << 20
pytestmark = pytest.mark.matrix(engine=C_ENGINES)


@pytest.fixture
def image(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(4 * MiB, 1))
    p = tmp_path / "top.qcow2"
    Qcow2Driver.create(str(p), 4 * MiB, backing_file="base.raw", backing_fmt="raw")
    d = open_image(str(p), "qcow2")
    from pykvm.block.driver import write_range
    write_range(d, 0, pattern(MiB, 2))               # clusters 0..15 allocated
    d.close()
    return p


def punts(r):
    return r.dev.counters()["punts"]


def check_clean(path):
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_allocated_clusters_are_served_in_c(engine, image):
    r = Rig(image, "mmio", engine)
    try:
        assert r.dev._fast is not None
        assert aligned_read(r.drv, 8, 4096) == (B.S_OK, pattern(MiB, 2)[4096:8192])
        assert aligned_write(r.drv, 16, pattern(4096, 3)) == B.S_OK   # in place
        assert punts(r) == 0
        # backing-file data: Python
        st, data = aligned_read(r.drv, 2 * MiB // 512, 4096)
        assert (st, data) == (B.S_OK, pattern(4 * MiB, 1)[2 * MiB:2 * MiB + 4096])
        assert punts(r) == 1
        # an allocating write goes to Python; once the table is rebuilt C serves it
        assert aligned_write(r.drv, 3 * MiB // 512, pattern(4096, 4)) == B.S_OK
        assert punts(r) == 2
        before = punts(r)
        for _ in range(3):
            assert aligned_read(r.drv, 3 * MiB // 512, 4096) == (B.S_OK, pattern(4096, 4))
        assert punts(r) <= before + 1
        assert aligned_read(r.drv, 3 * MiB // 512, 4096) == (B.S_OK, pattern(4096, 4))
        assert punts(r) <= before + 1
    finally:
        r.close()
    check_clean(image)


def test_after_discard_c_does_not_write_the_freed_cluster(engine, image):
    r = Rig(image, "mmio", engine)
    try:
        d = r.drv
        drv = r.backend.driver
        old_host = drv.map(256 << 10, 1)[0].host_offset
        assert d.ranged(T_DISCARD, (256 << 10) // 512, (64 << 10) // 512) == B.S_OK
        gen = r.dev._fast.map_generation()
        assert gen >= 1
        assert not any(e.offset < (320 << 10) and (256 << 10) < e.offset + e.length
                       for e in r.backend._published)
        # the freed cluster is reused by the next allocation: a stale C write
        # to it would corrupt that one
        n = punts(r)
        assert aligned_write(r.drv, (256 << 10) // 512, pattern(4096, 5)) == B.S_OK
        assert punts(r) == n + 1                     # not in C's table: Python allocated
        assert aligned_write(r.drv, 3 * MiB // 512, pattern(4096, 6)) == B.S_OK
        assert aligned_read(r.drv, (256 << 10) // 512, 8192)[1] == \
            pattern(4096, 5) + bytes(4096)
        assert aligned_read(r.drv, 3 * MiB // 512, 4096)[1] == pattern(4096, 6)
        del old_host
        assert d.ranged(T_WRITE_ZEROES, 0, 128, flags=1) == B.S_OK
        assert aligned_read(r.drv, 0, 65536)[1] == bytes(65536)
    finally:
        r.close()
    check_clean(image)


def test_map_generation_is_reached_after_requests_drain(engine, image):
    r = Rig(image, "mmio", engine)
    try:
        fast = r.dev._fast
        for i in range(5):
            assert aligned_write(r.drv, 8 * i, pattern(4096, i)) == B.S_OK
        gen = fast.set_map(r.backend._published)
        assert fast.wait_map(gen, timeout=10)
        assert fast.map_generation() >= gen
    finally:
        r.close()
