"""The live write log of a blklogwrites disk (native/writelog.c) as the
device writes it, on the Python path and on each C engine (the C I/O thread
logs what it serves): the same requests give the same log, entry for entry
and byte for byte; a write that completes while a flush is in flight is
logged after that flush's entry; and the C path really served them."""
import os
import subprocess
import time

import pytest

from pykvm.block import open_image
from pykvm.block import writelog as W
from pykvm.block.driver import write_range
from pykvm.block.qcow2 import Qcow2Driver
from pykvm.virtio import blk as B
from tests.conftest import C_ENGINES, Engine
from tests.helpers.virtio_driver import T_DISCARD, T_FLUSH, T_WRITE_ZEROES
from tests.unit.test_fastpath_blk import aligned_write
from tests.unit.test_virtio_blk import Rig, pattern

pytestmark = pytest.mark.matrix(engine=C_ENGINES)


def logged_rig(tmp_path, image, engine, rules=None, **kw):
    """A Rig on ``image`` under a blklogwrites node (log: tmp_path/NAME.log),
    with a blkdebug node holding ``rules`` when given."""
    file = str(image)
    if rules is not None:
        conf = tmp_path / f"{engine.name}.conf"
        conf.write_text(rules)
        file = f"blkdebug:{conf}:{image}"
    log = tmp_path / f"{engine.name}.log"
    spec = {"driver": "blklogwrites", "file": {"driver": "raw", "file": file}, "log": str(log)}
    return Rig(spec, "mmio", engine, **kw), log


def log_entries(log) -> list:
    """(flags, sector, nr_sectors, mark, data) for each entry."""
    fd, reader = W.open_log(str(log))
    try:
        return [(e.flag_names(), e.sector, e.nr_sectors, e.mark,
                 os.pread(fd, e.nr_sectors * reader.sector_size, e.data_pos)
                 if not e.flags & (W.MARK | W.DISCARD) else b"") for e in reader]
    finally:
        os.close(fd)


def sequence(d):
    """Writes, a flush, write-zeroes, a discard, another flush, a write never
    flushed: one at a time, so that both paths see the same order."""
    assert aligned_write(d, 8, pattern(4096, 1)) == B.S_OK
    assert aligned_write(d, 64, pattern(8192, 2)) == B.S_OK
    assert d.flush() == B.S_OK
    assert aligned_write(d, 8, pattern(4096, 3)) == B.S_OK
    assert d.ranged(T_WRITE_ZEROES, 128, 16) == B.S_OK
    assert d.ranged(T_DISCARD, 256, 8) == B.S_OK
    assert d.flush() == B.S_OK
    assert aligned_write(d, 512, pattern(4096, 4)) == B.S_OK
    assert aligned_write(d, 2048, pattern(3 << 19, 10)) == B.S_OK    # past the 1 MiB buffer
    assert d.ranged(T_WRITE_ZEROES, 5120, 3072) == B.S_OK           # 1.5 MiB: two entries


def run(tmp_path, image, engine, body, rules=None, **kw) -> tuple[list, dict]:
    image.write_bytes(bytes(image.stat().st_size))
    r, log = logged_rig(tmp_path, image, engine, rules, **kw)
    try:
        body(r.drv)
        counters = r.dev.counters()
        assert (r.dev._fast is not None) == engine.c_path
    finally:
        r.close()
    return log_entries(log), counters


def test_the_c_path_logs_what_the_python_path_logs(tmp_path, image, engine):
    want, _ = run(tmp_path, image, Engine("python", engine.cache), sequence)
    got, c = run(tmp_path, image, engine, sequence)
    assert [e[:4] for e in want] == [
        ("WRITE", 8, 8, None), ("WRITE", 64, 16, None), ("FLUSH", 0, 0, None),
        ("MARK", 0, 0, "flush-1"), ("WRITE", 8, 8, None), ("WRITE", 128, 16, None),
        ("DISCARD", 256, 8, None), ("FLUSH", 0, 0, None), ("MARK", 0, 0, "flush-2"),
        ("WRITE", 512, 8, None), ("WRITE", 2048, 3072, None), ("WRITE", 5120, 2048, None),
        ("WRITE", 7168, 1024, None), ("MARK", 0, 0, W.END_MARK)]
    assert got == want
    assert got[-4][4] == pattern(3 << 19, 10) and got[-3][4] == bytes(1 << 20)
    assert c["punts"] == 3              # write-zeroes and discard (Python's on every disk)
    assert c["flushes"] == 2 and c["bytes_written"] == 4096 * 3 + 8192 + (3 << 19)


def held_flush(d):
    """A flush whose completion is held until one more request completed
    (release-after = 1): the write submitted after it completes while the
    flush is still in flight."""
    assert aligned_write(d, 8, pattern(4096, 5)) == B.S_OK
    flush = d.submit([d.header(T_FLUSH), d.vq.arena.writable(1)])
    time.sleep(0.2)                     # its completion reaped (and held) first
    assert d.vq.reap() == []
    buf = (d.vq.arena.alloc(4096, pattern(4096, 6), align=4096), 4096, False)
    write = d.submit([d.header(B.T_OUT, 16), buf, d.vq.arena.writable(1)])
    got = [h for h, _ in d.wait_used(2)]
    assert got == [write, flush]        # the write went back first
    assert d.flush() == B.S_OK


HOLD_FLUSH = "[fault]\nop = flush\naction = hold\nrelease-after = 1\nonce = on\n"


