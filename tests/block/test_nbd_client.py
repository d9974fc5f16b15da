"""The nbd protocol node against a real server (qemu-nbd, started here on a
Unix socket and on 127.0.0.1): data both ways, holes from block status, flush,
write-zeroes, qcow2 over NBD checked by qemu-img, and a server that goes away."""
import os
import select
import socket
import subprocess
import time

import pytest

from pykvm import aio
from pykvm._native import ffi, lib
from pykvm.aio.native import NativeEngine
from pykvm.block import BlockError, open_image
from pykvm.block.driver import read_range, write_range, write_zeroes_range
from pykvm.block.nbd import NbdDriver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def qemu_nbd(tmp_path):
    procs = []

    def start(image, fmt="raw", transport="unix"):
        if transport == "unix":
            sock = str(tmp_path / f"nbd{len(procs)}.sock")
            where, uri = ["-k", sock], f"nbd+unix:///?socket={sock}"
        else:
            port = _free_port()
            where, uri = ["-b", "127.0.0.1", "-p", str(port)], f"nbd://127.0.0.1:{port}/"
        p = subprocess.Popen(["qemu-nbd", "-t", "-f", fmt, *where, str(image)])
        procs.append(p)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0:
                return uri, p
            time.sleep(0.1)
        raise AssertionError("qemu-nbd did not start")

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_read_write_and_holes(tmp_path, qemu_nbd, transport):
    img = tmp_path / "d.raw"
    img.write_bytes(b"")
    os.truncate(img, 8 << 20)
    uri, _ = qemu_nbd(img, transport=transport)
    d = open_image(uri, "raw")
    try:
        assert d.size == 8 << 20
        write_range(d, 1 << 20, b"\xab" * 65536)
        assert read_range(d, 1 << 20, 65536) == b"\xab" * 65536
        runs = d.file.allocated(0, d.size)
        data = [(o, n) for o, n, has in runs if has]
        assert data and all(o <= 1 << 20 and o + n >= (1 << 20) + 65536 for o, n in data)
        assert sum(n for _o, n in data) < 1 << 20          # the rest is a hole
        write_zeroes_range(d, 1 << 20, 4096)
        assert read_range(d, 1 << 20, 8192) == bytes(4096) + b"\xab" * 4096
    finally:
        d.close()
    with open(img, "rb") as f:                              # the server's file has it
        f.seek((1 << 20) + 4096)
        assert f.read(4096) == b"\xab" * 4096


def test_qcow2_over_nbd_checked_by_qemu_img(tmp_path, qemu_nbd):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    os.truncate(img, 8 << 20)             # room for the clusters it allocates
    uri, proc = qemu_nbd(img, fmt="raw")
    d = open_image(uri, "qcow2")
    try:
        write_range(d, 3 << 20, b"q" * 131072)
        assert read_range(d, 3 << 20, 131072) == b"q" * 131072
    finally:
        d.close()
    proc.kill()
    proc.wait()
    out = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    got = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x71 3M 128k", str(img)],
                         capture_output=True, text=True)
    assert "Pattern verification failed" not in got.stdout and got.returncode == 0


def test_refused_connection_is_one_line(tmp_path):
    with pytest.raises(BlockError, match="cannot connect to the NBD server"):
        open_image(f"nbd+unix:///?socket={tmp_path}/none.sock", "raw")


def test_server_gone_fails_then_reconnects(tmp_path, qemu_nbd):
    img = tmp_path / "d.raw"
    img.write_bytes(b"\x11" * (1 << 20))
    sock = tmp_path / "nbd0.sock"
    uri, proc = qemu_nbd(img)
    d = open_image({"driver": "raw", "file": {"driver": "nbd", "reconnect-delay": 5,
                                              "server": {"type": "unix", "path": str(sock)}}})
    try:
        assert read_range(d, 0, 512) == b"\x11" * 512
        proc.kill()
        proc.wait()
        os.unlink(sock)
        # back within reconnect-delay: the read waits for it and succeeds
        restarted = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-k", str(sock), str(img)])
        try:
            assert read_range(d, 4096, 512) == b"\x11" * 512
            assert d.file.info_flags()["reconnects"] >= 1
        finally:
            restarted.kill()
            restarted.wait()
        # gone for good: EIO after the delay, never a hang
        t0 = time.monotonic()
        with pytest.raises(OSError):
            read_range(d, 8192, 512)
        assert time.monotonic() - t0 < 30
    finally:
        d.close()


@pytest.mark.parametrize("name", ["io_uring", "native"])
def test_looking_for_replies_with_none_there_leaves_the_connection_sending(tmp_path, qemu_nbd,
                                                                          name):
    """An engine whose thread reads the connection's replies itself
    (pykvm_aio_watch) looks for them on every round and before each sleep
    (pykvm_aio_ready), whether the socket holds any or not. A request from
    the Python path that comes next (a qcow2 metadata write while the C path
    has handed a guest write to Python) must still go to the server: libnbd
    told of a reply that is not there stayed out of READY and only queued
    it, and it waited for request-timeout (EIO) instead of its reply."""
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    uri, _ = qemu_nbd(img)
    drv = NbdDriver(filename=uri, request_timeout=2)
    eng = NativeEngine(name)
    try:
        # the engine sends to the connection once, then watches its socket
        eng.submit([aio.AioRequest(aio.WRITE, drv.fd, 0, [memoryview(b"e" * 4096)],
                                   token=1)])
        done = []
        while not done:
            select.select([eng.notifier], [], [], 5)
            done += eng.reap()
        assert done == [(1, 4096)]
        fds, gens = ffi.new("int[8]"), ffi.new("uint32_t[8]")
        assert lib.pykvm_aio_watch(eng._aio, fds, gens, 8) == 1 and fds[0] >= 0
        for i in range(1, 5):
            assert lib.pykvm_aio_ready(eng._aio) == 0       # nothing there to read
            req = aio.AioRequest(aio.WRITE, drv.fd, 4096 * i, [memoryview(b"%d" % i * 4096)])
            assert drv.execute(req) == 4096, i
        flags = drv.info_flags()
        assert flags["connected"] and flags["reconnects"] == 0 and flags["failed"] == 0
    finally:
        eng.close()
        drv.close_node()
    with open(img, "rb") as f:
        assert f.read(5 * 4096) == b"e" * 4096 + b"".join(b"%d" % i * 4096 for i in range(1, 5))
