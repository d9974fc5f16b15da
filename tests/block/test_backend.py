"""BlockBackend's generic executor on qcow2 (and raw), through its public API.

Every test that submits requests runs on every engine of the matrix
(tests/conftest.py: python, threads, native with cache=none, io_uring), those
that take ``image_format`` on raw, qcow2 and qcow2 over a backing file too."""
import errno
import fcntl
import json
import logging
import os

import pytest

from pykvm.aio import FLUSH, PythonEngine
from pykvm.aio.native import NativeEngine
from pykvm.block import BlockBackend, BlockError, open_image
from pykvm.block.qcow2 import Qcow2Driver
from pykvm.block.raw import RawDriver
from tests.conftest import DIRECT_CACHE_MODES

from .conftest import as_raw, assert_clean, granular, needs_qemu, pattern, qemu_img, qemu_io

MiB = 1 << 20


@pytest.fixture
def qcow(tmp_path):
    p = tmp_path / "disk.qcow2"
    Qcow2Driver.create(str(p), 4 * MiB)
    return p


@pytest.fixture
def chain(tmp_path):
    """base.raw <- mid.qcow2 <- top.qcow2 (relative names), each with its own data."""
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(4 * MiB, 1))
    Qcow2Driver.create(str(tmp_path / "mid.qcow2"), 4 * MiB, backing_file="base.raw",
                       backing_fmt="raw")
    Qcow2Driver.create(str(tmp_path / "top.qcow2"), 4 * MiB, backing_file="mid.qcow2",
                       backing_fmt="qcow2")
    return tmp_path


# -- the matrix: every engine, cache mode and image format ------------------------------------

def test_the_matrix_runs_on_the_engine_it_names(disk_factory, engine, cache_mode, image_format):
    d = disk_factory(image_format.path, fmt=image_format.format)
    assert d.b.engine.name == engine.name and d.b.cache_name == cache_mode == engine.cache
    assert isinstance(d.b.engine, PythonEngine if engine.name == "python" else NativeEngine)
    assert d.b.format == image_format.format
    flags = fcntl.fcntl(d.b.driver.fd, fcntl.F_GETFL)
    assert bool(flags & os.O_DIRECT) == (cache_mode in DIRECT_CACHE_MODES)
    backing = d.b.driver.backing if image_format.format == "qcow2" else None
    assert (backing is not None) == (image_format.kind == "qcow2-backing")
    assert d.read(0, 4096) == image_format.content[:4096]


def test_reads_what_the_image_holds(disk_factory, image_format):
    """The whole disk, in pieces that cross clusters (and, for qcow2-backing,
    the overlay's own cluster and the backing file around it)."""
    d = disk_factory(image_format.path, fmt=image_format.format)
    size = image_format.size
    assert d.read(0, size, pieces=7) == image_format.content
    for off, n in ((0, 512), (MiB - 4096, 8192), (MiB + 65536 - 512, 1024), (size - 512, 512)):
        assert d.read(off, n, pieces=2) == image_format.content[off:off + n], hex(off)


@needs_qemu
def test_requests_of_every_kind(disk_factory, image_format, tmp_path):
    """Writes (in place, allocating, copy-on-write from the backing file),
    write-zeroes with and without unmap, discard, flush: the disk reads as a
    byte array says after each, and qemu-img reads the same image at the end."""
    d = disk_factory(image_format.path, fmt=image_format.format)
    model = bytearray(image_format.content)
    cluster = 65536

    def check():
        assert d.read(0, len(model), pieces=3) == model

    for off, n, seed in ((0, 4096, 1), (MiB + 8192, 4096, 2), (3 * MiB - 1536, 8192, 3),
                         (5 * 512, 70 * 512, 4)):
        assert d.write(off, pattern(n, seed), pieces=3) == n
        model[off:off + n] = pattern(n, seed)
        check()
    assert d.write_zeroes(2 * cluster + 1024, cluster + 4096) == 0
    model[2 * cluster + 1024:3 * cluster + 5120] = bytes(cluster + 4096)
    check()
    assert d.write_zeroes(MiB, 2 * cluster, unmap=True) == 0
    model[MiB:MiB + 2 * cluster] = bytes(2 * cluster)
    check()
    assert d.discard(2 * MiB, 4 * cluster) == 0     # whole clusters: they read as zeroes
    model[2 * MiB:2 * MiB + 4 * cluster] = bytes(4 * cluster)
    check()
    assert d.flush() == 0
    d.close()
    if image_format.format == "qcow2":
        assert_clean(image_format.path)
    assert as_raw(image_format.path, tmp_path, image_format.format) == model


