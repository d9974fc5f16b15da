"""Host faults under the disk's error policies (werror=, rerror=), made real: a
tmpfs that fills up (ENOSPC), a loop device whose backing file is truncated
(reads fail with EIO) or sits on a full tmpfs (fdatasync fails with EIO).
Both paths: aio=python and the C path (aio=io_uring)."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, guest_path

pytestmark = pytest.mark.kvm

CHECK_DISK = ROOT / "guest" / "tools" / "check_disk.py"
BS = 64 << 10
IOS = 96                      # 6 MiB of sequential writes
AIOS = ["python", "io_uring"]




def sparse(path, size=16 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def ballast(path, size):
    with open(path, "wb") as f:
        f.write(b"\xaa" * size)


def workload(rw="write", ios=IOS, extra=""):
    return (f"transport=mmio rw={rw} bs={BS} iodepth=4 ios={ios} seed=5 size={IOS * BS} "
            f"{extra}").strip()


def result(out: str) -> dict:
    line = [ln for ln in out.splitlines() if ln.startswith("fio-result:")][-1]
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def check_disk(image, ios=IOS):
    r = subprocess.run([sys.executable, str(CHECK_DISK), str(image), "--rw", "write", "--bs",
                        str(BS), "--size", str(IOS * BS), "--seed", "5", "--ios", str(ios)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def run(disk, cmdline, timeout=120):
    return subprocess.run([sys.executable, "-m", "pykvm", "run", str(guest_path("workload")),
                           "--disk", disk, "--cmdline", cmdline, "--timeout", str(timeout)],
                          capture_output=True, timeout=timeout + 60, cwd=ROOT)


@pytest.mark.parametrize("aio", AIOS)
def test_enospc_with_werror_report_fails_the_write(tmpfs, aio):
    d = tmpfs("4M")
    img = sparse(d / "disk.img")
    r = run(f"file={img},aio={aio},werror=report", workload())
    out, err = r.stdout.decode(), r.stderr.decode()
    assert "Traceback" not in err
    assert r.returncode == 1, out[-2000:]
    res = result(out)
    assert int(res["io_errors"]) > 0
    assert "I/O error: No space left on device" in err
    assert "VM paused" not in err


@pytest.mark.parametrize("aio", AIOS)
def test_enospc_with_werror_ignore_reports_success(tmpfs, aio):
    d = tmpfs("4M")
    img = sparse(d / "disk.img")
    r = run(f"file={img},aio={aio},werror=ignore", workload())
    out, err = r.stdout.decode(), r.stderr.decode()
    assert "Traceback" not in err
    assert r.returncode == 0, out[-2000:]
    assert result(out)["io_errors"] == "0"
    assert "No space left on device (ignored: werror=ignore)" in err
    assert "VM paused" not in err


@pytest.mark.parametrize("aio", AIOS)
@pytest.mark.parametrize("werror", ["enospc", "stop"])
def test_enospc_pauses_until_sigcont_and_loses_no_write(tmpfs, aio, werror):
    d = tmpfs("6M")
    img = sparse(d / "disk.img")
    ballast(d / "ballast", (3 << 20) + (20 << 10))   # the space ends inside a write: a short one
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "run", str(guest_path("workload")),
                          "--disk", f"file={img},aio={aio},werror={werror}",
                          "--cmdline", workload(), "--timeout", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        line = p.stderr.readline().decode()
        while line and "VM paused" not in line:
            line = p.stderr.readline().decode()
        assert re.match(rf"pykvm: disk0: write error: No space left on device \(werror="
                        rf"{werror}\); VM paused: fix the cause, then send SIGCONT to pid "
                        rf"{p.pid}", line), line
        # paused: the process waits (the guest would finish in well under a second)
        time.sleep(1.5)
        assert p.poll() is None
        os.unlink(d / "ballast")
        p.send_signal(signal.SIGCONT)
        out, rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    out, rest = out.decode(), rest.decode()
    assert "Traceback" not in rest
    assert p.returncode == 0, out[-2000:] + rest[-2000:]
    assert result(out)["io_errors"] == "0"
    check_disk(img)        # every write is on the disk, the one that failed included


@pytest.mark.parametrize("aio", AIOS)
def test_machine_resume_retries_and_nothing_completes_while_paused(tmpfs, tmp_path, aio):
    from pykvm.machine import DiskSpec, Machine, MachineConfig
    d = tmpfs("6M")
    img = sparse(d / "disk.img")
    ballast(d / "ballast", (3 << 20) + (20 << 10))   # the space ends inside a write: a short one
    serial = open(tmp_path / "serial.out", "w+b")
    cfg = MachineConfig(kernel=str(guest_path("workload")), cmdline=workload(),
                        serial_out=serial, disks=[DiskSpec.parse(f"file={img},aio={aio}")])
    with Machine(cfg) as m:
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", m.run(timeout=120)))
        t.start()
        deadline = time.monotonic() + 60
        while not m.paused and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.paused
        dev = m.blk_devices[0]
        time.sleep(0.5)
        assert all(v.parked.is_set() for v in m.vcpus)

        def used():    # the used rings' indices, on the path that serves them
            if dev._fast is not None:
                return [dev._fast.queue_state(i)[1] for i in range(len(dev.queues))]
            return [q.used_idx for q in dev.queues]
        before = used()
        exits = sum(m.exit_counts().values())
        time.sleep(1.0)
        assert used() == before                          # no request completed
        assert sum(m.exit_counts().values()) == exits   # no guest code ran
        os.unlink(d / "ballast")
        m.resume()
        t.join(120)
        assert not t.is_alive()
    serial.seek(0)
    out = serial.read().decode(errors="replace")
    assert box["r"].status == 0, out[-2000:]
    assert result(out)["io_errors"] == "0"
    check_disk(img)


@pytest.mark.parametrize("aio", AIOS)
@pytest.mark.parametrize("rerror", ["report", "stop"])
def test_failing_read_follows_rerror(tmp_path, loop, aio, rerror):
    backing = sparse(tmp_path / "backing.img")
    dev = loop(backing)
    os.truncate(backing, 0)             # the loop device's reads now fail with EIO
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "run", str(guest_path("workload")),
                          "--disk", f"file={dev},format=raw,aio={aio},cache=none,"
                                    f"rerror={rerror}",
                          "--cmdline", workload("read", ios=32), "--timeout", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        if rerror == "stop":
            line = p.stderr.readline().decode()
            while line and "VM paused" not in line:
                line = p.stderr.readline().decode()
            assert "disk0: read error: Input/output error (rerror=stop); VM paused" in line, line
            os.truncate(backing, 16 << 20)
            p.send_signal(signal.SIGCONT)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
    out, err = out.decode(), err.decode()
    assert p.returncode in (0, 1), out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    res = result(out)
    if rerror == "report":
        assert p.returncode == 1 and int(res["io_errors"]) > 0, out[-2000:]
        assert "I/O error: Input/output error" in err
    else:
        assert p.returncode == 0 and res["io_errors"] == "0", out[-2000:] + err[-2000:]
        assert int(res["read_ios"]) == 32


def wait_line(p, text):
    line = p.stderr.readline().decode()
    while line and text not in line:
        line = p.stderr.readline().decode()
    return line


@pytest.mark.parametrize("aio", AIOS)
def test_failed_flush_is_reported_with_werror_report(tmpfs, loop, aio):
    d = tmpfs("2M")
    dev = loop(sparse(d / "backing.img"))
    r = run(f"file={dev},format=raw,aio={aio},werror=report", workload(extra="flush=8"))
    out, err = r.stdout.decode(), r.stderr.decode()
    assert "Traceback" not in err
    res = result(out)
    assert r.returncode == 1
    assert "flush failed (Input/output error): every later flush of this image fails" in err
    assert int(res["flushes"]) == IOS // 8 and int(res["io_errors"]) > 0, res
    assert re.search(r"io error status=1 op=flush", out), out[-2000:]


@pytest.mark.parametrize("aio", AIOS)
def test_a_flush_retried_after_room_came_back_still_fails(tmpfs, loop, aio):
    """werror=stop: the failed flush pauses the VM; with room on the host again
    the kernel's next fdatasync would succeed (the dirty pages are gone), so
    the retried flush must fail again and pause again (fsyncgate)."""
    d = tmpfs("2M")
    dev = loop(sparse(d / "backing.img"))
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "run", str(guest_path("workload")),
                          "--disk", f"file={dev},format=raw,aio={aio},werror=stop",
                          "--cmdline", workload(extra="flush=8"), "--timeout", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        line = wait_line(p, "VM paused")
        assert "disk0: write error: Input/output error (werror=stop); VM paused" in line, line
        subprocess.run(["mount", "-o", "remount,size=64M", str(d)], check=True)
        p.send_signal(signal.SIGCONT)
        line = wait_line(p, "VM paused")
        assert "disk0: write error: Input/output error (werror=stop); VM paused" in line, line
        assert p.poll() is None
    finally:
        p.kill()
        p.communicate(timeout=60)
