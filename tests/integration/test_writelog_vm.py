"""blklogwrites under KVM: the workload guest's writes, logged on the Python
path and by the C I/O threads that serve them (native/writelog.c), replay
onto the disk as it was before the run to the disk after it."""
import json
import os

import pytest

from pykvm.block import writelog

pytestmark = pytest.mark.kvm


def logged_writes_at_sector_0(log) -> int:
    """Writes the C path leaves to Python on a raw disk (sector 0: see
    fastpath.disk_extents), as the log has them."""
    fd, reader = writelog.open_log(str(log))
    try:
        return sum(1 for e in reader if not e.flags & (writelog.MARK | writelog.DISCARD) and
                   e.nr_sectors and e.sector == 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("aio", ["python", "io_uring"])
def test_replaying_the_log_rebuilds_the_disk(pykvm, tmp_path, aio):
    before = bytes(range(256)) * (16 << 12)          # 16 MiB of a pattern
    img, base, log = tmp_path / "d.raw", tmp_path / "base.raw", tmp_path / "d.log"
    img.write_bytes(before)
    base.write_bytes(before)
    r = pykvm("fio", "--disk", f"driver=blklogwrites,file.driver=raw,file.file.filename={img},"
              f"log={log},aio={aio}", "--rw", "randrw", "--bs", "4k", "--iodepth", "8",
              "--ios", "600", "--size", "8M", "--output-format", "json", timeout=180)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    dev = json.loads(r.stdout)["pykvm"]["device"]
    info = writelog.info(str(log))
    assert info["writes"] == json.loads(r.stdout)["jobs"][0]["write"]["total_ios"] > 0
    assert info["marks"][-1]["name"] == writelog.END_MARK
    if aio != "python":     # reads and writes in C, but for writes to sector 0
        assert dev["punts"] == logged_writes_at_sector_0(log)
    writelog.replay(str(log), str(base))
    assert base.read_bytes() == img.read_bytes()


def test_a_logged_disk_is_served_in_c_on_every_queue(pykvm, tmp_path):
    """io_uring, a C thread per queue, 4 queues, writes and flushes: every
    request the trace has is path=c (but writes to sector 0), the log has
    each write and flush, and replaying it onto the base rebuilds the disk."""
    before = bytes(range(256)) * (16 << 12)
    img, base, log, trace = (tmp_path / n for n in ("d.raw", "base.raw", "d.log", "t.jsonl"))
    img.write_bytes(before)
    base.write_bytes(before)
    r = pykvm("fio", "--disk", f"driver=blklogwrites,file.driver=raw,file.file.filename={img},"
              f"log={log},aio=io_uring,iothread=queue,trace={trace}", "--queues", "4",
              "--rw", "randwrite", "--bs", "4k", "--iodepth", "16", "--ios", "1200",
              "--fsync", "64", "--size", "8M", "--output-format", "json", timeout=180)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    doc = json.loads(r.stdout)
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    writes = [x for x in recs if x["op"] == "write"]
    flushes = [x for x in recs if x["op"] == "flush"]
    assert len(writes) == doc["jobs"][0]["write"]["total_ios"] and flushes
    assert len({x["queue"] for x in writes}) == 4
    python = [x for x in recs if x["path"] != "c"]
    assert all(x["op"] == "write" and x["sector"] == 0 for x in python), python[:3]
    assert doc["pykvm"]["device"]["punts"] == len(python) == logged_writes_at_sector_0(log)
    info = writelog.info(str(log))
    assert info["writes"] == len(writes) and info["flushes"] == len(flushes)
    assert info["marks"][-1]["name"] == writelog.END_MARK
    writelog.replay(str(log), str(base))
    assert base.read_bytes() == img.read_bytes()
