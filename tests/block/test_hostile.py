"""Corrupt and truncated headers, tables past the end of the file or
misaligned, absurd sizes, unknown features and backing loops: each is one
clear BlockError, bounded memory, no crash and no hang; a refused image is
never modified."""
import os
import resource
import struct

import pytest

from pykvm.block import BlockBackend, BlockError
from pykvm.block.driver import open_image, read_range
from pykvm.block.qcow2 import Qcow2Driver

MiB = 1 << 20


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "h.qcow2"
    Qcow2Driver.create(str(p), 4 * MiB)
    drv = open_image(str(p))
    from pykvm.block.driver import write_range
    write_range(drv, 0, b"d" * 65536)
    drv.close()
    return p


def patch(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


CASES = {
    "bad magic": (0, ">4s", b"QFI\x00", "raw"),       # then it probes as raw: fine
    "version 1": (4, ">I", 1, "unsupported qcow2 version 1"),
    "version 4": (4, ">I", 4, "unsupported qcow2 version 4"),
    "cluster_bits 8": (20, ">I", 8, "invalid cluster_bits 8"),
    "cluster_bits 30": (20, ">I", 30, "invalid cluster_bits 30"),
    "absurd size": (24, ">Q", 1 << 62, "L1 table .* too small|absurd"),
    "huge size": (24, ">Q", (1 << 63) - 512, "absurd virtual size"),
    "encryption": (32, ">I", 1, "encrypted"),
    "l1 too large": (36, ">I", 1 << 30, "L1 table too large"),
    "l1 misaligned": (40, ">Q", 0x30001, "not cluster-aligned"),
    "l1 past eof": (40, ">Q", 1 << 40, "past the end of the file"),
    "reftable misaligned": (48, ">Q", 0x10008, "not cluster-aligned"),
    "reftable past eof": (48, ">Q", 1 << 40, "past the end"),
    "reftable huge": (56, ">I", 1 << 20, "refcount table too large"),
    "reftable empty": (56, ">I", 0, "invalid refcount table size"),
    "too many snapshots": (60, ">I", 1 << 30, "too many snapshots"),
    "snapshots past eof": (60, ">IQ", 1, 1 << 40, "past the end"),
    "unknown incompatible bit": (72, ">Q", 1 << 40, "unsupported incompatible qcow2 feature.*bit 40"),
    "refcount_order 7": (96, ">I", 7, "invalid refcount_order 7"),
    "header_length odd": (100, ">I", 107, "invalid qcow2 header length"),
    "header_length huge": (100, ">I", 1 << 20, "invalid qcow2 header length"),
    "backing name too long": (8, ">QI", 512, 5000, "backing file name too long"),
    "compression type without bit": (104, ">B", 1, "compression type"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_header_is_one_clear_error(good, case):
    off, fmt, *values, match = CASES[case]
    patch(good, off, fmt, *values)
    before = good.read_bytes()
    resource.setrlimit(resource.RLIMIT_AS, resource.getrlimit(resource.RLIMIT_AS))
    if match == "raw":
        drv = open_image(str(good))
        assert drv.format_name == "raw"
        drv.close()
        return
    for ro in (True, False):
        with pytest.raises(BlockError, match=match) as e:
            BlockBackend(str(good), fmt="qcow2", read_only=ro)
        assert "\n" not in str(e.value) and str(good) in str(e.value)
    assert good.read_bytes() == before


def test_unknown_feature_named_from_the_feature_table(good):
    # rewrite the feature-name table entry of 'extended L2' to describe bit 9
    data = bytearray(good.read_bytes())
    i = data.find(b"extended L2 entries")
    assert i > 0
    data[i - 1] = 9
    data[i:i + 19] = b"frobnication\0\0\0\0\0\0\0"
    struct.pack_into(">Q", data, 72, 1 << 9)
    good.write_bytes(bytes(data))
    with pytest.raises(BlockError, match="frobnication; refusing to open"):
        open_image(str(good))


@pytest.mark.parametrize("size", [0, 50, 71, 103])
def test_truncated_header(tmp_path, good, size):
    p = tmp_path / "t.qcow2"
    p.write_bytes(good.read_bytes()[:size])
    with pytest.raises(BlockError):
        open_image(str(p), "qcow2")


def test_truncated_file_reads_fail_cleanly(tmp_path, good):
    data = good.read_bytes()
    p = tmp_path / "t.qcow2"
    p.write_bytes(data[:4 * 65536 + 100])       # the L2 table is cut
    drv = open_image(str(p), "qcow2", read_only=True)
    with pytest.raises(BlockError, match="past the end of the file"):
        read_range(drv, 0, 4096)
    drv.close()


def test_l2_offset_misaligned_or_past_eof(good):
    drv = open_image(str(good), "qcow2", read_only=True)
    l1_off = drv.h.l1_offset
    drv.close()
    for bad, match in ((0x8000000000010200 | (1 << 9), "not cluster-aligned"),
                       (0x8000000000000000 | (1 << 40), "past the end")):
        patch(good, l1_off, ">Q", bad)
        drv = open_image(str(good), "qcow2", read_only=True)
        with pytest.raises(BlockError, match=match):
            read_range(drv, 0, 512)
        drv.close()


def test_data_cluster_past_eof(good, disk_factory):
    drv = open_image(str(good), "qcow2", read_only=True)
    l2_off = drv.l1[0] & 0x00FFFFFFFFFFFE00
    drv.close()
    patch(good, l2_off, ">Q", (1 << 63) | (1 << 45))
    drv = open_image(str(good), "qcow2", read_only=True)
    with pytest.raises(BlockError, match="outside the file"):
        read_range(drv, 0, 512)
    drv.close()
    # through the backend (on every engine): an I/O error, and the device carries on
    d = disk_factory(good, fmt="qcow2", read_only=True)
    buf = memoryview(bytearray(512))
    d.b.readv(1, 0, [buf])
    assert d.wait([1])[1] < 0
    assert d.read(65536, 512) == bytes(512)
    d.close()


def test_refcount_block_past_eof_when_writing(good):
    drv = open_image(str(good), "qcow2", read_only=True)
    rt = drv.h.rt_offset
    drv.close()
    patch(good, rt, ">Q", 1 << 40)
    drv = open_image(str(good), "qcow2")
    from pykvm.block.driver import write_range
    with pytest.raises(BlockError, match="refcount block"):
        write_range(drv, MiB, b"x" * 512)
    drv.abandon()


def test_backing_loops(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    Qcow2Driver.create(str(a), MiB, backing_file="b.qcow2", backing_fmt="qcow2")
    Qcow2Driver.create(str(b), MiB, backing_file="a.qcow2", backing_fmt="qcow2")
    with pytest.raises(BlockError, match="backing file loop"):
        open_image(str(a))
    s = tmp_path / "self.qcow2"
    Qcow2Driver.create(str(s), MiB, backing_file="self.qcow2")
    with pytest.raises(BlockError, match="loop"):
        open_image(str(s))


def test_missing_backing_file(tmp_path):
    a = tmp_path / "a.qcow2"
    Qcow2Driver.create(str(a), MiB, backing_file="nope.raw", backing_fmt="raw")
    with pytest.raises(BlockError, match="node '/backing/file': file '.*nope.raw': cannot open"):
        open_image(str(a))


def test_deep_chain(tmp_path):
    (tmp_path / "l0.raw").write_bytes(b"\x01" * MiB)
    prev, fmt = "l0.raw", "raw"
    for i in range(1, 40):
        Qcow2Driver.create(str(tmp_path / f"l{i}.qcow2"), MiB, backing_file=prev, backing_fmt=fmt)
        prev, fmt = f"l{i}.qcow2", "qcow2"
    drv = open_image(str(tmp_path / prev))
    assert read_range(drv, 4096, 4096) == b"\x01" * 4096
    drv.close()


def test_corrupt_bit_refuses_writable_open(good):
    patch(good, 72, ">Q", 2)
    with pytest.raises(BlockError, match="marked corrupt"):
        open_image(str(good), "qcow2")
    open_image(str(good), "qcow2", read_only=True).close()


def test_unknown_autoclear_and_compatible_bits_and_extensions(good, tmp_path):
    """Compatible bits and unknown extensions survive a writable open and a
    header rewrite; unknown autoclear bits are cleared (the spec's rule)."""
    drv = open_image(str(good), "qcow2")
    drv.h.unknown_exts.append((0x12345678, b"keep me"))
    drv.rewrite_header()
    drv.close()
    patch(good, 80, ">Q", (1 << 33))
    patch(good, 88, ">Q", (1 << 20))
    drv = open_image(str(good), "qcow2")
    drv.close()
    data = good.read_bytes()
    assert struct.unpack_from(">Q", data, 80)[0] == 1 << 33
    assert struct.unpack_from(">Q", data, 88)[0] == 0
    assert b"keep me" in data[:65536]
    from .conftest import QEMU_IMG, assert_clean
    if QEMU_IMG:
        assert_clean(good)


def test_refused_image_is_not_modified(good):
    patch(good, 72, ">Q", 1 << 50)
    before = good.read_bytes()
    st = os.stat(good)
    with pytest.raises(BlockError):
        open_image(str(good))
    assert good.read_bytes() == before and os.stat(good).st_mtime_ns == st.st_mtime_ns