def test_many_requests_in_flight(disk_factory, image_format):
    """32 reads and 32 writes at once, to distinct sectors across the disk."""
    d = disk_factory(image_format.path, fmt=image_format.format)
    model = bytearray(image_format.content)
    views, tokens = {}, []
    for i in range(64):
        off = (i * 37 % 64) * 65536 + (i % 4) * 4096
        d.token += 1
        tokens.append(d.token)
        if i % 2:
            v = memoryview(bytearray(4096))
            views[d.token] = (off, v)
            d.b.readv(d.token, off, [v])
        else:
            data = pattern(4096, i)
            model[off:off + 4096] = data
            d.b.writev(d.token, off, [memoryview(bytearray(data))])
    res = d.wait(tokens)
    assert all(r == 4096 for r in res.values()), res
    for off, v in views.values():
        # a read in flight with the writes saw sectors no write touched
        assert bytes(v) == image_format.content[off:off + 4096]
    assert d.read(0, len(model)) == model
    assert d.b.in_flight == 0


@pytest.mark.matrix(cache_mode=DIRECT_CACHE_MODES)
def test_unaligned_buffer_read_across_extents(disk_factory, engine, cache_mode, image_format):
    """O_DIRECT and a guest buffer that is not aligned: the read goes through
    a bounce buffer, split along the map (data, unallocated, backing); the
    bounce buffer is given back while the last piece's slice is still
    referenced (it used to raise BufferError from reap())."""
    d = disk_factory(image_format.path, fmt=image_format.format)
    assert d.write(0, pattern(4096, 9)) == 4096
    expect = bytearray(image_format.content)
    expect[:4096] = pattern(4096, 9)
    for off in (1536, MiB - 1024):
        raw = bytearray(200192 + 7)
        view = memoryview(raw)[7:]
        t = d._tok()
        d.b.readv(t, off, [view])
        assert d.wait([t])[t] == 200192
        assert bytes(view) == expect[off:off + 200192], hex(off)


@pytest.mark.matrix(cache_mode=DIRECT_CACHE_MODES, image_format=("raw",))
def test_unaligned_write_is_bounced_without_a_joined_copy(disk_factory, engine, cache_mode,
                                                          image_format):
    """An O_DIRECT write from unaligned guest buffers is copied into its bounce
    buffer piece by piece: no Python copy of the request's data (it was joined
    into one bytes object first, twice the request's size)."""
    import tracemalloc
    d = disk_factory(image_format.path, fmt=image_format.format)
    n = 4 * MiB
    raw = bytearray(n + 7)
    raw[7:] = pattern(n, 5)
    view = memoryview(raw)[7:]
    pieces = [view[:MiB], view[MiB:]]
    tracemalloc.start()
    t = d._tok()
    d.b.writev(t, 0, pieces)
    assert d.wait([t])[t] == n
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < MiB, peak
    assert d.read(0, n) == pattern(n, 5)


