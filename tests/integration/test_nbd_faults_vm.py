"""Faults from a real NBD server through the workload guest, on the Python
path and the C path (as tests/integration/test_blkdebug_vm.py does for
blkdebug): nbdkit serves a raw file behind its error filter (reads and writes
failing at a rate, switched on and off by trigger files between guest runs)
and its log filter (every request the server got, and its result). The guest
gets IOERR for exactly the requests the server failed (the disk's per-request
trace against the server's log), nothing else changes, the VM runs to its
end, and what was written before reads back afterwards."""
import collections
import json
import re

import pytest

from tests.helpers.nbd_servers import nbd_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.kvm

MiB = 1 << 20
AREA = 2 * MiB
BS = 4096


def run_fio(pykvm, disk, *args):
    r = pykvm("fio", "--disk", disk, "--output-format", "json", "--bs", str(BS), "--size",
              str(AREA), "--iodepth", "16", *args, timeout=180)
    doc = json.loads(r.stdout)
    return r, doc["jobs"][0], doc["pykvm"]["device"]


def server_failures(log: str) -> collections.Counter:
    """(op, offset, length) of every read and write the server failed."""
    asked, failed = {}, collections.Counter()
    with open(log) as f:
        for line in f:
            m = re.search(r"connection=(\d+) (Read|Write) id=(\d+) offset=0x([0-9a-f]+) "
                          r"count=0x([0-9a-f]+) ", line)
            if m:
                asked[m.group(1), m.group(3)] = (m.group(2).lower(), int(m.group(4), 16),
                                                 int(m.group(5), 16))
                continue
            m = re.search(r"connection=(\d+) \.\.\.(Read|Write) id=(\d+) return=-1", line)
            if m:
                failed[asked[m.group(1), m.group(3)]] += 1
    return failed


