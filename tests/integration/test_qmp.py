"""The QMP control socket (pykvm/qmp.py) on a running VM: QEMU's commands,
`pykvm log mark` into a live write log, and power cuts at a mark or a time."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pykvm import qmp
from pykvm.block import writelog
from tests.conftest import ROOT


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "pykvm", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_running(sock, proc, timeout=60):
    """Until the QMP socket answers query-status (the VM is built and running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(sock):
            try:
                return qmp.command(str(sock), "query-status")
            except Exception:
                pass
        time.sleep(0.05)
    raise AssertionError("the QMP socket never answered")


def finish(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def disk(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(8 << 20))
    return img


def test_qemus_commands_and_a_log_mark_reach_the_running_vm(pykvm, tmp_path, disk):
    log, sock = tmp_path / "d.log", tmp_path / "q.sock"
    p = start("fio", "--disk", f"driver=blklogwrites,file.driver=raw,file.file.filename={disk},"
              f"log={log}", "--rw", "randwrite", "--runtime", "60", "--fsync", "4",
              "--size", "4M", "--qmp", f"unix:{sock},server=on,wait=off")
    try:
        assert wait_running(sock, p) == {"running": True, "status": "running"}
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        r = pykvm("log", "mark", "--qmp", sock, "first", timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == "mark 'first': the write log, 0 rules waiting for it"
        qmp.command(str(sock), "stop")
        assert qmp.command(str(sock), "query-status")["status"] == "paused"
        qmp.command(str(sock), "cont")
        assert qmp.command(str(sock), "query-status")["status"] == "running"
        r = pykvm("log", "mark", "--qmp", sock, "--device", "disk7", "x", timeout=30)
        assert r.returncode == 1 and r.stderr.decode().strip() == \
            "pykvm: log-mark: Device 'disk7' not found"
        qmp.command(str(sock), "quit")
        finish(p)
    finally:
        p.kill()
        p.wait()
    assert not sock.exists()
    marks = [m["name"] for m in writelog.info(str(log))["marks"]]
    assert "first" in marks and marks[-1] == writelog.END_MARK
    # the mark sits between flushes: some flush-N before it (fsync every 4 writes)
    assert marks.index("first") > 0 and marks[0].startswith("flush-")


def test_the_wire_protocol_as_a_qmp_client_speaks_it(tmp_path, disk):
    sock = tmp_path / "q.sock"
    p = start("run", os.path.join(ROOT, "guest", "build", "workload.elf"), "--cmdline",
              "rw=randread ios=100000000", "--disk", f"file={disk},format=raw",
              "--qmp", f"unix:{sock},server=on,wait=off")
    try:
        wait_running(sock, p)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        f = s.makefile("rwb")
        greeting = json.loads(f.readline())
        assert greeting["QMP"]["capabilities"] == [] and "qemu" in greeting["QMP"]["version"]

        def ask(obj):
            f.write(json.dumps(obj).encode() + b"\n")
            f.flush()
            return json.loads(f.readline())
        assert ask({"execute": "query-status"})["error"]["class"] == "CommandNotFound"
        assert ask({"execute": "qmp_capabilities", "id": 7}) == {"return": {}, "id": 7}
        assert ask({"execute": "no-such"})["error"]["class"] == "CommandNotFound"
        assert ask({"execute": "log-mark", "arguments": {"name": "m"}})["error"]["desc"] == \
            "raw node 'disk0': mark 'm': the disk has no blklogwrites node and no rule waits " \
            "for this mark"
        assert ask({"execute": "log-mark", "arguments": {"nme": "m"}})["error"]["desc"] == \
            "Parameter 'nme' is unexpected"
        assert ask({"arguments": {}})["error"]["class"] == "GenericError"
        assert ask({"execute": "quit"}) == {"return": {}}
        s.close()
        rc, _, err = finish(p)
        assert rc == 0, err         # quit: as QEMU, a normal end
    finally:
        p.kill()
        p.wait()


def test_a_power_cut_at_a_mark_from_pykvm_log_mark(pykvm, tmp_path, disk):
    rules, sock = tmp_path / "r.conf", tmp_path / "q.sock"
    rules.write_text('[fault]\naction = "power-cut"\nmark = "now"\n')
    p = start("fio", "--disk", f"driver=volatile,file.driver=raw,file.file=blkdebug:{rules}:"
              f"{disk}", "--rw", "randwrite", "--runtime", "60", "--size", "4M",
              "--qmp", f"unix:{sock},server=on,wait=off")
    try:
        wait_running(sock, p)
        r = pykvm("log", "mark", "--qmp", sock, "now", timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == "mark 'now': no write log, 1 rules waiting for it"
        rc, _, err = finish(p)
    finally:
        p.kill()
        p.wait()
    assert rc == 1 and "power cut by the blkdebug rule at" in err.strip().splitlines()[-1]
    assert disk.read_bytes() == bytes(8 << 20)      # nothing was flushed: nothing is kept


def test_a_power_cut_at_a_time(pykvm, tmp_path, disk):
    rules = tmp_path / "r.conf"
    rules.write_text('[fault]\naction = "power-cut"\ntime = "1s"\nkeep = "all"\n')
    r = pykvm("fio", "--disk", f"driver=volatile,file.driver=raw,file.file=blkdebug:{rules}:"
              f"{disk}", "--rw", "randwrite", "--runtime", "100", "--size", "4M", timeout=90)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and "power cut by the blkdebug rule at" in err[-1], err
    assert disk.read_bytes() != bytes(8 << 20)      # keep=all: what was written stays


@pytest.mark.parametrize("spec, why", [
    ("tcp:localhost:4444", "pykvm serves QMP on a Unix socket"),
    ("unix:/tmp/x.sock", "give server=on"),
    ("unix:/tmp/x.sock,server=on,bogus=1", "unknown option 'bogus=1'"),
    ("unix:/nonexistent/dir/q.sock,server=on,wait=off", "No such file or directory"),
])
def test_a_bad_qmp_option_is_one_line(pykvm, disk, spec, why):
    r = pykvm("run", os.path.join(ROOT, "guest", "build", "hello.elf"), "--qmp", spec,
              timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and len(err.splitlines()) == 1 and why in err, err


def test_log_mark_without_a_server_is_one_line(pykvm, tmp_path):
    r = pykvm("log", "mark", "--qmp", tmp_path / "none.sock", "x", timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "No such file" in err, err


def test_wait_on_holds_the_guest_until_a_client_connects(tmp_path):
    sock = tmp_path / "q.sock"
    p = start("run", os.path.join(ROOT, "guest", "build", "hello.elf"),
              "--qmp", f"unix:{sock},server=on")         # wait=on: QEMU's default
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        assert p.poll() is None             # hello.elf alone ends in well under that
        assert qmp.command(str(sock), "query-status")["running"] in (True, False)
        rc, out, err = finish(p)
    finally:
        p.kill()
        p.wait()
    assert rc == 0 and "hello from the guest" in out, (out, err)


def test_an_nbd_export_takes_log_marks_and_quits(pykvm, tmp_path, disk):
    log, sock, nbd = tmp_path / "d.log", tmp_path / "q.sock", tmp_path / "n.sock"
    p = start("serve", "--nbd", f"unix:{nbd}", "--persistent", "--disk",
              f"driver=blklogwrites,file.driver=raw,file.file.filename={disk},log={log}",
              "--qmp", f"unix:{sock},server=on,wait=off")
    try:
        assert wait_running(sock, p)["status"] == "running"
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "flush",
                            f"nbd+unix:///?socket={nbd}"], capture_output=True, text=True)
        assert w.returncode == 0, w.stderr
        assert pykvm("log", "mark", "--qmp", sock, "after-write", timeout=30).returncode == 0
        assert "does not pause" in str(pytest.raises(Exception, qmp.command, str(sock),
                                                     "stop").value)
        qmp.command(str(sock), "quit")
        rc, _, err = finish(p)
    finally:
        p.kill()
        p.wait()
    assert rc == 0, err
    i = writelog.info(str(log))
    marks = [m["name"] for m in i["marks"]]      # (qemu-io flushes again as it closes)
    assert marks[0] == "flush-1" and "after-write" in marks and marks[-1] == writelog.END_MARK
    assert i["writes"] == 1 and i["bytes"] == 64 << 10