@pytest.mark.matrix(cache_mode=DIRECT_CACHE_MODES)
def test_bounce_buffers_in_flight_are_bounded(disk_factory, engine, cache_mode, image_format,
                                              monkeypatch):
    """Unaligned O_DIRECT requests whose bounce buffers would pass MAX_BOUNCE_BYTES
    wait for those in flight (here the bound is one 64 KiB request), then run;
    every one completes with its data."""
    from pykvm.block import backend as backend_mod
    monkeypatch.setattr(backend_mod, "MAX_BOUNCE_BYTES", 65536)
    live, most = [0], [0]
    real = backend_mod._Bounce

    class Counted(real):
        def __init__(self, size, align):
            super().__init__(size, align)
            live[0] += 1
            most[0] = max(most[0], live[0])

        def close(self):
            live[0] -= 1
            super().close()

    monkeypatch.setattr(backend_mod, "_Bounce", Counted)
    d = disk_factory(image_format.path, fmt=image_format.format)
    writes = {}
    for i in range(4):
        raw = bytearray(65536 + 7)
        raw[7:] = pattern(65536, 20 + i)
        t = d._tok()
        d.b.writev(t, i * 65536, [memoryview(raw)[7:]])
        writes[t] = raw
    assert set(d.wait(list(writes)).values()) == {65536}
    reads = {}
    for i in range(4):
        raw = bytearray(65536 + 7)
        t = d._tok()
        d.b.readv(t, i * 65536, [memoryview(raw)[7:]])
        reads[t] = (i, raw)
    assert set(d.wait(list(reads)).values()) == {65536}
    for i, raw in reads.values():
        assert bytes(raw[7:]) == pattern(65536, 20 + i)
    assert most[0] == 1 and live[0] == 0 and d.b._bounced == 0


@needs_qemu
@pytest.mark.matrix(cache_mode=DIRECT_CACHE_MODES, image_format=("qcow2", "qcow2-backing"))
def test_o_direct_write_zeroes_of_part_of_a_sector_is_refused_first(
        disk_factory, engine, cache_mode, image_format, tmp_path):
    """Zeroes a mapped format writes as data go through O_DIRECT: a range that
    is not in whole sectors is refused before the driver changes anything
    (it used to allocate clusters, fail with EINVAL and leak them)."""
    d = disk_factory(image_format.path, fmt=image_format.format)
    assert d.write_zeroes(300000, 40000) == -errno.EINVAL
    assert d.write_zeroes(300032, 39936) == 0            # whole sectors: done
    d.close()
    assert_clean(image_format.path)
    expect = bytearray(image_format.content)
    expect[300032:340000 - 32] = bytes(39936)
    assert as_raw(image_format.path, tmp_path, "qcow2") == expect


@needs_qemu
def test_write_read_qcow2(disk_factory, qcow, tmp_path):
    d = disk_factory(qcow)
    assert d.b.format == "qcow2" and d.b.size == 4 * MiB
    assert d.read(0, 65536) == bytes(65536)
    data = pattern(granular(d, 200000) + 512 * d.b.cache.direct, 3)
    assert d.write(1536, data, pieces=5) >= 0
    assert d.read(1536, len(data), pieces=7) == data
    assert d.read(0, 1536) == bytes(1536)
    d.close()
    expect = bytearray(4 * MiB)
    expect[1536:1536 + len(data)] = data
    assert_clean(qcow)
    assert as_raw(qcow, tmp_path) == expect


@needs_qemu
def test_reads_follow_the_backing_chain_and_cow(disk_factory, chain, tmp_path):
    mid = disk_factory(chain / "mid.qcow2")
    mid.write(MiB + 512, b"M" * 1024)           # partial cluster: COW from base.raw
    mid.close()
    d = disk_factory(chain / "top.qcow2")
    expect = bytearray(pattern(4 * MiB, 1))
    expect[MiB + 512:MiB + 1536] = b"M" * 1024
    assert d.read(0, 4 * MiB, pieces=3) == expect
    t, n = granular(d, MiB + 1000), 100 if not d.b.cache.direct else 512
    assert d.write(t, b"T" * n) == n            # COW from mid (which COWs from base)
    expect[t:t + n] = b"T" * n
    assert d.read(MiB, 65536) == expect[MiB:MiB + 65536]
    assert not d.b.driver.read_only
    assert d.b.driver.backing.read_only and d.b.driver.backing.backing.read_only
    d.close()
    for name in ("mid.qcow2", "top.qcow2"):
        assert_clean(chain / name)
    assert as_raw(chain / "top.qcow2", tmp_path) == expect
    # the copy-on-write from top left the backing files as they were
    below = bytearray(pattern(4 * MiB, 1))
    below[MiB + 512:MiB + 1536] = b"M" * 1024
    assert as_raw(chain / "mid.qcow2", tmp_path) == below
    assert (chain / "base.raw").read_bytes() == pattern(4 * MiB, 1)