def test_a_write_completed_during_a_flush_is_logged_after_it(tmp_path, image, engine):
    want, _ = run(tmp_path, image, Engine("python", engine.cache), held_flush, HOLD_FLUSH)
    got, c = run(tmp_path, image, engine, held_flush, HOLD_FLUSH)
    assert [e[:4] for e in got] == [
        ("WRITE", 8, 8, None), ("FLUSH", 0, 0, None), ("MARK", 0, 0, "flush-1"),
        ("WRITE", 16, 8, None),         # completed while flush 1 was in flight
        ("FLUSH", 0, 0, None), ("MARK", 0, 0, "flush-2"), ("MARK", 0, 0, W.END_MARK)]
    assert got[3][4] == pattern(4096, 6)
    assert got == want
    assert c["punts"] == 0 and c["injected"] == 1


def test_writethrough_writes_are_fua_on_both_paths(tmp_path, image, engine):
    def body(d):
        d.t.write_config(32, 1, 0)      # the guest turns the write cache off
        assert aligned_write(d, 8, pattern(4096, 7)) == B.S_OK
    want, _ = run(tmp_path, image, Engine("python", engine.cache), body)
    got, c = run(tmp_path, image, engine, body)
    assert [e[:4] for e in got] == [("FUA", 8, 8, None), ("MARK", 0, 0, W.END_MARK)]
    assert got == want and c["punts"] == 0 and c["flushes"] == 1


def test_marks_from_the_api_go_through_the_same_writer(tmp_path, image, engine):
    image.write_bytes(bytes(image.stat().st_size))
    r, log = logged_rig(tmp_path, image, engine)
    try:
        assert aligned_write(r.drv, 8, pattern(4096, 8)) == B.S_OK
        r.backend.mark("after-the-write")
        assert aligned_write(r.drv, 16, pattern(4096, 9)) == B.S_OK
    finally:
        r.close()
    assert [e[:4] for e in log_entries(log)] == [
        ("WRITE", 8, 8, None), ("MARK", 0, 0, "after-the-write"), ("WRITE", 16, 8, None),
        ("MARK", 0, 0, W.END_MARK)]


def test_a_logged_qcow2_disk_writes_allocated_clusters_in_c(tmp_path, engine):
    """Writes to allocated clusters are the C path's, an allocating write and
    the flush (qcow2 metadata) Python's; one log has them in order, and it
    replays onto a raw copy of the disk as it was to the disk as it is."""
    img = tmp_path / "d.qcow2"
    Qcow2Driver.create(str(img), 4 << 20)
    d = open_image(str(img), "qcow2")
    write_range(d, 0, pattern(1 << 20, 1))          # clusters of the first MiB allocated
    d.close()
    log = tmp_path / "q.log"
    spec = {"driver": "blklogwrites", "file": {"driver": "qcow2", "file": str(img)},
            "log": str(log)}
    r = Rig(spec, "mmio", engine)
    try:
        assert aligned_write(r.drv, 8, pattern(4096, 2)) == B.S_OK           # in place: C
        assert r.dev.counters()["punts"] == 0
        assert aligned_write(r.drv, 6144, pattern(4096, 3)) == B.S_OK        # allocates
        assert r.drv.flush() == B.S_OK
        assert aligned_write(r.drv, 16, pattern(4096, 4)) == B.S_OK
        c = r.dev.counters()
    finally:
        r.close()
    assert c["punts"] == 2                          # the allocating write, the flush
    assert [e[:4] for e in log_entries(log)] == [
        ("WRITE", 8, 8, None), ("WRITE", 6144, 8, None), ("FLUSH", 0, 0, None),
        ("MARK", 0, 0, "flush-1"), ("WRITE", 16, 8, None), ("MARK", 0, 0, W.END_MARK)]
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(1 << 20, 1) + bytes(3 << 20))
    W.replay(str(log), str(base))
    out = tmp_path / "now.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], check=True)
    assert base.read_bytes() == out.read_bytes()


def test_past_the_hold_bound_held_writes_go_before_the_flush(tmp_path, image, engine, capfd,
                                                             monkeypatch):
    """With room for 4 KiB held, the 4 KiB write that completes during the
    held flush is held, the 8 KiB one after it is not: both are logged at
    once, before the flush's entry (legal: they completed), with one line."""
    from pykvm.block.filters import blklogwrites
    monkeypatch.setattr(blklogwrites, "HOLD_MAX", 4096)

    def body(d):
        flush = d.submit([d.header(T_FLUSH), d.vq.arena.writable(1)])
        time.sleep(0.2)
        assert d.vq.reap() == []
        for sector, n, seed in ((16, 4096, 1), (32, 8192, 2)):
            buf = (d.vq.arena.alloc(n, pattern(n, seed), align=4096), n, False)
            d.submit([d.header(B.T_OUT, sector), buf, d.vq.arena.writable(1)])
            time.sleep(0.1)
        assert [h for h, _ in d.wait_used(3)][-1] == flush      # after both writes
    rules = "[fault]\nop = flush\naction = hold\nrelease-after = 2\nonce = on\n"
    got, _ = run(tmp_path, image, engine, body, rules)
    assert [e[:4] for e in got] == [
        ("WRITE", 16, 8, None), ("WRITE", 32, 16, None), ("FLUSH", 0, 0, None),
        ("MARK", 0, 0, "flush-1"), ("MARK", 0, 0, W.END_MARK)]
    err = capfd.readouterr().err
    assert err.count("bytes of writes completed while a flush was in flight") == 1, err
