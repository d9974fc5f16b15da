"""Real NBD servers for the client's tests: qemu-nbd and nbdkit, started on a
Unix socket in the test's tmp_path or on 127.0.0.1 (a free port), and killed
by the fixture's finalizer, whatever the test did.

    def test_x(nbd_server):
        srv = nbd_server("nbdkit", "memory", "size=8M")
        srv = nbd_server("nbdkit", "file", f"file={img}", filters=["error"],
                         transport="tcp")
        srv = nbd_server("qemu-nbd", "-f", "raw", str(img))
        srv.uri    # nbd+unix:///?socket=... or nbd://127.0.0.1:PORT/
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    def __init__(self, proc: subprocess.Popen, uri: str, address, log: str):
        self.proc = proc
        self.uri = uri
        self.address = address          # a socket path, or (host, port)
        self.log = log                  # the server's stderr, in a file

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stderr(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def _greets(address) -> bool:
    """The server answers a connection with NBD's greeting ("NBDMAGIC")."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(2)
        try:
            s.connect(address)
            return s.recv(8) == b"NBDMAGIC"
        except OSError:
            return False


@pytest.fixture
def nbd_server(tmp_path):
    """start(kind, *args, transport="unix", filters=()) -> NbdServer, up and
    answering; every server started is killed at the end of the test."""
    servers: list[NbdServer] = []

    def start(kind: str, *args: str, transport: str = "unix", filters=()) -> NbdServer:
        assert shutil.which(kind), f"{kind} missing: `make deps` installs it (APT_PACKAGES)"
        n = len(servers)
        if transport == "unix":
            address = str(tmp_path / f"{kind}{n}.sock")
            uri = f"nbd+unix:///?socket={address}"
        else:
            address = ("127.0.0.1", free_port())
            uri = f"nbd://127.0.0.1:{address[1]}/"
        if kind == "qemu-nbd":
            where = ["-k", address] if transport == "unix" else \
                ["-b", address[0], "-p", str(address[1])]
            cmd = ["qemu-nbd", "-t", *where, *args]
        elif kind == "nbdkit":
            where = ["-U", address] if transport == "unix" else \
                ["-i", address[0], "-p", str(address[1])]
            cmd = ["nbdkit", "-f", "--exit-with-parent", *where,
                   *(f"--filter={f}" for f in filters), *args]
        else:
            raise ValueError(kind)
        log = str(tmp_path / f"{kind}{n}.log")
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        srv = NbdServer(proc, uri, address, log)
        servers.append(srv)
        deadline = time.monotonic() + START_TIMEOUT
        while not _greets(address):
            if proc.poll() is not None:
                raise AssertionError(f"{cmd} exited {proc.returncode}: {srv.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd} did not start: {srv.stderr()}")
            time.sleep(0.05)
        return srv

    yield start
    for srv in servers:
        srv.stop()
    for srv in servers:
        if isinstance(srv.address, str) and os.path.exists(srv.address):
            os.unlink(srv.address)