def test_backing_smaller_than_overlay_reads_zeroes(disk_factory, tmp_path):
    (tmp_path / "small.raw").write_bytes(b"\xaa" * 100000)
    Qcow2Driver.create(str(tmp_path / "t.qcow2"), MiB, backing_file="small.raw", backing_fmt="raw")
    d = disk_factory(tmp_path / "t.qcow2")
    n = granular(d, 200000)
    assert d.read(0, n) == b"\xaa" * 100000 + bytes(n - 100000)
    d.write(98304, b"x" * 512)                  # COW of a cluster straddling the backing's end
    assert d.read(65536, 65536) == b"\xaa" * (98304 - 65536) + b"x" * 512 + \
        b"\xaa" * (100000 - 98816) + bytes(131072 - 100000)


@needs_qemu
def test_many_writes_in_flight_to_one_cluster(disk_factory, qcow):
    """Sixteen 4 KiB writes into one unallocated cluster at once: the first
    allocates, the others wait for its commit; all land."""
    d = disk_factory(qcow)
    bufs, tokens = [], []
    for i in range(16):
        buf = memoryview(bytearray(bytes([i + 1]) * 4096))
        bufs.append(buf)
        d.token += 1
        tokens.append(d.token)
        d.b.writev(d.token, i * 4096, [buf])
    res = d.wait(tokens)
    assert all(r >= 0 for r in res.values())
    assert d.read(0, 65536) == b"".join(bytes([i + 1]) * 4096 for i in range(16))
    assert d.b.in_flight == 0
    d.close()
    assert_clean(qcow)


def test_many_reads_in_flight(disk_factory, qcow):
    d = disk_factory(qcow)
    d.write(0, pattern(MiB, 9))
    views, tokens = [], []
    for i in range(64):
        v = memoryview(bytearray(4096))
        views.append(v)
        d.token += 1
        tokens.append(d.token)
        d.b.readv(d.token, (i * 37 % 256) * 4096, [v])
    assert all(r == 4096 for r in d.wait(tokens).values())
    for i, v in enumerate(views):
        off = (i * 37 % 256) * 4096
        assert bytes(v) == pattern(MiB, 9)[off:off + 4096]


def engine_flushes(backend) -> list:
    """The fds of every FLUSH the backend hands its engine from now on (any
    engine: the C ones call fdatasync in C, where no Python patch sees it)."""
    calls = []
    submit = backend.engine.submit

    def spy(requests):
        calls.extend(r.fd for r in requests if r.op == FLUSH)
        return submit(requests)
    backend.engine.submit = spy
    return calls


# cache mode: (O_DIRECT, a flush after each write)
CACHE_EXPECT = {"writeback": (False, False), "writethrough": (False, True), "none": (True, False),
                "directsync": (True, True), "unsafe": (False, False)}


def test_cache_modes(disk_factory, engine, cache_mode, image_format):
    direct, flush_per_write = CACHE_EXPECT[cache_mode]
    d = disk_factory(image_format.path, fmt=image_format.format)
    assert d.b.cache_name == cache_mode
    flags = fcntl.fcntl(d.b.driver.fd, fcntl.F_GETFL)
    assert bool(flags & os.O_DIRECT) == direct
    calls = engine_flushes(d.b)
    assert d.write(65536, pattern(8192)) >= 0
    assert bool(calls) == flush_per_write
    calls.clear()
    assert d.write_zeroes(0, 65536) >= 0
    assert bool(calls) == flush_per_write
    calls.clear()
    assert d.flush() == 0
    assert bool(calls) == (cache_mode != "unsafe")
    assert d.read(65536, 8192) == pattern(8192)
    # an unaligned buffer under O_DIRECT goes through a bounce buffer
    raw = bytearray(8192 + 7)
    view = memoryview(raw)[7:7 + 8192]
    t = d._tok()
    d.b.readv(t, 65536, [view])
    assert d.wait([t])[t] >= 0 and bytes(view) == pattern(8192)


def test_o_direct_refused_is_one_clear_line(tmp_path, monkeypatch):
    p = tmp_path / "d.raw"
    p.write_bytes(bytes(MiB))
    real = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a)
    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(BlockError, match="cache=writeback or cache=writethrough"):
        BlockBackend(str(p), cache="none")