@pytest.mark.parametrize("aio,transport", [("python", "mmio"), ("io_uring", "pci")])
def test_the_guest_gets_ioerr_for_exactly_what_the_server_failed(pykvm, tmp_path, nbd_server,
                                                                 aio, transport):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    log = tmp_path / "server.log"
    on = tmp_path / "errors-on"
    srv = nbd_server("nbdkit", "file", f"file={image}", f"logfile={log}",
                     "error-pread-rate=20%", f"error-pread-file={on}",
                     "error-pwrite-rate=20%", f"error-pwrite-file={on}",
                     filters=["log", "error"], transport="tcp")
    disk = f"file={srv.uri},format=raw,aio={aio},transport={transport}"

    # 1. the area written whole, no errors
    r, job, dev = run_fio(pykvm, disk, "--rw", "write", "--ios", str(AREA // BS))
    assert r.returncode == 0 and job["error"] == 0 and dev["errors"] == 0, r.stderr
    before = image.read_bytes()[:AREA]

    # 2. errors on: random reads and writes, verified, traced
    on.touch()
    trace = tmp_path / "trace.jsonl"
    r, job, dev = run_fio(pykvm, f"{disk},trace={trace}", "--rw", "randrw", "--ios", "1000",
                          "--seed", "9", "--verify", "crc32c")
    on.unlink()
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err      # the run's io errors
    assert job["error"] == 5 and job["verify_errors"] == 0         # good reads verified
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) == dev["requests"]
    bad = [x for x in records if x["status"] != "ok"]
    assert {x["status"] for x in bad} == {"ioerr"}
    assert dev["errors"] == len(bad)
    ours = collections.Counter((x["op"], x["sector"] * 512, x["length"]) for x in bad)
    theirs = server_failures(log)
    assert ours == theirs                   # exactly the server's failures, each once
    assert 20 < sum(n for (op, _, _), n in theirs.items() if op == "read") < 200
    assert 20 < sum(n for (op, _, _), n in theirs.items() if op == "write") < 200
    # the guest saw them as failed requests (it reports its first ten)
    seen = re.findall(r"workload: io error status=1 op=(read|write) offset=(\d+)", err)
    assert len(seen) == 10 and all((op, int(off), BS) in ours for op, off in seen)
    assert srv.alive()

    # 3. errors off: everything reads back, and the blocks the server refused to
    # write (or that were never written again) hold what they held before
    r, job, dev = run_fio(pykvm, disk, "--rw", "read", "--ios", str(AREA // BS),
                          "--verify", "crc32c")
    assert r.returncode == 0 and job["error"] == 0 and job["verify_errors"] == 0, r.stderr
    assert job["read"]["io_bytes"] == AREA
    written = {x["sector"] * 512 for x in records if x["op"] == "write" and x["status"] == "ok"}
    after = image.read_bytes()[:AREA]
    for off in range(0, AREA, BS):
        same = after[off:off + BS] == before[off:off + BS]
        assert same != (off in written), off


@pytest.mark.parametrize("aio", ["python", "io_uring"])
def test_a_slow_server_is_waited_for_with_requests_in_parallel(pykvm, nbd_server, aio):
    delay_ms = 20
    srv = nbd_server("nbdkit", "memory", "size=16M", f"rdelay={delay_ms}ms",
                     f"wdelay={delay_ms}ms", filters=["delay"])
    r, job, dev = run_fio(pykvm, f"file={srv.uri},format=raw,aio={aio}", "--rw", "randrw",
                          "--ios", "400", "--seed", "4", "--verify", "crc32c")
    assert r.returncode == 0 and job["error"] == 0 and job["verify_errors"] == 0, r.stderr
    assert dev["errors"] == 0
    for side in ("read", "write"):
        assert job[side]["total_ios"] > 100
        assert job[side]["lat_ns"]["min"] >= delay_ms * 1_000_000      # every one waited for
    # 400 requests of 20 ms each, 16 at a time: about half a second, not 8 s
    assert job["read"]["runtime"] < 400 * delay_ms / 4, job["read"]["runtime"]


@pytest.mark.parametrize("aio", ["python", "io_uring"])
def test_errors_switched_on_and_off_while_the_guest_runs(tmp_path, nbd_server, aio):
    """The server fails every write between two moments of a running guest:
    the writes it got in between fail, the ones before and after do not, the
    reads never, and the guest runs on to its end."""
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    on = tmp_path / "writes-fail"
    srv = nbd_server("nbdkit", "memory", "size=16M", "error-pwrite-rate=100%",
                     f"error-pwrite-file={on}", filters=["error"])
    trace = tmp_path / "trace.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "fio", "--disk",
         f"file={srv.uri},format=raw,aio={aio},trace={trace}", "--output-format", "json",
         "--rw", "randrw", "--bs", str(BS), "--size", str(AREA), "--iodepth", "8",
         "--runtime", "1.5", "--verify", "crc32c"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not trace.exists() or trace.read_text().count("\n") < 200:   # running
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        # the window is taken inside the file's life, so that a request in it
        # certainly met the file (this process may be descheduled anywhere)
        t_pre = time.monotonic_ns()
        on.touch()
        t_on = time.monotonic_ns()
        time.sleep(0.2)
        t_off = time.monotonic_ns()
        on.unlink()
        t_gone = time.monotonic_ns()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and b"Traceback" not in err, err.decode()[-2000:]
    doc = json.loads(out)
    job, dev = doc["jobs"][0], doc["pykvm"]["device"]
    assert job["verify_errors"] == 0
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    writes = [x for x in records if x["op"] == "write"]
    # (a request the C path sends and the server fails goes back to the Python
    # path, which traces it from there: its submit_ns is that moment, a little
    # after the device took it; hence the margin after t_gone)
    inside = [x for x in writes if x["submit_ns"] > t_on and x["complete_ns"] < t_off]
    before = [x for x in writes if x["complete_ns"] < t_pre]
    after = [x for x in writes if x["submit_ns"] > t_gone + 50_000_000]
    assert len(inside) > 20 and all(x["status"] == "ioerr" for x in inside)
    assert len(before) > 100 and all(x["status"] == "ok" for x in before)
    assert len(after) > 100 and all(x["status"] == "ok" for x in after)   # the guest went on
    assert all(x["status"] == "ok" for x in records if x["op"] != "write")
    failed = [x for x in records if x["status"] != "ok"]
    assert dev["errors"] == len(failed) and srv.alive()
    assert srv.stderr().count("injecting EIO error into pwrite") == len(failed)
