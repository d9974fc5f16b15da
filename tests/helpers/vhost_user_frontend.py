"""A vhost-user front-end in Python, for tests: plays QEMU's part against our back-end.

Guest RAM is a memfd (shared with the back-end by SET_MEM_TABLE) that the test
sees through ``FdMemory``; a ``MockVirtq`` lays out the queue in it and builds
virtio-blk requests, the front-end kicks and waits for the call eventfd.

    fe = Frontend.connect(path)
    fe.handshake()                      # features, memory, one ring, enabled
    fe.write(0, b"x" * 4096); fe.read(0, 4096)
"""
from __future__ import annotations

import array
import os
import select
import socket
import struct
import time

from pykvm.memory import FdMemory
from pykvm.virtio.transport import vhost_user as V
from tests.helpers.mock_virtq import MockVirtq

UADDR_BASE = 0x7F00_0000_0000   # where the "front-end" pretends guest RAM is mapped
REQ = struct.Struct("<IIQ")


class Frontend:
    def __init__(self, sock: socket.socket, mem_size: int = 4 << 20, queue_size: int = 256):
        self.sock = sock
        self.mem_size = mem_size
        self.memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self.mem = FdMemory([(0, mem_size, self.memfd, 0)])
        self.queue_size = queue_size
        self.vq = MockVirtq(self.mem, queue_size, base=0x1000)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.inflight_fd = None
        self.inflight_size = 0
        self.features = 0
        self.data_base = 1 << 20     # request headers, data and status bytes from here
        self._next = self.data_base

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, **kw) -> "Frontend":
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return cls(s, **kw)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, self.kick, self.call):
            os.close(fd)
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)

    # -- messages -------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds=(), flags: int = V.VERSION) -> None:
        data = V.HEADER.pack(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv(self, timeout: float = 10.0) -> tuple[int, bytes, list[int]]:
        r, _, _ = select.select([self.sock], [], [], timeout)
        assert r, "no reply from the back-end"
        fds = array.array("i")
        data, anc, _, _ = self.sock.recvmsg(V.HEADER.size, socket.CMSG_SPACE(4 * 8))
        if not data:
            raise ConnectionError("back-end closed the connection")
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob)
        request, flags, size = V.HEADER.unpack(data)
        assert flags == V.VERSION | V.FLAG_REPLY, f"reply flags {flags:#x}"
        payload = b""
        while len(payload) < size:
            payload += self.sock.recv(size - len(payload))
        return request, payload, list(fds)

    def call_u64(self, request: int) -> int:
        self.send(request)
        req, payload, _ = self.recv()
        assert req == request
        return V.U64.unpack(payload)[0]

    def closed_by_backend(self, timeout: float = 5.0) -> bool:
        """True once the back-end has closed the connection (EOF)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    # -- set-up ---------------------------------------------------------------

    def handshake(self, *, inflight: bool = True, event_idx: bool = True,
                  inflight_fd: int | None = None, base: int = 0) -> None:
        offered = self.call_u64(V.GET_FEATURES)
        assert offered & V.F_PROTOCOL_FEATURES
        self.send(V.SET_OWNER)
        proto = self.call_u64(V.GET_PROTOCOL_FEATURES)
        want = proto & (V.PF_MQ | V.PF_CONFIG | V.PF_REPLY_ACK |
                        (V.PF_INFLIGHT_SHMFD if inflight else 0))
        self.send(V.SET_PROTOCOL_FEATURES, V.U64.pack(want))
        assert self.call_u64(V.GET_QUEUE_NUM) == 1
        if inflight:
            if inflight_fd is None:
                self.get_inflight_fd()
            self.send(V.SET_INFLIGHT_FD,
                      V.INFLIGHT.pack(self.inflight_size, 0, 1, self.queue_size),
                      [self.inflight_fd])
        features = offered & ((1 << 32) | (1 << 28) | (1 << 9) | (1 << 13) | (1 << 14)
                              | (1 << 11) | V.F_PROTOCOL_FEATURES | ((1 << 29) if event_idx else 0))
        self.features = features
        self.send(V.SET_FEATURES, V.U64.pack(features))
        self.send_mem_table()
        self.setup_ring(base=base)

    def get_inflight_fd(self) -> None:
        """GET_INFLIGHT_FD for our one queue: the region the back-end records in."""
        self.send(V.GET_INFLIGHT_FD, V.INFLIGHT.pack(0, 0, 1, self.queue_size))
        _, payload, fds = self.recv()
        assert len(fds) == 1
        self.inflight_fd, self.inflight_size = fds[0], V.INFLIGHT.unpack(payload)[0]

    def send_mem_table(self, wait: bool = True) -> None:
        """SET_MEM_TABLE; with ``wait``, asks for and checks the REPLY_ACK."""
        payload = struct.pack("=II", 1, 0) + V.REGION.pack(0, self.mem_size, UADDR_BASE, 0)
        self.send(V.SET_MEM_TABLE, payload, [self.memfd],
                  flags=V.VERSION | (V.FLAG_NEED_REPLY if wait else 0))
        if not wait:
            return
        req, payload, _ = self.recv()
        assert req == V.SET_MEM_TABLE and V.U64.unpack(payload)[0] == 0

    def setup_ring(self, base: int = 0) -> None:
        vq = self.vq
        self.send(V.SET_VRING_NUM, V.STATE.pack(0, self.queue_size))
        self.send(V.SET_VRING_BASE, V.STATE.pack(0, base))
        self.send(V.SET_VRING_ADDR, V.ADDR.pack(0, 0, UADDR_BASE + vq.desc_table, UADDR_BASE + vq.used_ring,
                                                UADDR_BASE + vq.avail_ring, 0))
        self.send(V.SET_VRING_KICK, V.U64.pack(0), [self.kick])
        self.send(V.SET_VRING_CALL, V.U64.pack(0), [self.call])
        self.send(V.SET_VRING_ENABLE, V.STATE.pack(0, 1))

    def get_vring_base(self) -> int:
        self.send(V.GET_VRING_BASE, V.STATE.pack(0, 0))
        req, payload, _ = self.recv()
        assert req == V.GET_VRING_BASE
        return V.STATE.unpack(payload)[1]

    def get_config(self, offset: int = 0, size: int = 60) -> bytes:
        self.send(V.GET_CONFIG, V.CONFIG_HDR.pack(offset, size, 0) + bytes(size))
        _, payload, _ = self.recv()
        return payload[V.CONFIG_HDR.size:] if payload else b""

    # -- requests ---------------------------------------------------------------

    def _alloc(self, n: int) -> int:
        gpa = (self._next + 15) & ~15
        if gpa + n > self.mem_size:
            gpa = self.data_base
        self._next = gpa + n
        return gpa

    def add_request(self, rtype: int, sector: int, data: bytes | None = None,
                    read_len: int = 0) -> tuple[int, int, int]:
        """Queue one request (not published); returns (head, data gpa, status gpa)."""
        hdr = self._alloc(16)
        self.mem.write(hdr, REQ.pack(rtype, 0, sector))
        bufs = [(hdr, 16, False)]
        dgpa = 0
        if data is not None:
            dgpa = self._alloc(len(data))
            self.mem.write(dgpa, data)
            bufs.append((dgpa, len(data), False))
        elif read_len:
            dgpa = self._alloc(read_len)
            bufs.append((dgpa, read_len, True))
        status = self._alloc(1)
        self.mem.write(status, b"\xff")
        bufs.append((status, 1, True))
        head = self.vq.add_chain(bufs)
        return head, dgpa, status

    def kick_and_wait(self, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Publish, kick, and collect ``count`` used elements."""
        self.vq.publish()
        os.eventfd_write(self.kick, 1)
        done = []
        deadline = time.monotonic() + timeout
        while len(done) < count:
            done += self.vq.reap()
            if len(done) >= count:
                break
            left = deadline - time.monotonic()
            assert left > 0, f"{len(done)} of {count} requests completed"
            select.select([self.call], [], [], min(left, 0.05))
            try:
                os.eventfd_read(self.call)
            except BlockingIOError:
                pass
        return done

    def write(self, sector: int, data: bytes) -> int:
        _, _, status = self.add_request(1, sector, data=data)
        self.kick_and_wait(1)
        return self.mem.read(status, 1)[0]

    def read(self, sector: int, length: int) -> tuple[int, bytes]:
        _, dgpa, status = self.add_request(0, sector, read_len=length)
        self.kick_and_wait(1)
        return self.mem.read(status, 1)[0], self.mem.read(dgpa, length)