def test_guest_toggles_write_cache_on_qcow2(disk_factory, qcow):
    d = disk_factory(qcow)
    calls = engine_flushes(d.b)
    assert d.write(0, b"a" * 512) == 512
    assert calls == []
    d.b.write_cache = False
    assert d.write(0, b"b" * 512) == 512
    assert calls == [d.b.driver.fd]


@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_discard_frees_space(disk_factory, tmp_path, fmt):
    p = tmp_path / f"d.{fmt}"
    (RawDriver if fmt == "raw" else Qcow2Driver).create(str(p), 8 * MiB)
    d = disk_factory(p, fmt=fmt)
    d.write(0, pattern(8 * MiB, 4))
    before = os.stat(p).st_blocks
    assert d.discard(MiB, 4 * MiB) == 0
    assert os.stat(p).st_blocks <= before - (4 * MiB // 512) + 256
    assert d.read(MiB, 4 * MiB) == bytes(4 * MiB)
    assert d.read(0, MiB) == pattern(8 * MiB, 4)[:MiB]
    d.close()
    if fmt == "qcow2":
        assert_clean(p)
    # qemu-img sees the discarded range unallocated and the file's space given back
    assert _mapped(p) == [(0, MiB), (5 * MiB, 3 * MiB)]
    info = json.loads(qemu_img("info", "-f", fmt, "--output=json", p).stdout)
    assert info["actual-size"] <= 4 * MiB + 8 * 65536      # the 4 MiB left, and metadata
    expect = bytearray(pattern(8 * MiB, 4))
    expect[MiB:5 * MiB] = bytes(4 * MiB)
    assert as_raw(p, tmp_path, fmt) == expect


def test_discard_ignore_keeps_data(disk_factory, qcow):
    d = disk_factory(qcow, discard="ignore")
    d.write(0, b"x" * 65536)
    assert d.discard(0, 65536) == 0
    assert d.read(0, 65536) == b"x" * 65536


@needs_qemu
@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_qcow2(disk_factory, chain, unmap, tmp_path):
    d = disk_factory(chain / "top.qcow2")
    d.write(0, b"w" * (4 * 65536))
    size_before = os.stat(chain / "top.qcow2").st_blocks
    # partial head and tail, two whole clusters in between (whole sectors with O_DIRECT)
    head = 1024 if d.b.cache.direct else 1000
    assert d.write_zeroes(head, 3 * 65536, unmap) >= 0
    expect = bytearray(b"w" * (4 * 65536))
    expect[head:head + 3 * 65536] = bytes(3 * 65536)
    assert d.read(0, 4 * 65536) == expect
    # over unallocated clusters of a backed image: zeroes, not the backing's data
    assert d.write_zeroes(2 * MiB, 2 * 65536, unmap) >= 0
    assert d.read(2 * MiB, 2 * 65536) == bytes(2 * 65536)
    d.close()
    if unmap:
        assert os.stat(chain / "top.qcow2").st_blocks < size_before
    assert_clean(chain / "top.qcow2")
    exp = bytearray(pattern(4 * MiB, 1))
    exp[:4 * 65536] = expect
    exp[2 * MiB:2 * MiB + 2 * 65536] = bytes(2 * 65536)
    assert as_raw(chain / "top.qcow2", tmp_path) == exp


@pytest.mark.parametrize("mode", ["off", "on", "unmap"])
def test_detect_zeroes(disk_factory, qcow, mode):
    d = disk_factory(qcow, detect_zeroes=mode)
    d.write(0, b"q" * (2 * 65536))
    d.write(0, bytes(2 * 65536))
    assert d.read(0, 2 * 65536) == bytes(2 * 65536)
    assert d.b.stats["detected_zeroes"] == (0 if mode == "off" else 1)
    l2, idx = d.b.driver._l2_for(0)
    e = l2[idx]
    if mode == "off":
        assert e & 1 == 0 and e & 0x00FFFFFFFFFFFE00      # data cluster written with zeroes
    elif mode == "on":
        assert e & 1 and e & 0x00FFFFFFFFFFFE00           # zero flag, allocation kept
    else:
        assert e == 0                                     # unmapped


def test_detect_zeroes_bad_mode(qcow):
    with pytest.raises(BlockError, match="detect-zeroes"):
        BlockBackend(str(qcow), detect_zeroes="maybe")


def test_probed_raw_refuses_a_qcow2_header_in_sector_0(tmp_path, disk_factory, caplog):
    p = tmp_path / "d.img"
    p.write_bytes(bytes(MiB))
    hdr = bytearray(512)
    hdr[:4] = b"QFI\xfb"
    d = disk_factory(p)                        # format probed: raw
    with caplog.at_level(logging.WARNING, logger="pykvm"):
        assert d.write(0, bytes(hdr)) == -errno.EPERM
    assert "probed raw" in caplog.text
    assert p.read_bytes()[:4] == bytes(4)
    assert d.write(512, bytes(hdr)) >= 0       # elsewhere is fine
    assert d.write(0, b"\x01" * 512) >= 0      # and so is any other sector-0 content
    d.close()                                  # (two writers of one image lock each other out)
    d2 = disk_factory(p, fmt="raw")            # format given: no restriction
    assert d2.write(0, bytes(hdr)) >= 0


def test_read_only_backend_refuses_writes(disk_factory, qcow):
    d = disk_factory(qcow, read_only=True)
    assert d.write(0, b"x" * 512) == -errno.EROFS
    assert d.discard(0, 65536) == -errno.EROFS
    assert d.read(0, 512) == bytes(512)


def test_read_past_end_of_short_data_cluster(disk_factory, tmp_path):
    """A data cluster the file does not fully hold reads zeroes past the end."""
    p = tmp_path / "d.qcow2"
    Qcow2Driver.create(str(p), MiB)
    d = disk_factory(p)
    d.write(0, b"z" * 65536)
    host = d.b.driver.map(0, 1)[0].host_offset
    d.close()
    assert host + 65536 == os.path.getsize(p)
    os.truncate(p, host + 4096)
    d = disk_factory(p, read_only=True)
    assert d.read(0, 65536) == b"z" * 4096 + bytes(65536 - 4096)


@needs_qemu
def test_writes_to_qemu_made_image_with_subclusters(disk_factory, tmp_path):
    p = tmp_path / "x.qcow2"
    base = tmp_path / "b.raw"
    base.write_bytes(pattern(2 * MiB, 5))
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
             "-b", base.name, "-F", "raw", p)
    qemu_io(p, "write -P 0x11 4k 2k", "write -z 64k 8k")
    d = disk_factory(p)
    s = lambda n: granular(d, n)      # noqa: E731  (whole sectors with O_DIRECT)
    a, b, c, z = s(3000), s(70000), s(200000), s(300000)
    na, nb, nc, nz = s(3000), s(100) or 512, s(5000), s(40000)
    assert d.write(a, b"A" * na) == na        # partial subclusters, with backing under them
    assert d.write(b, b"B" * nb) == nb        # inside a zero subcluster
    assert d.write(c, b"C" * nc) == nc        # a new cluster: only touched subclusters allocated
    assert d.write_zeroes(z, nz) == 0         # some whole subclusters
    got = d.read(0, 2 * MiB)
    d.close()
    assert_clean(p)
    assert as_raw(p, tmp_path) == got
    exp = bytearray(pattern(2 * MiB, 5))
    exp[4096:6144] = b"\x11" * 2048
    exp[65536:65536 + 8192] = bytes(8192)
    exp[a:a + na] = b"A" * na
    exp[b:b + nb] = b"B" * nb
    exp[c:c + nc] = b"C" * nc
    exp[z:z + nz] = bytes(nz)
    assert got == exp


