"""pykvm img against qemu-img: same flags, same exit codes, images that
qemu-img checks clean and reads back identical."""
import json
import os
import struct

import pytest

from pykvm.block import open_image

from .conftest import as_raw, assert_clean, img, needs_qemu, pattern, qemu_img, qemu_io

pytestmark = needs_qemu
MiB = 1 << 20



@pytest.fixture
def src(tmp_path):
    """A qcow2 with data, zero clusters and holes, over a raw backing file."""
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(4 * MiB, 2))
    p = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p)
    qemu_io(p, "write -P 0x5a 100k 300k", "write -z 1M 1M", "write -P 0x11 3M 4k")
    return p


@pytest.mark.parametrize("opts", ["", "cluster_size=4k,refcount_bits=1", "compat=0.10",
                                  "extended_l2=on,lazy_refcounts=on", "compression_type=zstd",
                                  "preallocation=metadata", "preallocation=full",
                                  "data_file=ext.data"])
def test_create_options(tmp_path, capsys, opts):
    p = tmp_path / "c.qcow2"
    args = ["create", "-f", "qcow2"] + (["-o", opts] if opts else []) + [p, "3M"]
    if "data_file" in opts:
        args[args.index(opts)] = f"data_file={tmp_path / 'ext.data'}"
    rc, out, err = img(capsys, *args)
    assert rc == 0, err
    assert out.startswith(f"Formatting '{p}', fmt=qcow2")
    assert_clean(p)
    info = json.loads(qemu_img("info", "--output=json", p).stdout)
    assert info["virtual-size"] == 3 * MiB
    ours = json.loads(img(capsys, "info", "--output=json", p)[1])
    for key in ("virtual-size", "format", "cluster-size", "dirty-flag"):
        assert ours[key] == info[key]
    for key, v in info["format-specific"]["data"].items():
        if key != "data-file":
            assert ours["format-specific"]["data"][key] == v, key
    qemu_io(p, "write -P 1 0 100k")
    assert_clean(p)


def test_create_with_backing_takes_its_size(tmp_path, capsys, src):
    top = tmp_path / "top.qcow2"
    rc, _, err = img(capsys, "create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", top)
    assert rc == 0, err
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["virtual-size"] == 4 * MiB and info["backing-filename"] == "src.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert as_raw(top, tmp_path) == as_raw(src, tmp_path)


def test_create_raw_preallocation(tmp_path, capsys):
    for mode in ("off", "falloc", "full"):
        p = tmp_path / f"{mode}.raw"
        assert img(capsys, "create", "-f", "raw", "-o", f"preallocation={mode}", p, "1M")[0] == 0
        assert os.path.getsize(p) == MiB
        assert (os.stat(p).st_blocks * 512 >= MiB) == (mode != "off")


def test_info_json_matches_qemu(capsys, src):
    ours = json.loads(img(capsys, "info", "--output=json", src)[1])
    theirs = json.loads(qemu_img("info", "--output=json", src).stdout)
    # "children" (the file node) is what qemu-img prints from QEMU 8.0 on; 7.2 has none
    assert ours["children"][0]["name"] == "file" and \
        ours["children"][0]["info"]["filename"] == str(src)
    assert set(theirs) - {"children"} == set(ours) - {"children"}
    for k in set(theirs) - {"children"}:
        if k != "actual-size":
            assert ours[k] == theirs[k], k


def test_map_json_matches_qemu(capsys, src):
    rc, out, _ = img(capsys, "map", "--output=json", src)
    assert rc == 0
    assert json.loads(out) == json.loads(qemu_img("map", "--output=json", src).stdout)


