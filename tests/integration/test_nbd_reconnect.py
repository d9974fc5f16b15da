"""The workload guest on an NBD disk whose server goes away mid-run: killed
and started again within reconnect-delay, every request completes and
verifies (in-flight ones are sent again on the new connection); a server that
hangs mid-reply costs the guest IOERR after request-timeout, and the VMM ends
normally. On the C path (the I/O thread reads the replies) and the Python path."""
import os
import subprocess
import sys
import time

import pytest

from tests.helpers.nbd_server import HostileServer

PYKVM = [sys.executable, "-m", "pykvm"]


def _qemu_nbd(img, sock):
    p = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-k", str(sock), str(img)],
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.05)
    return p


def _fio(spec, runtime, rw="randrw"):
    return subprocess.Popen(PYKVM + ["fio", "--disk", spec, "--rw", rw, "--bs", "4k",
                                     "--iodepth", "32", "--runtime", str(runtime),
                                     "--verify", "crc32c"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("aio", ["io_uring", "python"])
def test_server_restarted_mid_run_loses_nothing(tmp_path, aio):
    img, sock = tmp_path / "d.raw", tmp_path / "nbd.sock"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    server = _qemu_nbd(img, sock)
    try:
        vm = _fio(f"file.driver=nbd,file.filename=nbd+unix:///?socket={sock},aio={aio},"
                  f"file.reconnect-delay=10", runtime=4)
        deadline = time.monotonic() + 60     # until the guest's writes reach the file
        while os.stat(img).st_blocks < 2048 and vm.poll() is None:
            assert time.monotonic() < deadline, "the guest wrote nothing"
            time.sleep(0.05)
        server.kill()
        server.wait()
        os.unlink(sock)
        time.sleep(0.5)
        server = _qemu_nbd(img, sock)
        out, err = vm.communicate(timeout=120)
    finally:
        server.kill()
        server.wait()
    assert vm.returncode == 0, err[-2000:]
    assert "lost the connection" in err and "reconnected to" in err
    assert "io errors: 0" in out and "verify: errors=0" in out, out
    assert "I/O error" not in err


@pytest.mark.parametrize("aio", ["io_uring", "python"])
def test_server_hanging_mid_reply_fails_requests_not_the_vmm(tmp_path, aio):
    with HostileServer(str(tmp_path / "h.sock"), size=64 << 20, mode="hang-mid-reply") as srv:
        t0 = time.monotonic()
        vm = _fio(f"driver=raw,file.driver=nbd,file.filename={srv.uri},aio={aio},"
                  f"file.request-timeout=1", runtime=3, rw="randread")
        out, err = vm.communicate(timeout=120)
        took = time.monotonic() - t0
    assert "Traceback" not in err, err[-2000:]
    assert "no reply within request-timeout=1" in err
    # the guest saw IOERR (the workload reports it and fails), and the run ended
    assert vm.returncode == 1, (vm.returncode, err[-2000:])
    assert "io errors: 0" not in out
    assert took < 60


def test_server_hanging_at_the_format_probe_is_one_line(tmp_path):
    with HostileServer(str(tmp_path / "h.sock"), mode="hang-mid-reply") as srv:
        vm = _fio(f"file.driver=nbd,file.filename={srv.uri},file.request-timeout=1", runtime=1)
        out, err = vm.communicate(timeout=60)
    assert vm.returncode != 0
    assert "Traceback" not in err
    assert "cannot read the image's first bytes" in err
