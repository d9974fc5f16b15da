"""The volatile node: what a power cut may leave on the disk, under the crash
model (README, "Crash testing"), for raw and qcow2, in each cache mode."""
import subprocess

import pytest

from pykvm.aio import PythonEngine
from pykvm.block import BlockBackend, GraphError

MiB = 1 << 20
OLD = bytes(range(256)) * 16        # 4 KiB of the disk's initial pattern


def disk(tmp_path, fmt="raw", cache="writeback", **opts):
    img = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        img.write_bytes(OLD * 256)  # 1 MiB
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    spec = {"driver": "volatile", "file": {"driver": fmt, "file": str(img)}, **opts}
    return BlockBackend(spec, cache=cache, engine=PythonEngine()), img


def w(be, token, offset, data):
    be.writev(token, offset, [memoryview(bytearray(data))])
    assert be.drain() == [(token, len(data))]


def f(be, token):
    be.flush(token)
    assert be.drain() == [(token, 0)]


def content(be, offset, n):
    buf = bytearray(n)
    be.readv(99, offset, [memoryview(buf)])
    assert be.drain() == [(99, n)]
    return bytes(buf)


def test_keep_flushed_loses_every_write_after_the_flush(tmp_path):
    be, img = disk(tmp_path)
    w(be, 1, 0, b"A" * 4096)
    f(be, 2)
    w(be, 3, 2048, b"B" * 4096)        # half over A, half over the old data
    assert content(be, 0, 8192) == b"A" * 2048 + b"B" * 4096 + OLD[2048:]   # reads see it
    out = be.power_cut("flushed")
    assert out["writes_lost"] == 1
    assert content(be, 0, 8192) == b"A" * 4096 + OLD
    be.close()


def test_keep_all_loses_nothing(tmp_path):
    be, img = disk(tmp_path)
    w(be, 1, 0, b"A" * 512)
    be.power_cut("all")
    assert content(be, 0, 512) == b"A" * 512
    be.close()


@pytest.mark.parametrize("torn", [False, True])
def test_keep_random_is_a_legal_seeded_state(tmp_path, torn):
    outcomes = set()
    for seed in range(8):
        be, img = disk(tmp_path, cache="writeback")
        writes = [(k * 1024, bytes([65 + k]) * 2048) for k in range(6)]   # overlapping
        for t, (off, data) in enumerate(writes):
            w(be, t + 1, off, data)
        be.power_cut("random", seed=seed, torn=torn)
        got = content(be, 0, 8192)
        be.close()
        for s in range(16):     # each sector: its old value or one a write gave it
            sector = got[s * 512:(s + 1) * 512]
            allowed = {OLD[(s * 512) % 4096:(s * 512) % 4096 + 512]} | {
                data[s * 512 - off:s * 512 - off + 512] for off, data in writes
                if off <= s * 512 < off + len(data)}
            assert sector in allowed, (seed, s)
        outcomes.add(got)
    assert len(outcomes) > 2            # the seed changes the state
    be, img = disk(tmp_path)            # ... and the same seed gives the same one
    for t, (off, data) in enumerate(writes):
        w(be, t + 1, off, data)
    be.power_cut("random", seed=3, torn=torn)
    again = content(be, 0, 8192)
    be.close()
    be, img = disk(tmp_path)
    for t, (off, data) in enumerate(writes):
        w(be, t + 1, off, data)
    be.power_cut("random", seed=3, torn=torn)
    assert content(be, 0, 8192) == again
    be.close()


def test_writethrough_writes_are_durable_as_they_complete(tmp_path):
    be, img = disk(tmp_path, cache="writethrough")
    w(be, 1, 0, b"T" * 512)
    assert be.power_cut("flushed")["writes_lost"] == 0
    assert content(be, 0, 512) == b"T" * 512
    be.close()


def test_unsafe_never_makes_anything_durable(tmp_path):
    be, img = disk(tmp_path, cache="unsafe")
    w(be, 1, 0, b"U" * 512)
    f(be, 2)
    be.power_cut("flushed")
    assert content(be, 0, 512) == OLD[:512]
    be.close()


def test_volatile_max_makes_old_writes_durable_early(tmp_path, caplog):
    be, img = disk(tmp_path, **{"volatile-max": "8k"})
    for t in range(6):
        w(be, t + 1, t * 4096, b"M" * 4096)
    assert "made durable early" in caplog.text
    out = be.power_cut("flushed")
    assert out["applied_early"] > 0
    assert content(be, 0, 4096) == b"M" * 4096          # applied early: kept
    be.close()


def test_a_qcow2_disk_after_a_cut_is_consistent(tmp_path):
    be, img = disk(tmp_path, fmt="qcow2")
    w(be, 1, 0, b"Q" * 65536)
    f(be, 2)
    w(be, 3, 65536, b"R" * 65536)       # allocates: lost in the cut
    be.power_cut("flushed")
    assert content(be, 0, 131072) == b"Q" * 65536 + bytes(65536)
    be.close()
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode in (0, 3) and "ERROR" not in check.stdout, check.stdout


def test_a_cut_planned_for_close(tmp_path):
    be, img = disk(tmp_path)
    w(be, 1, 0, b"P" * 512)
    be.volatile.plan_cut("flushed")
    be.close()
    assert img.read_bytes()[:512] == OLD[:512]


def test_refused_with_o_direct(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(MiB))
    with pytest.raises(GraphError) as e:
        BlockBackend({"driver": "volatile", "file": str(img)}, cache="none",
                     engine=PythonEngine())
    assert "cache mode of the page cache" in str(e.value)