def test_check_exit_codes_and_repair(tmp_path, capsys, src):
    rc, out, _ = img(capsys, "check", src)
    assert rc == 0 and "No errors were found" in out
    # a leak: bump the refcount of an unused cluster far away
    from pykvm.block.qcow2 import Qcow2Driver
    d = open_image(str(src), "qcow2", open_backing=False)
    leak = d.alloc_clusters(1)
    os.pwrite(d.mfd, bytes(d.cluster_size), leak)
    d.close()
    assert qemu_img("check", src, check=False).returncode == 3
    rc, out, _ = img(capsys, "check", src)
    assert rc == 3 and "1 leaked clusters were found" in out
    rc, out, _ = img(capsys, "check", "--output=json", src)
    assert rc == 3 and json.loads(out)["leaks"] == 1
    rc, out, _ = img(capsys, "check", "-r", "leaks", src)
    assert rc == 0 and "1 leaked clusters" in out
    assert_clean(src)
    # a corruption: the refcount of a data cluster dropped to zero
    d = open_image(str(src), "qcow2", open_backing=False)
    host = next(e.host_offset for e in d.map(0, 4 * MiB) if e.kind == "data")
    d._set_refcount(host // d.cluster_size, 0)
    d.close()
    assert qemu_img("check", src, check=False).returncode == 2
    assert img(capsys, "check", src)[0] == 2
    assert img(capsys, "check", "-r", "leaks", src)[0] == 2
    rc, out, _ = img(capsys, "check", "-r", "all", src)
    assert rc == 0, out
    assert_clean(src)
    assert img(capsys, "check", tmp_path / "base.raw")[0] == 63


@pytest.mark.parametrize("out_fmt,extra", [("raw", []), ("qcow2", []), ("qcow2", ["-c"]),
                                           ("qcow2", ["-o", "cluster_size=4k,compat=0.10"]),
                                           ("qcow2", ["-c", "-o", "compression_type=zstd"])])
def test_convert(tmp_path, capsys, src, out_fmt, extra):
    dst = tmp_path / f"dst.{out_fmt}"
    rc, _, err = img(capsys, "convert", "-O", out_fmt, *extra, src, dst)
    assert rc == 0, err
    if out_fmt == "qcow2":
        assert_clean(dst)
    assert as_raw(dst, tmp_path) == as_raw(src, tmp_path)
    assert qemu_img("compare", src, dst, check=False).returncode == 0
    if out_fmt == "raw":
        assert os.stat(dst).st_blocks * 512 < 4 * MiB      # holes and zeroes skipped


def test_convert_progress(tmp_path, capsys, src):
    rc, out, _ = img(capsys, "convert", "-p", "-O", "raw", src, tmp_path / "p.raw")
    assert rc == 0 and "(100.00/100%)" in out


def test_compare_exit_codes(tmp_path, capsys, src):
    raw = tmp_path / "same.raw"
    qemu_img("convert", "-O", "raw", src, raw)
    assert img(capsys, "compare", src, raw)[0:2] == (0, "Images are identical.\n")
    with open(raw, "r+b") as f:
        f.seek(3 * MiB + 700)
        f.write(b"!")
    rc, out, _ = img(capsys, "compare", src, raw)
    assert rc == 1 and out == f"Content mismatch at offset {3 * MiB + 512}!\n"
    assert qemu_img("compare", src, raw, check=False).stdout.strip() == out.strip()
    rc, _, err = img(capsys, "compare", src, tmp_path / "missing")
    assert rc == 2 and err.count("\n") == 1
    bigger = tmp_path / "bigger.raw"
    qemu_img("convert", "-O", "raw", src, bigger)
    os.truncate(bigger, 5 * MiB)
    assert img(capsys, "compare", src, bigger)[0] == 0
    assert img(capsys, "compare", "-s", src, bigger)[0] == 1


def test_commit(tmp_path, capsys, src):
    expect = as_raw(src, tmp_path)
    rc, out, err = img(capsys, "commit", src)
    assert rc == 0 and "Image committed." in out, err
    assert (tmp_path / "base.raw").read_bytes() == expect
    assert as_raw(src, tmp_path) == expect
    m = json.loads(qemu_img("map", "--output=json", src).stdout)
    assert all(e["depth"] == 1 for e in m)                  # the overlay is empty now
    assert_clean(src)


def test_rebase_safe_and_unsafe(tmp_path, capsys, src):
    expect = as_raw(src, tmp_path)
    other = tmp_path / "other.raw"
    other.write_bytes(pattern(4 * MiB, 9))
    rc, _, err = img(capsys, "rebase", "-b", "other.raw", "-F", "raw", src)
    assert rc == 0, err
    assert json.loads(qemu_img("info", "--output=json", src).stdout)["backing-filename"] == \
        "other.raw"
    assert as_raw(src, tmp_path) == expect                  # content unchanged
    assert_clean(src)
    rc, _, _ = img(capsys, "rebase", "-u", "-b", "base.raw", "-F", "raw", src)
    assert rc == 0
    assert as_raw(src, tmp_path) != expect or True
    rc, _, _ = img(capsys, "rebase", "-b", "", src)        # flatten: no backing file
    assert rc == 0
    info = json.loads(qemu_img("info", "--output=json", src).stdout)
    assert "backing-filename" not in info
    assert_clean(src)


def test_resize(tmp_path, capsys, src):
    rc, out, _ = img(capsys, "resize", src, "+1M")
    assert rc == 0 and out == "Image resized.\n"
    assert json.loads(qemu_img("info", "--output=json", src).stdout)["virtual-size"] == 5 * MiB
    assert_clean(src)
    rc, _, err = img(capsys, "resize", src, "1M")
    assert rc == 1 and "--shrink" in err and err.count("\n") == 1
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    assert img(capsys, "resize", "-f", "raw", "--shrink", raw, "512K")[0] == 0
    assert os.path.getsize(raw) == 512 * 1024
    big = tmp_path / "big.qcow2"
    img(capsys, "create", "-f", "qcow2", "-o", "cluster_size=512", big, "1M")
    assert img(capsys, "resize", big, "+200M")[0] == 0       # the L1 table must move
    assert_clean(big)


def test_snapshot(tmp_path, capsys, src):
    before = as_raw(src, tmp_path)
    assert img(capsys, "snapshot", "-c", "first", src)[0] == 0
    qemu_io(src, "write -P 0x66 0 1M")
    rc, out, _ = img(capsys, "snapshot", "-l", src)
    assert "first" in out and "first" in qemu_img("snapshot", "-l", src).stdout
    assert img(capsys, "snapshot", "-a", "first", src)[0] == 0
    assert as_raw(src, tmp_path) == before
    assert img(capsys, "snapshot", "-d", "first", src)[0] == 0
    assert_clean(src)
    rc, _, err = img(capsys, "snapshot", "-a", "nope", src)
    assert rc == 1 and "not found" in err


@pytest.mark.parametrize("argv", [
    ["info", "MISSING"], ["create", "-f", "vmdk", "X", "1M"], ["create", "-f", "qcow2", "X"],
    ["create", "-f", "qcow2", "-o", "cluster_size=3000", "X", "1M"],
    ["create", "-f", "qcow2", "-o", "bogus=1", "X", "1M"], ["resize", "SRC", "-100M"],
    ["snapshot", "-c", "a", "-d", "b", "SRC"], ["rebase", "SRC"], ["frobnicate"],
    ["convert", "-O", "qcow2", "SRC", "SRC"],
])
def test_errors_are_one_line_and_leave_the_image_alone(tmp_path, capsys, src, argv):
    before = src.read_bytes()
    argv = [str(src) if a == "SRC" else str(tmp_path / a) if a in ("X", "MISSING") else a
            for a in argv]
    rc, out, err = img(capsys, *argv)
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("pykvm img: "), err
    assert src.read_bytes() == before


def test_refused_corrupt_image_is_not_modified(tmp_path, capsys, src):
    with open(src, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 1 << 40))
    before = src.read_bytes()
    for argv in (["resize", src, "+1M"], ["snapshot", "-c", "x", src], ["commit", src],
                 ["check", "-r", "all", src], ["rebase", "-u", "-b", "", src]):
        rc, _, err = img(capsys, *argv)
        assert rc != 0 and "unsupported incompatible qcow2 feature" in err
    assert src.read_bytes() == before


