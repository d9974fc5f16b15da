"""The workload guest on an NBD disk: qemu-nbd (Unix socket) and nbdkit (its
file plugin, on 127.0.0.1) serve a raw file, the guest runs random reads and
writes with verification over virtio-blk (MMIO and PCI) on the C path
(aio=io_uring) and the Python path (aio=python), and the host checks the
server's file against the guest's I/O stream afterwards."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers.nbd_servers import nbd_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.kvm

CHECK_DISK = ROOT / "guest" / "tools" / "check_disk.py"
MiB = 1 << 20
AREA = 2 * MiB          # the guest's range: small, so reads meet written blocks (and the
                        # host's check is quick)


def serve(nbd_server, server, transport, image):
    if server == "qemu-nbd":
        return nbd_server("qemu-nbd", "-f", "raw", str(image), transport=transport)
    return nbd_server("nbdkit", "file", f"file={image}", transport=transport)


@pytest.mark.parametrize("aio", ["io_uring", "python"])
@pytest.mark.parametrize("transport", ["mmio", "pci"])
@pytest.mark.parametrize("server,net", [("qemu-nbd", "unix"), ("nbdkit", "tcp")])
def test_workload_verifies_on_an_nbd_disk(pykvm, tmp_path, nbd_server, server, net,
                                           transport, aio):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    srv = serve(nbd_server, server, net, image)
    r = pykvm("fio", "--disk", f"file={srv.uri},format=raw,transport={transport},aio={aio}",
              "--rw", "randrw", "--bs", "4k", "--iodepth", "32", "--size", str(AREA),
              "--runtime", "1", "--seed", "5", "--verify", "crc32c", "--output-format", "json",
              timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    doc = json.loads(r.stdout)
    job, dev = doc["jobs"][0], doc["pykvm"]["device"]
    assert job["error"] == 0 and job["verify_errors"] == 0
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    assert job["read"]["total_ios"] > 500 and job["write"]["total_ios"] > 500
    assert dev["errors"] == 0 and dev["requests"] >= ios
    # the path that served it: the C path's counters exist only there
    assert ("submitted" in dev) == (aio == "io_uring")
    if aio == "io_uring":
        assert dev["submitted"] > ios // 2     # (adjacent requests may go as one)
    assert srv.alive()
    check = subprocess.run([sys.executable, str(CHECK_DISK), str(image), "--rw", "randrw",
                            "--bs", "4096", "--size", str(AREA), "--seed", "5", "--ios",
                            str(ios), "--zero-unwritten"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stdout + check.stderr


@pytest.mark.parametrize("aio", ["io_uring", "python"])
def test_writethrough_writes_are_fua_or_flushed(pykvm, tmp_path, nbd_server, aio):
    """cache=writethrough on a server that takes FUA: the C path sends each write
    with NBD_CMD_FLAG_FUA and no flush after it (one round trip); the Python
    path writes and flushes. Either way every write is durable when the guest
    sees it complete (nbdkit's log filter records what the server got)."""
    log = tmp_path / "requests.log"
    srv = nbd_server("nbdkit", "memory", "size=16M", f"logfile={log}", filters=["log"])
    r = pykvm("fio", "--disk", f"file={srv.uri},format=raw,cache=writethrough,aio={aio}",
              "--rw", "randwrite", "--bs", "4k", "--iodepth", "8", "--size", str(AREA),
              "--runtime", "0.5", "--output-format", "json", timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    writes = json.loads(r.stdout)["jobs"][0]["write"]["total_ios"]
    text = log.read_text()
    sent = re.findall(r" connection=\d+ Write id=\d+ offset=0x[0-9a-f]+ count=0x[0-9a-f]+ "
                      r"fua=(\d)", text)
    fua = [f for f in sent if f == "1"]
    flushes = len(re.findall(r" connection=\d+ Flush id=\d+", text))
    # (adjacent writes may go as one request)
    assert writes > 50 and len(sent) >= writes // 2, (writes, text[-500:])
    if aio == "io_uring":
        # (a few go by the Python side, as a write and a flush)
        assert len(fua) >= 0.9 * len(sent) and flushes >= len(sent) - len(fua), \
            (len(fua), len(sent), flushes)
    else:
        assert not fua and flushes >= len(sent) // 2, (flushes, len(sent))


@pytest.mark.parametrize("iodepth", [1, 8])
@pytest.mark.parametrize("aio,cache", [("io_uring", "writeback"), ("native", "none")])
def test_random_writes_on_a_fresh_qcow2_over_nbd(pykvm, tmp_path, nbd_server, aio, cache,
                                                 iodepth):
    """4k random writes on a fresh qcow2 image that qemu-nbd exports raw: most
    of them allocate a cluster, so the C path hands them to Python, whose
    metadata writes (copy-on-write of the cluster, refcounts, L2 tables) go
    on the connection whose replies the C thread reads; between them that
    thread looks for replies with none there. Every write completes (none
    waits for request-timeout), the guest's stream is on the image, and
    qemu-img finds the image clean."""
    image, flat = tmp_path / "disk.qcow2", tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    os.truncate(image, 48 * MiB)          # room for the clusters (an export cannot grow)
    srv = nbd_server("qemu-nbd", "-f", "raw", str(image))
    ios = 300
    r = pykvm("fio", "--disk", f"driver=qcow2,file.driver=nbd,file.server.type=unix,"
              f"file.server.path={srv.address},file.request-timeout=5,aio={aio},cache={cache}",
              "--rw", "randwrite", "--bs", "4k", "--iodepth", str(iodepth), "--ios", str(ios),
              "--size", "32M", "--seed", "3", "--verify", "crc32c", "--output-format", "json",
              timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"lost the connection" not in r.stderr, r.stderr.decode()[-2000:]
    doc = json.loads(r.stdout)
    job, dev = doc["jobs"][0], doc["pykvm"]["device"]
    assert job["error"] == 0 and job["verify_errors"] == 0
    assert job["write"]["total_ios"] == ios and dev["errors"] == 0
    # the premise: the C path served the disk, and handed allocating writes to Python
    assert "submitted" in dev and 0 < dev["punts"] < dev["requests"], dev
    srv.stop()
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(flat)],
                   check=True)
    check = subprocess.run([sys.executable, str(CHECK_DISK), str(flat), "--rw", "randwrite",
                            "--bs", "4096", "--size", "32M", "--seed", "3", "--ios", str(ios),
                            "--zero-unwritten"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stdout + check.stderr
