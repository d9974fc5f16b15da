"""VIRTIO_BLK_T_SECURE_ERASE (virtio 1.2): the erased range never reads back
its old data, from the guest or from the host's files, on every engine (the C
path hands the request to Python), raw and qcow2 (with a backing file)."""
import subprocess

import pytest

from pykvm.virtio import blk as B
from tests.unit.test_virtio_blk import DISK, Rig, pattern

T_SECURE_ERASE = 14
MiB = 1 << 20


def test_offered_with_its_limits_in_config_space(rig):
    d = rig.drv.t
    assert rig.drv.features & B.F_SECURE_ERASE
    assert d.config(60, 4) == (64 * MiB) // 512            # max_secure_erase_sectors
    assert d.config(64, 4) == 1                            # max_secure_erase_seg
    assert d.config(68, 4) == 1                            # secure_erase_sector_alignment


def test_the_range_reads_zeroes_and_the_file_holds_no_old_byte(rig, image):
    old = image.read_bytes()[64 * 512:192 * 512]
    assert any(old)
    assert rig.drv.ranged(T_SECURE_ERASE, 64, 128) == B.S_OK
    status, back, _ = rig.drv.read(64, 128 * 512)
    assert status == B.S_OK and back == bytes(128 * 512)
    data = image.read_bytes()
    assert data[64 * 512:192 * 512] == bytes(128 * 512)
    assert data[63 * 512:64 * 512] == pattern(DISK)[63 * 512:64 * 512]      # neighbours kept
    assert data[192 * 512:193 * 512] == pattern(DISK)[192 * 512:193 * 512]
    assert rig.backend.stats["secure_erase"] == 1


def test_refused_with_flags_past_its_limit_and_without_the_feature(tmp_path, image):
    r = Rig(image)
    try:
        assert r.drv.ranged(T_SECURE_ERASE, 0, 8, flags=1) == B.S_UNSUPP
        assert r.drv.ranged(T_SECURE_ERASE, 0, (64 * MiB) // 512 + 8) == B.S_IOERR
        assert r.drv.ranged(T_SECURE_ERASE, DISK // 512 - 4, 8) == B.S_IOERR   # past the end
    finally:
        r.close()
    r = Rig(image, features=~B.F_SECURE_ERASE & ((1 << 64) - 1))
    try:
        assert r.drv.ranged(T_SECURE_ERASE, 0, 8) == B.S_UNSUPP
    finally:
        r.close()
    assert image.read_bytes()[:8 * 512] == pattern(DISK)[:8 * 512]


@pytest.mark.parametrize("discard", ["unmap", "ignore"])   # ignore: freed clusters not punched
@pytest.mark.parametrize("engine_name", ["python", "io_uring"])
def test_qcow2_frees_overwrites_and_hides_the_backing_file(tmp_path, engine_name, discard):
    from tests.conftest import Engine
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", base], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 1M", top], check=True,
                   capture_output=True)
    r = Rig(top, engine=Engine(engine_name, "writeback"), discard=discard)
    try:
        # 256 KiB of the backing file's data each side of the overlay's own 1 MiB
        assert r.drv.ranged(T_SECURE_ERASE, 1536, 3072) == B.S_OK
        status, back, _ = r.drv.read(1536, 3072 * 512)
        assert status == B.S_OK and back == bytes(3072 * 512)
        assert r.drv.read(1024, 512)[1] == b"\x5a" * 512      # outside: the backing file's
    finally:
        r.close()
    assert b"\xa5" * 4096 not in top.read_bytes()               # no old byte in the file
    assert subprocess.run(["qemu-img", "check", "-q", top]).returncode == 0
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 768k 1536k", top],
                         capture_output=True, text=True).stdout
    assert "Pattern verification failed" not in out and "read" in out
