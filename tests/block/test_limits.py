"""Images past a limit (README.md, "Limits"): each is refused in one line by
`pykvm img` (exit 1, as qemu-img), and nothing of the size the image asks for
is allocated. Each image is crafted here from a good one; the memory is the
peak RSS of the `pykvm img` process (os.wait4) against the same command on
the good image."""
import os
import struct
import subprocess
import sys

import pytest

from pykvm.block.driver import open_image
from pykvm.block.graph import MAX_BACKING_DEPTH
from pykvm.block.qcow2 import OFFSET_MASK, Qcow2Driver
from pykvm.block.qcow2.header import (MAX_HEADER_EXTENSIONS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
                                      MAX_SNAPSHOT_TABLE, MAX_SNAPSHOTS)

from .conftest import needs_qemu

MiB = 1 << 20
CS = 65536
# what a refused image may cost beyond opening a good one
SLACK = 16 * MiB
# The command runs in a child that reports its own peak (VmHWM: its own memory
# since exec; a forked child's ru_maxrss would count the test process's RSS).
WRAP = """
import os, sys
def peak():
    with open("/proc/self/status") as f:
        return next(l for l in f if l.startswith("VmHWM:")).split()[1]
if sys.argv[1] == "img":
    from pykvm.img import main_img
    rc = main_img(sys.argv[2:])
else:
    exec(sys.argv[2], {"argv": sys.argv[3:]})
    rc = 0
with open(os.environ["PEAK_FILE"], "w") as f:
    f.write(peak())
sys.exit(rc)
"""