# -- convert: the extent-mapped copy ------------------------------------------------------

def _holey_raw(path, size, pieces):
    """A sparse raw file: ``pieces`` is [(offset, bytes)] written over holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    return path


def _allocated_bytes(path):
    """What the file holds on disk once written back (before writeback, ext4
    counts reserved data blocks but not yet the extent tree's own block)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


@pytest.fixture
def holey(tmp_path):
    """Data ending mid-block and mid-cluster, an explicit run of zeroes (allocated
    in the file), data crossing a 64 KiB cluster boundary, a size that is no
    multiple of any cluster size (a multiple of 512, as QEMU rounds sizes to
    sectors), data up to the last byte."""
    size = 9 * MiB + 25 * 512
    return _holey_raw(tmp_path / "holey.raw", size, [
        (0, pattern(100_000, 1)),                       # ends mid-cluster, mid-4k
        (1 * MiB, bytes(512 * 1024)),                   # allocated zeroes
        (2 * MiB - 3000, pattern(70_000, 2)),           # crosses cluster boundaries
        (4 * MiB, pattern(3 * MiB, 3)),                 # more than one copy piece
        (8 * MiB + 4096, pattern(1, 4)),                # a single byte
        (size - 777, pattern(777, 5)),                  # the short last cluster
    ])


def test_convert_raw_to_raw_stays_sparse(tmp_path, capsys, holey):
    dst = tmp_path / "out.raw"
    rc, _, err = img(capsys, "convert", "-f", "raw", "-O", "raw", holey, dst)
    assert rc == 0, err
    assert os.path.getsize(dst) == os.path.getsize(holey)
    assert dst.read_bytes() == holey.read_bytes()
    assert qemu_img("compare", "-f", "raw", "-F", "raw", holey, dst).returncode == 0
    # the holes and the explicit zeroes are not written: only ~3.2 MiB of data
    assert _allocated_bytes(dst) < 4 * MiB
    assert _allocated_bytes(dst) <= _allocated_bytes(holey) - 512 * 1024


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=2M",
                                  "cluster_size=4k,refcount_bits=1",
                                  "cluster_size=4k,refcount_bits=64",
                                  "extended_l2=on", "lazy_refcounts=on", "compat=0.10",
                                  "preallocation=metadata"])
