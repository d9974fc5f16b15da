"""blklogwrites: the dm-log-writes format as the node writes it, its order (a
write is logged before the flush that made it durable), replay to any point,
and one-line errors for logs that cannot be used."""
import json
import os
import struct
import subprocess
import sys

import pytest

from pykvm.aio import PythonEngine
from pykvm.block import BlockBackend
from pykvm.block import writelog as W

MiB = 1 << 20


def backend(tmp_path, cache="writeback", **log_opts):
    img = tmp_path / "disk.raw"
    if not img.exists():
        img.write_bytes(bytes(4 * MiB))
    spec = {"driver": "blklogwrites", "file": {"driver": "raw", "file": str(img)},
            "log": str(tmp_path / "disk.log"), **log_opts}
    return BlockBackend(spec, cache=cache, engine=PythonEngine()), img, tmp_path / "disk.log"


def write(be, token, offset, data):
    be.writev(token, offset, [memoryview(bytearray(data))])
    assert be.drain() == [(token, len(data))]


def flush(be, token):
    be.flush(token)
    assert be.drain() == [(token, 0)]


def entries(log):
    fd, reader = W.open_log(str(log))
    try:
        return [(e.flag_names(), e.sector, e.nr_sectors, e.mark) for e in reader]
    finally:
        os.close(fd)


def test_the_log_is_dm_log_writes_format_in_durable_order(tmp_path):
    be, img, log = backend(tmp_path)
    write(be, 1, 0, b"a" * 4096)
    write(be, 2, 8192, b"b" * 512)
    flush(be, 3)
    write(be, 4, 4096, b"c" * 1024)     # never flushed: logged at the end
    be.discard(5, 1 * MiB, 65536)
    be.drain()
    be.close()
    assert entries(log) == [("WRITE", 0, 8, None), ("WRITE", 16, 1, None), ("FLUSH", 0, 0, None),
                            ("MARK", 0, 0, "flush-1"), ("WRITE", 8, 2, None),
                            ("DISCARD", 2048, 128, None), ("MARK", 0, 0, W.END_MARK)]
    raw = log.read_bytes()
    magic, version, n, ss = struct.unpack_from("<QQQI", raw)
    assert (magic, version, n, ss) == (0x6A736677736872, 1, 7, 512)
    # the first entry's header, then its data, sector-aligned
    assert struct.unpack_from("<QQQQ", raw, 512) == (0, 8, 0, 0)
    assert raw[1024:1024 + 4096] == b"a" * 4096


def test_writethrough_writes_are_logged_as_fua_when_they_complete(tmp_path):
    be, img, log = backend(tmp_path, cache="writethrough")
    write(be, 1, 0, b"x" * 512)
    assert entries(log)[0] == ("FUA", 0, 1, None)   # before close: durable at once
    be.close()


def test_unsafe_logs_no_flush(tmp_path):
    be, img, log = backend(tmp_path, cache="unsafe")
    write(be, 1, 0, b"x" * 512)
    flush(be, 2)
    be.close()
    assert [e[0] for e in entries(log)] == ["WRITE", "MARK"]     # never durable


def test_write_zeroes_are_logged_as_zero_data(tmp_path):
    be, img, log = backend(tmp_path)
    write(be, 1, 0, b"y" * 8192)
    be.write_zeroes(2, 0, 4096, False)
    be.drain()
    be.close()
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4 * MiB))
    W.replay(str(log), str(base))
    assert base.read_bytes() == img.read_bytes()


def test_replay_to_any_point(tmp_path):
    be, img, log = backend(tmp_path)
    states = []
    for i in range(6):
        write(be, 10 + i, i * 4096, bytes([65 + i]) * 4096)
        if i % 2:
            flush(be, 20 + i)
            states.append(img.read_bytes())
    be.close()
    for k, want in enumerate(states, 1):
        base = tmp_path / f"base{k}.raw"
        base.write_bytes(bytes(4 * MiB))
        done = W.replay(str(log), str(base), end_mark=f"flush-{k}")
        assert base.read_bytes() == want and done["flushes"] == k
    base = tmp_path / "next.raw"
    base.write_bytes(bytes(4 * MiB))
    assert W.replay(str(log), str(base), next_flush=True)["writes"] == 2
    assert W.replay(str(log), str(base), limit=3)["entries"] == 3


def test_log_append_continues_a_log(tmp_path):
    be, img, log = backend(tmp_path)
    write(be, 1, 0, b"1" * 512)
    be.close()
    be, img, log = backend(tmp_path, **{"log-append": "on"})
    write(be, 2, 512, b"2" * 512)
    be.close()
    assert [e[0] for e in entries(log)] == ["WRITE", "MARK", "WRITE", "MARK"]


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:20], "truncated write log"),
    (lambda raw: b"\xff" * 8 + raw[8:], "not a write log"),
    (lambda raw: raw[:512 + 512 + 100], "past the end of the log"),
    (lambda raw: raw[:512 + 16] + struct.pack("<Q", 1 << 40) + raw[512 + 24:], "unknown flags"),
    (lambda raw: raw[:16] + struct.pack("<Q", 1 << 40) + raw[24:], "holds at most"),
    (lambda raw: raw[:24] + struct.pack("<I", 999) + raw[28:], "sector size 999"),
])
def test_a_bad_log_is_one_line(tmp_path, damage, words):
    be, img, log = backend(tmp_path)
    write(be, 1, 0, b"z" * 4096)
    be.close()
    log.write_bytes(damage(log.read_bytes()))
    with pytest.raises(W.LogError) as e:
        W.info(str(log))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_log_of_another_disk_is_refused_before_it_writes(tmp_path):
    be, img, log = backend(tmp_path)
    write(be, 1, 3 * MiB, b"w" * 4096)
    be.close()
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(1 * MiB))
    with pytest.raises(W.LogError) as e:
        W.replay(str(log), str(small))
    assert "past the end of" in str(e.value) and "not the one logged" in str(e.value)


def test_the_cli(tmp_path):
    be, img, log = backend(tmp_path)
    write(be, 1, 0, b"q" * 4096)
    flush(be, 2)
    be.close()
    run = [sys.executable, "-m", "pykvm", "log"]
    info = subprocess.run(run + ["info", str(log), "--output-format", "json"],
                          capture_output=True, text=True)
    assert json.loads(info.stdout)["flushes"] == 1
    base = tmp_path / "b.raw"
    base.write_bytes(bytes(4 * MiB))
    r = subprocess.run(run + ["replay", str(log), str(base), "--end-mark", "flush-1"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and base.read_bytes()[:4096] == b"q" * 4096
    r = subprocess.run(run + ["replay", str(log), str(base), "--end-mark", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no mark named" in r.stderr


def test_a_read_only_log_node_is_refused(tmp_path):
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    with pytest.raises(Exception) as e:
        BlockBackend({"driver": "blklogwrites", "file": str(img), "log": str(tmp_path / "l")},
                     read_only=True)
    assert "read-only" in str(e.value)


def test_the_c_path_writes_and_flushes_a_logged_disk(tmp_path):
    """The C threads log what they serve: nothing of the log's is punted."""
    from pykvm.virtio.fastpath import disk_extents
    be, img, log = backend(tmp_path)
    try:
        assert be.c_may_write
        assert not any("blklogwrites" in p for p in be.c_path_punts()), be.c_path_punts()
        extents, flush_fd = disk_extents(be)
        assert flush_fd == be.driver.fd and extents[-1].writable
    finally:
        be.close()