def run(*args) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of ``pykvm img ARGS`` (or, with
    "py" first, of Python code with ``argv``)."""
    import tempfile
    with tempfile.NamedTemporaryFile() as peak:
        p = subprocess.run([sys.executable, "-c", WRAP, *(str(a) for a in args)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PEAK_FILE": peak.name}, timeout=120)
        with open(peak.name) as f:
            kib = f.read()
    return p.returncode, p.stderr, int(kib or 0) * 1024


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    p = tmp_path_factory.mktemp("base") / "good.qcow2"
    Qcow2Driver.create(str(p), 4 * MiB)
    rc, err, rss = run("img", "info", p)
    assert rc == 0, err
    return rss


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "h.qcow2"
    Qcow2Driver.create(str(p), 4 * MiB)
    return p


def patch(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def refused(baseline, path, match, *cmd):
    rc, err, rss = run("img", *(cmd or ("info", path)))
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvm img: ") and match in lines[0], err
    assert rss - baseline < SLACK, f"{(rss - baseline) >> 20} MiB more than a good image"
    return lines[0]


def end_of(path) -> int:
    size = os.path.getsize(path)
    return size + -size % CS


def test_l1_table_just_past_the_limit(baseline, good):
    patch(good, 36, ">I", MAX_L1_BYTES // 8 + 1)
    refused(baseline, good, f"L1 table too large ({MAX_L1_BYTES // 8 + 1} entries, more than "
                            f"{MAX_L1_BYTES} bytes)")


def test_l1_table_at_the_limit_costs_its_size(baseline, tmp_path):
    """The largest L1 table allowed (32 MiB, 4M entries), every entry set: held
    as 8 bytes an entry, its open costs the table read and the table (a list of
    ints was 40 bytes an entry: 160 MiB)."""
    p = tmp_path / "l1.qcow2"
    n = MAX_L1_BYTES // 8
    Qcow2Driver.create(str(p), n * (CS // 8) * CS)
    with open(p, "r+b") as f:
        l1_size, l1_off = struct.unpack_from(">IQ", f.read(48), 36)
        assert l1_size == n
        l2 = end_of(p)
        f.truncate(l2 + CS)                 # one L2 table of zeroes under every entry
        f.seek(l1_off)
        f.write(struct.pack(">Q", l2) * n)
    code = ("from pykvm.block.driver import open_image\n"
            "d = open_image(argv[0], fmt='qcow2')\n"
            "assert len(d.l1) == %d and d.l1[0] == d.l1[-1] == %d\n"
            "d.close()\n" % (n, l2))
    rc, err, rss = run("py", code, p)
    assert rc == 0, err
    assert rss - baseline < 2 * MAX_L1_BYTES + SLACK, \
        f"{(rss - baseline) >> 20} MiB more than a small image"


def test_refcount_table_too_big(baseline, good):
    n = MAX_REFTABLE_BYTES // CS + 1
    patch(good, 56, ">I", n)
    refused(baseline, good, f"refcount table too large ({n} clusters, more than "
                            f"{MAX_REFTABLE_BYTES} bytes)")


def test_too_many_snapshots(baseline, good):
    patch(good, 60, ">IQ", MAX_SNAPSHOTS + 1, CS)
    refused(baseline, good, f"too many snapshots ({MAX_SNAPSHOTS + 1}, at most {MAX_SNAPSHOTS})")


def test_snapshot_table_too_big(baseline, good):
    """Entries with 64 KiB names: the table passes 64 MiB at the 1024th, and no
    name is read before that is known."""
    off = end_of(good)
    pos, n = off, 0
    with open(good, "r+b") as f:
        while pos - off <= MAX_SNAPSHOT_TABLE:
            f.seek(pos)
            f.write(struct.pack(">QIHHIIQII", 0, 0, 0, 0xFFFF, 0, 0, 0, 0, 0))
            pos += 40 + 0xFFFF
            pos += -pos % 8
            n += 1
        f.truncate(pos + CS)
    patch(good, 60, ">IQ", n, off)
    refused(baseline, good, f"snapshot table too large (more than {MAX_SNAPSHOT_TABLE} bytes)")


def test_snapshot_table_at_the_limit_opens(good):
    """The same entries, one fewer than passes the limit: the image opens."""
    off = end_of(good)
    pos, n = off, 0
    with open(good, "r+b") as f:
        while True:
            nxt = pos + 40 + 0xFFFF
            nxt += -nxt % 8
            if nxt - off > MAX_SNAPSHOT_TABLE:
                break
            f.seek(pos)
            f.write(struct.pack(">QIHHIIQII", 0, 0, 0, 0xFFFF, 0, 0, 0, 0, 0))
            pos, n = nxt, n + 1
        f.truncate(pos + CS)
    patch(good, 60, ">IQ", n, off)
    drv = open_image(str(good), "qcow2", read_only=True)
    assert len(drv.snapshots) == n
    drv.close()


def header_length(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack(">I", f.read(104)[100:104])[0]


def test_header_extension_overflowing_the_cluster(baseline, good):
    patch(good, header_length(good), ">II", 0x12345678, CS)
    refused(baseline, good, "header extension 0x12345678 too large: runs past the header area")


def test_too_many_header_extensions(baseline, good):
    n = MAX_HEADER_EXTENSIONS + 1
    patch(good, header_length(good), ">" + "II" * (n + 1), *([0x12345678, 0] * n), 0, 0)
    refused(baseline, good, f"more than {MAX_HEADER_EXTENSIONS} header extensions")


def test_header_extensions_end_before_the_backing_file_name(baseline, good):
    # the name at 0x200; an extension from the header's end runs over it
    patch(good, 8, ">QI", 0x200, 4)
    patch(good, 0x200, ">4s", b"base")
    patch(good, header_length(good), ">II", 0x12345678, 0x200)
    refused(baseline, good, "too large: runs past the header area (512 bytes)")


def test_backing_format_name_too_long(baseline, good):
    patch(good, header_length(good), ">II16s", 0xE2792ACA, 16, b"q" * 16)
    refused(baseline, good, "backing format name too long (16 bytes, at most 15)")


def chain(tmp_path, depth: int) -> str:
    (tmp_path / "l0.raw").write_bytes(b"\x01" * MiB)
    prev, fmt = "l0.raw", "raw"
    for i in range(1, depth + 1):
        Qcow2Driver.create(str(tmp_path / f"l{i}.qcow2"), MiB, backing_file=prev,
                           backing_fmt=fmt)
        prev, fmt = f"l{i}.qcow2", "qcow2"
    return str(tmp_path / prev)


def test_backing_chain_at_the_limit_reads_through(tmp_path):
    top = chain(tmp_path, MAX_BACKING_DEPTH)
    rc, err, _ = run("img", "compare", "-U", top, tmp_path / "l0.raw")
    assert rc == 0, err


def test_backing_chain_one_deeper_than_the_limit(baseline, tmp_path):
    top = chain(tmp_path, MAX_BACKING_DEPTH + 1)
    line = refused(baseline, top, f"backing chain too deep (more than {MAX_BACKING_DEPTH} "
                                  f"backing files)", "convert", "-O", "raw", top,
                   tmp_path / "out.raw")
    assert "Traceback" not in line


def compressed_image(path, compression_type="zlib"):
    """An image whose guest cluster 0 is compressed; (host offset of the
    compressed data, offset of its L2 entry in the file)."""
    Qcow2Driver.create(str(path), 4 * MiB, compression_type=compression_type)
    drv = open_image(str(path), "qcow2")
    assert drv.write_compressed(0, b"ab" * (CS // 2))
    l2_off = drv.l1[0] & OFFSET_MASK
    entry = drv._load_l2(l2_off)[0]
    coff = entry & ((1 << drv.compressed_bits) - 1)
    drv.close()
    return coff, l2_off, entry


def set_compressed_size(path, l2_off, entry, nsect, coff=None):
    x = 62 - (16 - 8)
    entry = entry & ~(((1 << (62 - x)) - 1) << x) | nsect << x
    if coff is not None:
        entry = entry & ~((1 << x) - 1) | coff
    patch(path, l2_off, ">Q", entry)


def test_compressed_size_field_past_the_file(baseline, tmp_path):
    """The size field at its largest (two clusters) from the file's last
    sector: the read is refused, nothing is read past the file."""
    p = tmp_path / "c.qcow2"
    coff, l2_off, entry = compressed_image(p)
    last = os.path.getsize(p) - 512
    set_compressed_size(p, l2_off, entry, (1 << 8) - 1, last)
    refused(baseline, p, f"compressed cluster at {last:#x} is past the end of the file",
            "convert", "-O", "raw", p, tmp_path / "out.raw")


def test_zstd_cluster_that_decompresses_to_far_more_than_a_cluster(tmp_path):
    """A zstd frame of 8 KiB that holds 256 MiB of zeroes, stored as a compressed
    cluster: decoding stops at one cluster (64 KiB read back, no 256 MiB)."""
    import zstandard
    p = tmp_path / "z.qcow2"
    coff, l2_off, entry = compressed_image(p, "zstd")
    c = zstandard.ZstdCompressor().compressobj()
    zero = bytes(MiB)
    bomb = b"".join(c.compress(zero) for _ in range(256)) + c.flush()
    assert len(bomb) < CS - 512
    patch(p, coff, f">{len(bomb)}s", bomb)
    set_compressed_size(p, l2_off, entry, ((coff + len(bomb) - 1) >> 9) - (coff >> 9))
    code = ("from pykvm.block.driver import open_image, read_range\n"
            "d = open_image(argv[0], 'qcow2', read_only=True)\n"
            "assert read_range(d, 0, 65536) == bytes(65536)\n"
            "d.close()\n")
    rc, err, rss = run("py", code, p)
    assert rc == 0, err
    ordinary = tmp_path / "z2.qcow2"
    compressed_image(ordinary, "zstd")
    rc0, err0, rss0 = run("py", code.replace("bytes(65536)", "b'ab' * 32768"), ordinary)
    assert rc0 == 0, err0
    assert rss - rss0 < SLACK, f"{(rss - rss0) >> 20} MiB more than an ordinary cluster"


def test_l2_cache_is_never_larger_than_the_disk_needs(good):
    """l2-cache-size=1T on a 4 MiB disk: as QEMU, the cache holds at most every L2
    table the L1 table can point to; by default at most 32 MiB."""
    from pykvm.block.qcow2.header import L2_CACHE_DEFAULT_MAX
    from pykvm.block.graph import open_node
    drv = open_node({"driver": "qcow2", "l2-cache-size": str(1 << 40),
                     "file": {"driver": "file", "filename": str(good)}}, read_only=True)
    assert drv.l2_cache_max == max(2, drv.h.l1_size)
    drv.close()
    big = good.parent / "big.qcow2"
    Qcow2Driver.create(str(big), 1 << 50)
    drv = open_image(str(big), "qcow2", read_only=True)
    assert drv.l2_cache_max * CS == L2_CACHE_DEFAULT_MAX
    drv.close()


def test_check_walks_a_shared_table_once(tmp_path):
    """1000 snapshots sharing one L1 table of 8192 entries that all point at the
    same L2 table: check counts every reference (each data cluster is referenced
    8192 x 1001 times) but reads and walks each table once, in well under a
    second (it walked 8 million L2 tables)."""
    import time
    p = tmp_path / "s.qcow2"
    Qcow2Driver.create(str(p), 4 * MiB)
    drv = open_image(str(p), "qcow2")
    from pykvm.block.driver import write_range
    write_range(drv, 0, b"d" * CS)
    l2 = drv.l1[0] & OFFSET_MASK
    drv.close()
    l1_off = end_of(p)
    snap_off = l1_off + CS
    with open(p, "r+b") as f:
        f.seek(l1_off)
        f.write(struct.pack(">8192Q", *[l2] * 8192))
        f.write(struct.pack(">QIHHIIQII", l1_off, 8192, 0, 0, 0, 0, 0, 0, 0) * 1000)
        f.truncate(snap_off + 2 * CS)
    patch(p, 36, ">IQ", 8192, l1_off)
    patch(p, 60, ">IQ", 1000, snap_off)
    t0 = time.monotonic()
    rc, err, _ = run("img", "check", p)
    took = time.monotonic() - t0
    assert rc == 2, err                  # refcounts overflow: corruptions, as qemu-img's 2
    assert took < 10, took
    drv = open_image(str(p), "qcow2", read_only=True)
    t0 = time.process_time()
    result = drv.check()
    assert time.process_time() - t0 < 1.0
    drv.close()
    assert result["corruptions"] > 0
    assert any("references; refcounts overflow" in e for e in result["errors"])


def test_json_filename_nested_too_deep(tmp_path):
    """A json: filename nested 5000 deep is one line (it was a RecursionError's
    traceback); brackets inside strings do not count."""
    from pykvm.block.graph import MAX_JSON_NESTING
    deep = "json:" + '{"a":' * 5000 + "1" + "}" * 5000
    rc, err, _ = run("img", "info", deep)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"json: filename nested too deep (more than {MAX_JSON_NESTING} levels)" in err
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(MiB))
    ok = 'json:{"driver": "raw", "file": {"driver": "file", "filename": "%s"}, ' \
         '"node-name": "[[[[{{{{%s"}' % (p, "[" * 1000)
    rc, err, _ = run("img", "info", ok)
    assert rc == 0, err


def test_graph_deeper_than_the_limit(tmp_path):
    """Nodes nested deeper than MAX_GRAPH_DEPTH (here raw over raw over ...) are
    one GraphError; at the limit the graph opens and reads."""
    from pykvm.block import GraphError
    from pykvm.block.driver import read_range
    from pykvm.block.graph import MAX_GRAPH_DEPTH, open_node
    p = tmp_path / "d.raw"
    p.write_bytes(b"\x07" * MiB)

    def spec(n):
        s = {"driver": "file", "filename": str(p)}
        for _ in range(n):
            s = {"driver": "raw", "file": s}
        return s
    drv = open_node(spec(MAX_GRAPH_DEPTH), read_only=True)
    assert read_range(drv, 0, 512) == b"\x07" * 512
    drv.close()
    for n in (MAX_GRAPH_DEPTH + 1, 3000):
        with pytest.raises(GraphError, match=f"graph too deep \\(more than {MAX_GRAPH_DEPTH} "
                                             f"nodes from the root\\)") as e:
            open_node(spec(n), read_only=True)
        assert "\n" not in str(e.value)


def bitmap_image(tmp_path):
    from .conftest import qemu_img, qemu_io
    p = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", p, "64M")
    for name in ("b0", "b1"):
        qemu_img("bitmap", "--add", p, name)
    qemu_io(p, "write 0 1M")
    return p


@needs_qemu
def test_check_counts_bitmaps(tmp_path):
    """Bitmap tables and data are referenced once each: qemu-img's bitmaps check clean."""
    p = bitmap_image(tmp_path)
    drv = open_image(str(p), "qcow2", read_only=True)
    r = drv.check()
    drv.close()
    assert (r["leaks"], r["corruptions"]) == (0, 0), r


@needs_qemu
def test_bitmap_directory_too_large_is_reported(tmp_path):
    """A bitmaps extension claiming more bitmaps than QEMU allows is an error of
    check, not a directory silently left unchecked (its clusters then looked
    leaked, and a repair would free them)."""
    from pykvm.block.qcow2.header import MAX_BITMAPS
    p = bitmap_image(tmp_path)
    data = p.read_bytes()
    i = data.find(struct.pack(">I", 0x23852875))
    assert 0 < i < CS
    patch(p, i + 8, ">I", MAX_BITMAPS + 1)
    drv = open_image(str(p), "qcow2", read_only=True)
    r = drv.check()
    drv.close()
    assert any("bitmap directory too large" in e for e in r["errors"]), r