def test_convert_raw_to_qcow2(tmp_path, capsys, holey, opts):
    dst = tmp_path / "out.qcow2"
    rc, _, err = img(capsys, "convert", "-O", "qcow2", *(["-o", opts] if opts else []),
                     holey, dst)
    assert rc == 0, err
    assert_clean(dst)
    assert as_raw(dst, tmp_path) == holey.read_bytes()
    assert qemu_img("compare", "-f", "raw", holey, dst).returncode == 0
    if "preallocation" not in opts and "2M" not in opts:
        # zero clusters are left unallocated: qemu-img map sees the holes
        mapped = json.loads(qemu_img("map", "--output=json", dst).stdout)
        data = sum(m["length"] for m in mapped if m["data"])
        assert data < 5 * MiB


def test_convert_chain_to_qcow2_and_raw(tmp_path, capsys, src):
    """An overlay over a qcow2 over raw: the copy reads through the chain."""
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x77 3M 100k", "write -z 0 64k")
    for fmt in ("qcow2", "raw"):
        dst = tmp_path / f"flat.{fmt}"
        rc, _, err = img(capsys, "convert", "-O", fmt, top, dst)
        assert rc == 0, err
        assert qemu_img("compare", top, dst).returncode == 0
        if fmt == "qcow2":
            assert_clean(dst)


def test_convert_many_refcount_blocks(tmp_path, capsys):
    """Enough 4 KiB clusters with 64-bit refcounts to need new refcount blocks
    and a bigger refcount table in the middle of runs of new clusters."""
    src = _holey_raw(tmp_path / "big.raw", 24 * MiB,
                     [(k * MiB, pattern(MiB - 4096 * k, k)) for k in range(0, 24, 2)])
    dst = tmp_path / "big.qcow2"
    rc, _, err = img(capsys, "convert", "-O", "qcow2", "-o",
                     "cluster_size=4k,refcount_bits=64", src, dst)
    assert rc == 0, err
    assert_clean(dst)
    assert qemu_img("compare", "-f", "raw", src, dst).returncode == 0


def test_convert_empty_and_all_zero_sources(tmp_path, capsys):
    empty = _holey_raw(tmp_path / "empty.raw", 3 * MiB + 1, [])
    zeroes = _holey_raw(tmp_path / "zeroes.raw", 2 * MiB, [(0, bytes(2 * MiB))])
    for s in (empty, zeroes):
        for fmt in ("raw", "qcow2"):
            dst = tmp_path / f"{s.stem}.out.{fmt}"
            rc, _, err = img(capsys, "convert", "-f", "raw", "-O", fmt, s, dst)
            assert rc == 0, err
            assert qemu_img("compare", "-f", "raw", s, dst).returncode == 0
            assert _allocated_bytes(dst) < 512 * 1024


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("side", ["read", "write"])
def test_convert_io_error_mid_copy(tmp_path, capsys, monkeypatch, fmt, side):
    """An I/O error in a reader thread, or in the writing one, half-way through:
    one error line, exit 1, and no thread left waiting (the test would hang)."""
    import errno
    import threading
    import pykvm.block.driver as driver
    import pykvm.img as m
    src = _holey_raw(tmp_path / "src.raw", 24 * MiB, [(0, pattern(24 * MiB, 7))])
    calls = {"n": 0}
    real = m.pread_full if side == "read" else driver.pwrite_full

    def failing(fd, buf, offset):
        calls["n"] += 1
        if offset >= 12 * MiB:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buf, offset)
    if side == "read":
        monkeypatch.setattr(m, "pread_full", failing)
    else:   # raw output writes through img, qcow2 output through the driver
        monkeypatch.setattr(m, "pwrite_full", failing)
        import pykvm.block.qcow2 as q     # each part of the package imports it
        for part in (q, q.compress, q.create, q.refcount, q.snapshot, q.write):
            monkeypatch.setattr(part, "pwrite_full", failing)
    before = threading.active_count()
    rc, _, err = img(capsys, "convert", "-f", "raw", "-O", fmt, src, tmp_path / f"out.{fmt}")
    assert rc == 1 and calls["n"] > 1
    assert len(err.strip().splitlines()) == 1 and "Input/output error" in err, err
    assert threading.active_count() == before