@pytest.mark.matrix(cache_mode=DIRECT_CACHE_MODES)
def test_o_direct_copy_on_write_and_partial_zeroing(tmp_path, engine, cache_mode, qemu_tools):
    """With O_DIRECT the guest's I/O is aligned, but the driver's own copies
    (copy-on-write from the backing file, zero padding) are not: they must not
    go through the O_DIRECT descriptor (they used to fail with EINVAL)."""
    import mmap
    import select
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(1 << 20))
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay)
    b = engine.backend(overlay, fmt="qcow2")
    assert b.cache_name == cache_mode
    poller = select.poll()
    poller.register(b.notifier, select.POLLIN)

    def wait():
        out = []
        while not out:
            poller.poll(1000)
            out = b.reap()
        return out

    buf = mmap.mmap(-1, 65536)
    buf[:4096] = b"\xab" * 4096
    b.writev(1, 3 * 4096, [memoryview(buf)[:4096]])
    assert wait() == [(1, 4096)]
    b.write_zeroes(2, 65536 + 512, 1024, False)
    assert wait() == [(2, 0)]
    b.readv(3, 0, [memoryview(buf)])
    assert wait() == [(3, 65536)]
    orig = base.read_bytes()
    assert bytes(buf) == orig[:3 * 4096] + b"\xab" * 4096 + orig[4 * 4096:65536]
    b.close()
    assert_clean(overlay)
    raw = as_raw(overlay, tmp_path)
    assert raw[65536 + 512:65536 + 1536] == bytes(1024)
    assert raw[65536:65536 + 512] == orig[65536:65536 + 512]


