"""virtio-blk end to end (Python driver, both transports, no KVM) over a
qcow2 overlay on a raw backing file: the device is unchanged, the backend maps.
On every engine and transport of the matrix (tests/conftest.py): the Python
path on aio=python, the C fast path (which hands what it cannot map to
Python) on the others."""
from pykvm.block.qcow2 import Qcow2Driver
from pykvm.virtio import blk as B
from tests.helpers.virtio_driver import T_DISCARD, T_WRITE_ZEROES
from tests.unit.test_virtio_blk import Rig

from .conftest import as_raw, assert_clean, needs_qemu, pattern

MiB = 1 << 20


@needs_qemu
def test_virtio_blk_on_qcow2_with_backing(tmp_path, transport, engine):
    (tmp_path / "base.raw").write_bytes(pattern(4 * MiB, 6))
    top = tmp_path / "top.qcow2"
    Qcow2Driver.create(str(top), 4 * MiB, backing_file="base.raw", backing_fmt="raw")
    r = Rig(top, transport, engine)
    try:
        assert r.backend.engine.name == engine.name
        assert (r.dev._fast is not None) == engine.c_path
        d = r.drv
        assert d.t.config(0, 8) == 4 * MiB // 512
        status, data, _ = d.read(8, 4096, 4, True)
        assert status == B.S_OK and data == pattern(4 * MiB, 6)[4096:8192]
        assert d.write(100, pattern(8192, 2)) == B.S_OK          # partial clusters: COW
        assert d.read(96, 16384)[1] == pattern(4 * MiB, 6)[96 * 512:100 * 512] + \
            pattern(8192, 2) + pattern(4 * MiB, 6)[116 * 512:128 * 512]
        assert d.ranged(T_WRITE_ZEROES, 2048, 256, flags=1) == B.S_OK
        assert d.ranged(T_DISCARD, 4096, 512) == B.S_OK
        assert d.flush() == B.S_OK
        expect = bytearray(pattern(4 * MiB, 6))
        expect[100 * 512:100 * 512 + 8192] = pattern(8192, 2)
        expect[MiB:MiB + 128 * 1024] = bytes(128 * 1024)
        expect[2 * MiB:2 * MiB + 256 * 1024] = bytes(256 * 1024)
        assert d.read(0, 4 * MiB // 2, 1)[1] == expect[:2 * MiB]
    finally:
        r.close()
    assert_clean(top)
    assert as_raw(top, tmp_path) == expect
