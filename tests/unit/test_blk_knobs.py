"""Every virtio-blk knob QEMU has, as --disk options with QEMU's names, read
back from what the guest sees (features and config space), and enforced."""
import pytest

from pykvm.errors import ConfigError
from pykvm.machine import DiskSpec
from pykvm.virtio import blk as B
from pykvm.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC
from tests.unit.test_virtio_blk import DISK, Rig, pattern


def rig_with(image, spec: str, **kw):
    knobs = DiskSpec.parse(f"file={image}," + spec).knobs
    return Rig(image, knobs=knobs, **kw)


@pytest.mark.parametrize("spec, offset, size, value", [
    ("logical_block_size=4096", 20, 4, 4096),
    ("logical_block_size=4096,physical_block_size=16384", 24, 1, 2),   # exp: 4 blocks
    ("physical_block_size=4096", 24, 1, 3),
    ("min_io_size=8192", 26, 2, 16),                                 # in 512-byte blocks
    ("logical_block_size=4096,opt_io_size=1M", 28, 4, 256),
    ("queue-size=128", 12, 4, 126),                                  # seg_max follows
    ("queue-size=128,seg-max-adjust=off", 12, 4, 126),
    ("queue-size=1024,seg-max-adjust=off", 12, 4, 126),
    ("queue-size=1024", 12, 4, 1022),
    ("max-discard-sectors=2048", 36, 4, 2048),
    ("max-write-zeroes-sectors=4096", 48, 4, 4096),
])
def test_config_space_says_what_the_option_asks(image, spec, offset, size, value):
    r = rig_with(image, spec, queue=int(spec.split("queue-size=")[1].split(",")[0])
                 if "queue-size" in spec else 64)
    try:
        assert r.drv.t.config(offset, size) == value
    finally:
        r.close()


@pytest.mark.parametrize("spec, bit", [
    ("discard=off", B.F_DISCARD), ("write-zeroes=off", B.F_WRITE_ZEROES),
    ("config-wce=off", B.F_CONFIG_WCE), ("event_idx=off", F_EVENT_IDX),
    ("indirect_desc=off", F_INDIRECT_DESC),
])
def test_a_feature_switched_off_is_not_offered(image, spec, bit):
    on = Rig(image)
    try:
        assert on.drv.t.device_features() & bit
    finally:
        on.close()
    off = rig_with(image, spec)
    try:
        assert not off.drv.t.device_features() & bit
    finally:
        off.close()


def test_the_queue_size_is_what_the_transport_offers(image):
    r = rig_with(image, "queue-size=128", queue=128)
    try:
        assert r.drv.t.queue_max(0) == 128
    finally:
        r.close()


def test_discard_keeps_its_drive_meaning():
    assert DiskSpec.parse("file=x.raw,discard=ignore").discard == "ignore"
    s = DiskSpec.parse("file=x.raw,discard=off")
    assert s.discard == "unmap" and not s.knobs.discard


@pytest.mark.parametrize("spec, why", [
    ("logical_block_size=1000", "logical_block_size=1000 is not a power of two"),
    ("logical_block_size=256", "from 512 to 32768"),
    ("logical_block_size=4096,physical_block_size=512", "physical_block_size=512"),
    ("queue-size=100", "queue-size=100 is not a power of two"),
    ("queue-size=2048", "from 4 to 1024"),
    ("min_io_size=1000", "a multiple of 512"),
    ("event_idx=maybe", "event_idx=maybe is not on or off"),
    ("max-discard-sectors=0", "max-discard-sectors=0"),
    ("queues=2,num-queues=2", "not both"),
])
def test_a_bad_knob_is_one_line(spec, why):
    with pytest.raises(ConfigError) as e:
        DiskSpec.parse("file=x.raw," + spec)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_a_4k_disk_refuses_what_is_not_aligned_to_its_block(tmp_path, image, engine):
    r = rig_with(image, "logical_block_size=4096", engine=engine)
    try:
        assert r.drv.write(8, pattern(4096, 3)) == B.S_OK
        assert r.drv.read(8, 4096)[1] == pattern(4096, 3)
        assert r.drv.write(9, pattern(4096, 4)) == B.S_IOERR      # not on a 4K block
        assert r.drv.read(16, 512)[0] == B.S_IOERR                # shorter than a block
    finally:
        r.close()
    assert image.read_bytes()[9 * 512:17 * 512] != pattern(4096, 4)


def test_a_discard_past_max_discard_sectors_is_refused(image):
    from tests.helpers.virtio_driver import T_DISCARD
    r = rig_with(image, "max-discard-sectors=64")
    try:
        assert r.drv.ranged(T_DISCARD, 0, 64) == B.S_OK
        assert r.drv.ranged(T_DISCARD, 64, 65) == B.S_IOERR
    finally:
        r.close()
    assert image.read_bytes()[64 * 512:65 * 512] == pattern(DISK)[64 * 512:65 * 512]


@pytest.mark.parametrize("aio", ["python", "io_uring"])
def test_a_4k_disk_end_to_end_with_the_workload_guest(pykvm, tmp_path, aio):
    img = tmp_path / "k.raw"
    img.write_bytes(b"")
    import os
    os.truncate(img, 64 << 20)
    r = pykvm("fio", "--disk", f"file={img},format=raw,logical_block_size=4096,aio={aio}",
              "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--ios", "2000", "--verify",
              "crc32c", timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0 and "blk_size 4096" in err and "verify: errors=0" in \
        r.stdout.decode(), err[-2000:]
    r = pykvm("fio", "--disk", f"file={img},format=raw,logical_block_size=4096", "--bs", "512",
              "--ios", "10", timeout=120)
    assert r.returncode != 0 and "not a multiple of the device's blk_size" in r.stderr.decode()


def test_seg_max_and_size_max_are_enforced_on_both_paths(tmp_path, engine):
    """A request with more data buffers than seg_max, or one buffer past
    size_max (4 MiB), gets IOERR and nothing lands."""
    image = tmp_path / "big.raw"
    image.write_bytes(pattern(16 << 20))
    r = rig_with(image, "queue-size=64", engine=engine, queue=64)
    try:
        d = r.drv
        assert d.t.config(12, 4) == 62                  # seg_max: the queue size - 2
        bufs = [d.vq.arena.readable(pattern(512, k + 1)) for k in range(63)]
        # (past sector 0, which C leaves to Python)
        assert d.request([d.header(B.T_OUT, 8)] + bufs + [d.vq.arena.writable(1)],
                         indirect=True)[0] == B.S_IOERR
        assert d.request([d.header(B.T_OUT, 8)] + bufs[:62] + [d.vq.arena.writable(1)],
                         indirect=True)[0] == B.S_OK
        big = d.vq.arena.readable(bytes((4 << 20) + 512))
        assert d.request([d.header(B.T_OUT, 128), big, d.vq.arena.writable(1)])[0] == B.S_IOERR
    finally:
        r.close()
    data = image.read_bytes()
    assert data[70 * 512:71 * 512] == pattern(16 << 20)[70 * 512:71 * 512]   # the 63rd: never
    assert data[128 * 512:129 * 512] == pattern(16 << 20)[128 * 512:129 * 512]