@needs_qemu
def test_file_grows_in_steps_and_is_cut_back_at_close(tmp_path, monkeypatch):
    """New clusters past the end of the file make it grow by GROW_STEP at once
    (fallocate), so data writes land inside it; close() cuts the unused rest
    off. An image left open at a crash, rest and all, passes qemu-img check."""
    monkeypatch.setattr(Qcow2Driver, "GROW_STEP", 4 * MiB)
    p = tmp_path / "grow.qcow2"
    Qcow2Driver.create(str(p), 32 * MiB)
    created = os.path.getsize(p)
    d = open_image(str(p), "qcow2", read_only=False)
    data = pattern(3 * MiB, 9)
    from pykvm.block.driver import write_range
    write_range(d, 0, memoryview(data))
    grown = os.path.getsize(p)
    assert grown % (4 * MiB) == 0 and grown >= created + 3 * MiB
    assert os.stat(p).st_blocks * 512 >= 3 * MiB     # allocated, not a sparse tail
    crashed = tmp_path / "crashed.qcow2"             # the file as a crash would leave it
    d.flush_metadata()
    crashed.write_bytes(p.read_bytes())
    assert os.path.getsize(crashed) == grown
    d.close()
    assert os.path.getsize(p) < grown and os.path.getsize(p) >= created + 3 * MiB
    for image in (p, crashed):
        assert_clean(image)
        assert as_raw(image, tmp_path)[:3 * MiB] == data


def _mapped(path):
    """qemu-img map's data ranges as (start, length), neighbours merged."""
    out: list = []
    for e in json.loads(qemu_img("map", "--output=json", path).stdout):
        if not e["data"] or e["depth"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


@needs_qemu
def test_a_sequential_fill_is_mapped_ahead(tmp_path):
    """The second allocating write in a row maps the next 4 MiB to fresh
    clusters that read as zeroes; each further one doubles that; writes there
    allocate nothing; anything else starts over."""
    from pykvm.block.driver import read_into, write_range
    p = tmp_path / "fill.qcow2"
    Qcow2Driver.create(str(p), 64 * MiB)
    d = open_image(str(p), "qcow2", read_only=False)
    one, two = pattern(MiB, 1), pattern(MiB, 2)
    write_range(d, 0, one)
    used = d.eof
    write_range(d, MiB, two)                           # sequential: 4 MiB ahead
    assert d.eof - used == (1 + 4) * MiB
    used = d.eof
    write_range(d, 2 * MiB, pattern(4 * MiB, 3))       # into the mapped clusters
    assert d.eof == used
    write_range(d, 6 * MiB, pattern(MiB, 4))           # goes on: 8 MiB ahead
    assert d.eof - used == (1 + 8) * MiB
    write_range(d, 40 * MiB, pattern(MiB, 5))          # elsewhere: nothing ahead
    assert d.eof - used == (1 + 8 + 1) * MiB
    buf = bytearray(8 * MiB)
    read_into(d, 7 * MiB, memoryview(buf))
    assert bytes(buf) == bytes(8 * MiB)                # mapped ahead, reads as zeroes
    d.close()
    assert_clean(p)
    assert _mapped(p) == [(0, 15 * MiB), (40 * MiB, MiB)]
    raw = as_raw(p, tmp_path)
    assert raw[:2 * MiB] == one + two and raw[7 * MiB:15 * MiB] == bytes(8 * MiB)


@needs_qemu
def test_nothing_is_mapped_ahead_over_a_backing_file(tmp_path):
    from pykvm.block.driver import write_range
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(16 * MiB, 7))
    top = tmp_path / "top.qcow2"
    Qcow2Driver.create(str(top), 16 * MiB, backing_file="base.raw", backing_fmt="raw")
    for backing in (True, False):  # opened without its backing file (as img commit does)
        d = open_image(str(top), "qcow2", read_only=False, open_backing=backing)
        k = 0 if backing else 4
        for i in range(k, k + 3):
            write_range(d, i * MiB, pattern(MiB, 10 + i))
        d.close()
    assert _mapped(top) == [(0, 3 * MiB), (4 * MiB, 3 * MiB)]
    raw = as_raw(top, tmp_path)
    assert raw[3 * MiB:4 * MiB] == pattern(16 * MiB, 7)[3 * MiB:4 * MiB]
    assert raw[7 * MiB:] == pattern(16 * MiB, 7)[7 * MiB:]