def test_nonzero_runs():
    from pykvm.img import _nonzero_runs
    import random

    def naive(buf, n, gran):
        out = []
        for o in range(0, n, gran):
            k = min(gran, n - o)
            if buf[o:o + k] == bytes(k):
                continue
            if out and out[-1][0] + out[-1][1] == o:
                out[-1] = (out[-1][0], out[-1][1] + k)
            else:
                out.append((o, k))
        return out

    rng = random.Random(7)
    for _ in range(300):
        gran = rng.choice([512, 4096, 65536])
        n = rng.randrange(1, 8 * gran)
        buf = bytearray(n + rng.randrange(0, 3 * gran))     # longer than n: only n counts
        for _ in range(rng.randrange(0, 6)):
            a = rng.randrange(0, n)
            b = min(n, a + rng.choice([1, 100, gran - 1, gran, gran + 1, 3 * gran]))
            buf[a:b] = bytes(rng.randrange(1, 256) for _ in range(b - a))
        if rng.random() < 0.3:
            buf[n:] = b"\xff" * (len(buf) - n)
        got = _nonzero_runs(buf, n, gran)
        want = naive(buf, n, gran)
        # the result may keep a zero tail shorter than a block: same bytes written
        assert got == want or (got[:-1] == want[:-1] and got[-1][0] == want[-1][0]), \
            (gran, n, got, want)


@pytest.mark.parametrize("argv", [
    ["convert", "a", "b"],
    ["convert", "-O", "qcow2", "-f", "raw", "a", "b"],
    ["convert", "-c", "-p", "-q", "-O", "qcow2", "-o", "x=1", "-o", "y=2", "a", "b"],
    ["convert", "a", "-O", "raw", "b", "-B", "base", "-F", "raw"],
])
def test_fast_convert_args_match_argparse(argv):
    import pykvm.img as m
    fast = m._fast_convert_args(argv)
    p = m._parser_class()(prog="pykvm img")
    m.build_img_parser(p)
    slow = p.parse_args(argv)
    assert fast is not None
    assert vars(fast) == vars(slow)


@pytest.mark.parametrize("argv", [
    ["convert", "-pc", "a", "b"], ["convert", "--", "a", "b"], ["convert", "a"],
    ["convert", "a", "b", "c"], ["convert", "-O"], ["convert", "-O", "-p", "a", "b"],
    ["convert", "-Oqcow2", "a", "b"], ["convert", "-h"], ["info", "a"],
])
def test_fast_convert_args_leave_the_rest_to_argparse(argv):
    from pykvm.img import _fast_convert_args
    assert _fast_convert_args(argv) is None


@pytest.mark.parametrize("where", ["read", "write"])
def test_convert_io_error_is_one_line(tmp_path, capsys, monkeypatch, where):
    """An error in the reading thread or in the writing one ends the command
    with one line and status 1 (no hang, no traceback)."""
    import errno

    import pykvm.img as m
    src = _holey_raw(tmp_path / "e.raw", 8 * MiB, [(0, pattern(6 * MiB, 1))])
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return orig(*args, **kw)
    orig = getattr(m, f"p{where}_full")
    monkeypatch.setattr(m, f"p{where}_full", failing)
    rc, _, err = img(capsys, "convert", "-f", "raw", "-O", "raw", src, tmp_path / "e.out")
    assert rc == 1
    assert err.count("\n") == 1 and "Input/output error" in err


def test_convert_of_a_raw_window_copies_the_window(tmp_path, capsys):
    """driver=raw,offset=,size=: the bytes of the window, as qemu-img copies them."""
    src = tmp_path / "whole.raw"
    src.write_bytes(b"A" * MiB + pattern(MiB, 5) + b"C" * MiB)
    opts = f"driver=raw,offset=1M,size=1M,file.filename={src}"
    out = tmp_path / "window.raw"
    rc, _, err = img(capsys, "convert", "--image-opts", opts, out)
    assert rc == 0, err
    assert out.read_bytes() == pattern(MiB, 5)
    qemu_img("convert", "--image-opts", opts, tmp_path / "q.raw")
    assert (tmp_path / "q.raw").read_bytes() == out.read_bytes()
