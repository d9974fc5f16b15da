"""qcow2's own crash safety: a qcow2 image's file served over NBD by pykvm
with every write of the file logged (blklogwrites under the client's qcow2:
metadata and data as the file sees them), a client writing into it (the
workload guest on pykvm's qcow2 driver, or qemu-io on QEMU's), then every
crash state of the log checked with qemu-img check: leaks are allowed, a
refcount or L2 error is not. With lazy_refcounts the image is dirty after a
cut, and qemu-img check -r all must repair it."""
import json
import subprocess
import sys

import pytest

from pykvm.testing import Disk, serve_nbd

CHECK = "qemu-img check -q -f qcow2 {image}; r=$?; [ $r = 0 ] || [ $r = 3 ]"   # 3: leaks only
CHECK_LAZY = "qemu-img check -q -r all -f qcow2 {image} >/dev/null 2>&1; " \
             "qemu-img check -q -f qcow2 {image}"
WRITES, FLUSH_EVERY = 96, 8


def qcow2_file(image, lazy: bool):
    """A new qcow2 and room after it: the export's size is fixed, so the file
    gets its free clusters (refcount 0) before the run."""
    base = image("qcow2", "16M", lazy_refcounts="on" if lazy else "off")
    subprocess.run(["truncate", "-s", "24M", base], check=True)
    subprocess.run(["cp", base, base + ".disk"], check=True)
    return base, Disk(base + ".disk", fmt="raw", log=base + ".log")


def write_through_qcow2(uri, writer: str):
    if writer == "pykvm":       # the workload guest, random 4k writes, a flush every 8
        server = uri.split("socket=")[1]
        cmd = [sys.executable, "-m", "pykvm", "fio", "--disk", "driver=qcow2,file.driver=nbd,"
               f"file.server.type=unix,file.server.path={server}", "--rw",
               "randwrite", "--ios", str(WRITES), "--fsync", str(FLUSH_EVERY), "--iodepth", "4",
               "--verify", "crc32c"]
    else:                       # QEMU's driver: the same pattern from qemu-io
        ops = [c for k in range(WRITES) for c in
               ["-c", f"write -P {k % 250 + 1} {(k * 37 % 256) * 64 + k % 16 * 4}k 4k"] +
               (["-c", "flush"] if k % FLUSH_EVERY == FLUSH_EVERY - 1 else [])]
        cmd = ["qemu-io", "-f", "qcow2", *ops, uri]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def crashtest(base, log, check):
    p = subprocess.run([sys.executable, "-m", "pykvm", "crashtest", "--base", base,
                        "--base-format", "raw", "--log", log, "--check", check, "--max-states",
                        "8", "--jobs", "2", "--json", "--no-resume"],
                       capture_output=True, text=True, timeout=900)
    return json.loads(p.stdout)


@pytest.mark.parametrize("writer", ["pykvm", "qemu-io"])
@pytest.mark.parametrize("lazy", [False, True], ids=["refcounts", "lazy_refcounts"])
def test_qcow2_has_no_corruption_in_any_crash_state(image, writer, lazy):
    base, disk = qcow2_file(image, lazy)
    with serve_nbd(disk) as uri:
        write_through_qcow2(uri, writer)
    s = crashtest(base, disk.log, CHECK_LAZY if lazy else CHECK)
    assert s["states"] > 50 and s["failures"] == 0, s["failed"][:2]