@needs_qemu
def test_reused_clusters_are_not_mapped_ahead(tmp_path):
    """Clusters freed inside the file hold old data: a fill that gets them
    maps nothing ahead (what it maps must read as zeroes)."""
    from pykvm.block.driver import read_into, write_range
    p = tmp_path / "reuse.qcow2"
    Qcow2Driver.create(str(p), 32 * MiB)
    d = open_image(str(p), "qcow2", read_only=False)
    write_range(d, 16 * MiB, pattern(8 * MiB, 1))
    d.discard(16 * MiB, 8 * MiB, punch=False)          # freed, old data still in the file
    end = d.eof
    write_range(d, 0, pattern(MiB, 2))
    write_range(d, MiB, pattern(MiB, 3))
    assert d.eof == end                                # the freed clusters were used
    buf = bytearray(6 * MiB)
    read_into(d, 2 * MiB, memoryview(buf))
    assert bytes(buf) == bytes(6 * MiB)
    d.close()
    assert_clean(p)
    assert _mapped(p) == [(0, 2 * MiB)]


def test_discard_while_plugged_after_an_allocating_write(tmp_path):
    """A qcow2 discard waits for the writes in flight; an allocating write's
    second step (its L2 update, submitted from a completion while it waits)
    goes to the engine too, not to the plugged batch nobody submits (it hung:
    an NBD client's write then trim in one socket read)."""
    import select
    import threading
    qcow = tmp_path / "small-clusters.qcow2"
    Qcow2Driver.create(str(qcow), 4 * MiB, cluster_size=4096)
    b = BlockBackend(str(qcow), fmt="qcow2")
    try:
        done = threading.Event()

        def requests():
            b.plug()
            try:
                b.writev(1, 4096, [bytearray(b"w" * 512)])     # part of a new cluster
                b.writev(2, 7680, [bytearray(b"x" * 1024)])    # parts of two
                b.discard(3, 65536, 65536)
            finally:
                b.unplug()
            done.set()
        t = threading.Thread(target=requests, daemon=True)
        t.start()
        assert done.wait(10), "discard waited for a write that was never submitted"
        got, poller = {}, select.poll()
        poller.register(b.notifier, select.POLLIN)
        while len(got) < 3:
            assert poller.poll(10000), f"completions missing: {got}"
            got.update(b.reap())
        assert got == {1: 512, 2: 1024, 3: 0}
        out = bytearray(12288)
        b.readv(4, 0, [out])
        while not (r := b.reap()):
            poller.poll(1000)
        assert r == [(4, 12288)]
        assert out == bytes(4096) + b"w" * 512 + bytes(3072) + b"x" * 1024 + bytes(3584)
    finally:
        b.close()
