"""The vhost-user-blk back-end against a front-end of ours (tests/helpers/vhost_user_frontend.py).

No KVM: the "guest" is a memfd the test writes virtqueues into. Each test runs
the server in a thread, over a real Unix socket, on the Python path and on a
C engine; `pykvm serve` itself is run as a process for signals and SIGKILL.
"""
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from pykvm.machine import DiskSpec, open_disk
from pykvm.virtio.blk import VirtioBlk
from pykvm.virtio.queue import INFLIGHT_DESC, INFLIGHT_HEADER
from pykvm.virtio.transport import vhost_user as V
from tests.helpers.vhost_user_frontend import Frontend

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
DISK = 16 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Server:
    def __init__(self, tmp_path, aio: str):
        self.image = tmp_path / "disk.img"
        if not self.image.exists():
            with open(self.image, "wb") as f:
                f.truncate(DISK)
        self.path = str(tmp_path / "vhost.sock")
        self.dev = VirtioBlk(open_disk(DiskSpec.parse(f"file={self.image},aio={aio}")),
                             serial="vu-test")
        self.server = V.VhostUserServer(self.dev, self.path)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connect(self, **kw) -> Frontend:
        return Frontend.connect(self.path, **kw)

    def close(self):
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()
        self.dev.close()


@pytest.fixture(params=["python", "io_uring"])
def server(request, tmp_path):
    s = Server(tmp_path, request.param)
    yield s
    s.close()


def test_round_trip(server):
    fe = server.connect()
    try:
        fe.handshake()
        data = os.urandom(8192)
        assert fe.write(16, data) == 0
        status, back = fe.read(16, 8192)
        assert (status, back) == (0, data)
        _, _, st = fe.add_request(T_FLUSH, 0)
        fe.kick_and_wait(1)
        assert fe.mem.read(st, 1) == b"\0"
        _, idg, st = fe.add_request(T_GET_ID, 0, read_len=20)
        fe.kick_and_wait(1)
        assert fe.mem.read(st, 1) == b"\0"
        assert fe.mem.read(idg, 20).rstrip(b"\0") == b"vu-test"
    finally:
        fe.close()
    with open(server.image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(8192) == data


def test_many_requests_in_flight_complete(server):
    fe = server.connect()
    try:
        fe.handshake()
        blocks = {i: os.urandom(4096) for i in range(48)}
        for i, data in blocks.items():
            fe.add_request(T_OUT, i * 8, data=data)
        done = fe.kick_and_wait(len(blocks))
        assert len({h for h, _ in done}) == len(blocks)
        for i, data in blocks.items():
            assert fe.read(i * 8, 4096) == (0, data)
    finally:
        fe.close()


def test_config_space_is_the_devices(server):
    fe = server.connect()
    try:
        cfg = fe.get_config(0, 60)
        assert len(cfg) == 60
        assert struct.unpack_from("<Q", cfg, 0)[0] == DISK // 512
        assert cfg == bytes(server.dev.read_config(k, 1) for k in range(60))
        assert fe.get_config(0, 4000) == b""   # refused: an empty reply
        assert not fe.closed_by_backend(0.1)
    finally:
        fe.close()


def test_reconnect_gets_a_working_device(server):
    fe = server.connect()
    fe.handshake()
    assert fe.write(0, b"1" * 512) == 0
    assert fe.write(1, b"2" * 512) == 0
    assert fe.get_vring_base() == 2       # GET_VRING_BASE stops the ring: the next index
    fe.close()
    fe = server.connect()
    try:
        fe.handshake()
        assert fe.read(0, 1024) == (0, b"1" * 512 + b"2" * 512)
    finally:
        fe.close()
    assert server.server.sessions == 2


def test_ring_stopped_and_started_again_in_one_session(server):
    fe = server.connect()
    try:
        fe.handshake()
        assert fe.write(0, b"a" * 512) == 0
        base = fe.get_vring_base()
        assert base == 1
        fe.setup_ring(base=base)               # QEMU's stop/start: same memory, same ring
        assert fe.read(0, 512) == (0, b"a" * 512)
    finally:
        fe.close()


@pytest.mark.parametrize("aio", ["python", "io_uring"])
def test_ring_stop_returns_every_request_it_took(tmp_path, aio):
    """GET_VRING_BASE with requests in flight (writethrough writes: each waits
    for its fdatasync), from a front-end without an inflight region: the base
    counts only requests that are back in the used ring, with their status, so
    none is lost when the ring starts again from that base."""
    image = tmp_path / "wt.img"
    with open(image, "wb") as f:
        f.truncate(DISK)
    dev = VirtioBlk(open_disk(DiskSpec.parse(f"file={image},aio={aio},cache=writethrough")),
                    serial="vu-test")
    server = V.VhostUserServer(dev, str(tmp_path / "vhost.sock"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fe = Frontend.connect(str(tmp_path / "vhost.sock"))
    try:
        fe.handshake(inflight=False)
        reqs = [fe.add_request(T_OUT, i * 256, data=bytes([i]) * (128 << 10)) for i in range(16)]
        fe.vq.publish()
        os.eventfd_write(fe.kick, 1)
        deadline = time.monotonic() + 10
        while dev.counters()["requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        base = fe.get_vring_base()
        used = fe.vq.used()
        assert len(used) == base, (base, len(used))
        for head, _, status in reqs:
            if head in {h for h, _ in used}:
                assert fe.mem.read(status, 1) == b"\0"
    finally:
        fe.close()
        server.stop()
        thread.join(10)
        server.close()
        dev.close()


def _mark_inflight(fe, head: int, counter: int) -> None:
    """As a back-end that took chain ``head`` and died would have left it."""
    import mmap as _mmap
    mp = _mmap.mmap(fe.inflight_fd, fe.inflight_size)
    d = INFLIGHT_HEADER + INFLIGHT_DESC * head
    struct.pack_into("<Q", mp, d + 8, counter)
    mp[d] = 1
    mp.close()


def _set_region_used(fe, used_idx: int, last_batch_head: int) -> None:
    import mmap as _mmap
    mp = _mmap.mmap(fe.inflight_fd, fe.inflight_size)
    struct.pack_into("<HH", mp, 12, last_batch_head, used_idx)
    mp.close()


def test_requests_in_flight_at_a_crash_are_served_again(server):
    """A, B, C were taken by a back-end that returned only B and died. The new
    one serves A and C again, and nothing is taken twice."""
    fe = server.connect()
    try:
        fe.get_inflight_fd()
        a = fe.add_request(T_OUT, 0, data=b"A" * 512)
        b = fe.add_request(T_OUT, 1, data=b"B" * 512)
        c = fe.add_request(T_OUT, 2, data=b"C" * 512)
        fe.vq.publish()
        # B is back in the used ring; the dead back-end had finished its batch
        fe.mem.write(fe.vq.used_ring + 4, struct.pack("<II", b[0], 1))
        fe.mem.write_u(fe.vq.used_ring + 2, 2, 1)
        _set_region_used(fe, used_idx=1, last_batch_head=b[0])
        _mark_inflight(fe, c[0], counter=9)
        _mark_inflight(fe, a[0], counter=4)
        fe.handshake(inflight_fd=fe.inflight_fd, base=1)
        done = []
        deadline = time.monotonic() + 10
        while len(fe.vq.used()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        done = [h for h, _ in fe.vq.used()]
        # submitted oldest first; they may complete in any order
        assert done[0] == b[0] and sorted(done[1:]) == sorted([a[0], c[0]])
        assert fe.mem.read(a[2], 1) == b"\0" and fe.mem.read(c[2], 1) == b"\0"
        assert fe.get_vring_base() == 3        # past all three: none is taken again
    finally:
        fe.close()
    with open(server.image, "rb") as f:
        assert f.read(1536) == b"A" * 512 + bytes(512) + b"C" * 512


def test_a_crash_inside_a_used_batch_is_repaired(server):
    """The dead back-end stored used->idx for B but not the region's used_idx
    nor B's flag: B is done, not served again."""
    fe = server.connect()
    try:
        fe.get_inflight_fd()
        b = fe.add_request(T_OUT, 1, data=b"B" * 512)
        fe.vq.publish()
        fe.mem.write(fe.vq.used_ring + 4, struct.pack("<II", b[0], 1))
        fe.mem.write_u(fe.vq.used_ring + 2, 2, 1)
        _set_region_used(fe, used_idx=0, last_batch_head=b[0])
        _mark_inflight(fe, b[0], counter=1)
        fe.handshake(inflight_fd=fe.inflight_fd, base=1)
        assert fe.vq.reap() == [(b[0], 1)]     # what the dead back-end returned
        assert fe.write(3, b"D" * 512) == 0
        assert len(fe.vq.used()) == 2
    finally:
        fe.close()
    with open(server.image, "rb") as f:
        assert f.read(1024)[512:] == bytes(512)  # B was not written again


def _inflight_heads(fe) -> set[int]:
    import mmap as _mmap
    mp = _mmap.mmap(fe.inflight_fd, fe.inflight_size)
    heads = {i for i in range(fe.queue_size) if mp[INFLIGHT_HEADER + INFLIGHT_DESC * i] == 1}
    mp.close()
    return heads


def _hdr(request, size, flags=V.VERSION):
    return V.HEADER.pack(request, flags, size)


MALFORMED = {
    "bad-version": lambda fe: fe.sock.sendall(_hdr(V.GET_FEATURES, 0, flags=2)),
    "huge-payload": lambda fe: fe.sock.sendall(_hdr(V.SET_FEATURES, 1 << 20)),
    "unknown-request": lambda fe: fe.send(99),
    "truncated-payload": lambda fe: (fe.sock.sendall(_hdr(V.SET_FEATURES, 8) + b"\0\0"),
                                     fe.sock.shutdown(socket.SHUT_WR)),
    "short-payload": lambda fe: fe.send(V.SET_VRING_NUM, b"\0\0\0"),
    "vring-index": lambda fe: fe.send(V.SET_VRING_NUM, V.STATE.pack(7, 64)),
    "vring-size": lambda fe: fe.send(V.SET_VRING_NUM, V.STATE.pack(0, 100)),
    "vring-base": lambda fe: fe.send(V.SET_VRING_BASE, V.STATE.pack(0, 1 << 20)),
    "features-not-offered": lambda fe: fe.send(V.SET_FEATURES, V.U64.pack(1 << 32 | 1 << 63)),
    "protocol-not-offered": lambda fe: fe.send(V.SET_PROTOCOL_FEATURES, V.U64.pack(1 << 40)),
    "kick-without-fd": lambda fe: fe.send(V.SET_VRING_KICK, V.U64.pack(0)),
    "kick-polling": lambda fe: fe.send(V.SET_VRING_KICK, V.U64.pack(V.VRING_NOFD)),
    "mem-table-fd-count": lambda fe: fe.send(
        V.SET_MEM_TABLE, struct.pack("=II", 2, 0) + V.REGION.pack(0, 4096, 0, 0) * 2,
        [fe.memfd]),
    "mem-table-past-eof": lambda fe: fe.send(
        V.SET_MEM_TABLE, struct.pack("=II", 1, 0) + V.REGION.pack(0, 1 << 30, 0, 0),
        [fe.memfd]),
    "mem-table-overlap": lambda fe: fe.send(
        V.SET_MEM_TABLE, struct.pack("=II", 2, 0) + V.REGION.pack(0, 8192, 0, 0)
        + V.REGION.pack(4096, 4096, 1 << 40, 0), [fe.memfd, fe.memfd]),
    "mem-table-zero-regions": lambda fe: fe.send(V.SET_MEM_TABLE, struct.pack("=II", 0, 0)),
    "ring-outside-memory": lambda fe: (
        fe.send_mem_table(wait=False),
        fe.send(V.SET_VRING_ADDR, V.ADDR.pack(0, 0, 1 << 50, 1 << 50, 1 << 50, 0))),
    "inflight-too-small": lambda fe: fe.send(
        V.SET_INFLIGHT_FD, V.INFLIGHT.pack(64, 0, 1, 64), [fe.memfd]),
    "inflight-queues": lambda fe: fe.send(V.GET_INFLIGHT_FD, V.INFLIGHT.pack(0, 0, 9, 64)),
    "set-config-too-big": lambda fe: fe.send(V.SET_CONFIG, V.CONFIG_HDR.pack(0, 64, 0)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_closes_the_connection_only(server, case, caplog):
    fe = server.connect()
    try:
        try:
            MALFORMED[case](fe)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what we check below
        assert fe.closed_by_backend(), f"{case}: connection still open"
    finally:
        fe.close()
    assert any("closing the connection" in r.getMessage() for r in caplog.records)
    fe = server.connect()                      # the server lives on
    try:
        fe.handshake()
        assert fe.write(0, b"z" * 512) == 0
    finally:
        fe.close()


def test_broken_ring_stops_the_device_not_the_server(server, caplog):
    """A descriptor table that runs out of guest RAM: the device is stopped
    (one log line, the error eventfd written), the connection stays, and a
    reset brings it back."""
    fe = server.connect()
    try:
        err = os.eventfd(0, os.EFD_NONBLOCK)
        fe.handshake()
        fe.send(V.SET_VRING_ERR, V.U64.pack(0), [err])
        fe.get_vring_base()
        ua = 0x7F00_0000_0000   # the front-end's address of guest RAM
        fe.send(V.SET_VRING_ADDR, V.ADDR.pack(0, 0, ua + fe.mem_size - 16, ua + 0x2000,
                                              ua + 0x3000, 0))
        fe.send(V.SET_VRING_KICK, V.U64.pack(0), [fe.kick])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                assert os.eventfd_read(err) >= 1
                break
            except BlockingIOError:
                time.sleep(0.01)
        else:
            pytest.fail("error eventfd not written")
        assert any("area-outside-ram" in r.getMessage() for r in caplog.records)
        assert not fe.closed_by_backend(0.1)
        fe.send(V.RESET_DEVICE)
        fe.vq = type(fe.vq)(fe.mem, fe.queue_size, base=0x1000)
        fe.handshake()
        assert fe.write(0, b"r" * 512) == 0
        os.close(err)
    finally:
        fe.close()


# -- `pykvm serve`, the process -----------------------------------------------------

def _serve(tmp_path, opts=""):
    img = tmp_path / "disk.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(DISK)
    sock = tmp_path / "serve.sock"
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "serve", "--vhost-user-blk", str(sock),
                          "--disk", f"file={img}{opts}"], stderr=subprocess.PIPE, cwd=ROOT)
    return p, str(sock), img


@pytest.mark.parametrize("args,mode", [([], 0o600), (["--socket-mode", "0660"], 0o660),
                                       (["--socket-mode", "600"], 0o600),
                                       (["--socket-mode", "0"], 0o000)])
def test_serve_socket_mode(tmp_path, args, mode):
    """The socket is 0600 (only this user may connect) unless --socket-mode says
    otherwise, whatever the umask the server was started with."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(DISK))
    sock = tmp_path / "serve.sock"
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "serve", "--vhost-user-blk", str(sock),
                          "--disk", f"file={img}", *args], stderr=subprocess.PIPE, cwd=ROOT,
                         preexec_fn=lambda: os.umask(0o000))
    try:
        line = p.stderr.readline().decode()   # printed once the socket is listening
        assert line.startswith("pykvm: serving "), line + p.stderr.read().decode()
        assert os.stat(sock).st_mode & 0o777 == mode
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


@pytest.mark.parametrize("value", ["rw", "0999", "1777", "-1"])
def test_serve_bad_socket_mode_is_one_line(tmp_path, value):
    r = subprocess.run([sys.executable, "-m", "pykvm", "serve", "--vhost-user-blk",
                        str(tmp_path / "s.sock"), "--disk", f"file={tmp_path}/d.img",
                        "--socket-mode", value], capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --socket-mode: want an octal mode" in lines[0], r.stderr


def test_serve_exits_cleanly_on_sigterm(tmp_path):
    p, sock, _ = _serve(tmp_path)
    try:
        fe = Frontend.connect(sock)
        fe.handshake()
        assert fe.write(0, b"t" * 512) == 0
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert time.monotonic() - t0 < 5
        assert not os.path.exists(sock)
        fe.close()
    finally:
        p.kill()
        p.wait()


def test_serve_killed_and_restarted_loses_no_completed_write(tmp_path):
    """SIGKILL while writes are in flight, a new server on the same socket,
    the same front-end state (memory, ring, inflight region) reconnecting:
    every write completes, and each one the guest saw complete is on disk."""
    # writethrough: each write waits for its flush, so many are in flight
    # and 128 KiB each, so that they take a while
    p, sock, img = _serve(tmp_path, ",cache=writethrough")
    fe = Frontend.connect(sock, mem_size=16 << 20)
    bs = 128 << 10
    try:
        fe.handshake()
        blocks = {i: os.urandom(bs) for i in range(48)}
        heads = {}
        for i, data in blocks.items():
            heads[fe.add_request(T_OUT, i * bs // 512, data=data)[0]] = i
        fe.vq.publish()
        os.eventfd_write(fe.kick, 1)
        # the kill lands once the server has taken requests (not once some
        # completed: on a fast host all 48 could be done by then)
        deadline = time.monotonic() + 10
        while not _inflight_heads(fe) and time.monotonic() < deadline:
            time.sleep(0.0002)
        p.kill()
        p.wait()
        completed_before = {h for h, _ in fe.vq.used()}
        taken = _inflight_heads(fe)
        # the kill landed with requests taken and not returned (writethrough
        # keeps each one waiting for its flush), and the region agrees with
        # the used ring
        assert taken and not taken & completed_before
        p, sock, _ = _serve(tmp_path, ",cache=writethrough")
        fe.sock.close()
        fe.sock = Frontend.connect(sock).sock
        fe.handshake(inflight_fd=fe.inflight_fd, base=fe.vq.used_idx())
        deadline = time.monotonic() + 10
        while len(fe.vq.used()) < len(blocks) and time.monotonic() < deadline:
            os.eventfd_write(fe.kick, 1)
            time.sleep(0.01)
        used = [h for h, _ in fe.vq.used()]
        assert sorted(used) == sorted(heads), "every request completes exactly once"
        assert completed_before <= set(used)
        for i, data in blocks.items():
            assert fe.read(i * bs // 512, bs) == (0, data)
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        p.kill()
        p.wait()
        fe.close()


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: (tmp / "notasocket").write_text("x"), "exists and is not a socket"),
    (lambda tmp: None, "No such file"),
])
def test_serve_user_errors_are_one_line(tmp_path, setup, message):
    setup(tmp_path)
    sock = tmp_path / "notasocket"
    disk = tmp_path / ("disk.img" if message != "No such file" else "missing.img")
    if message != "No such file":
        disk.write_bytes(bytes(4096))
    r = subprocess.run([sys.executable, "-m", "pykvm", "serve", "--vhost-user-blk", str(sock),
                        "--disk", f"file={disk}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvm: ") and message in lines[0], r.stderr
