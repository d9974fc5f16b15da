"""A small NBD server that misbehaves on purpose, for the client's bad-input
tests (tests/block/test_nbd_hostile.py).

Fixed newstyle handshake, OPT_GO, simple replies for read, write, flush; with
``structured=True`` also structured replies and ``base:allocation`` block
status. The export is a bytearray. ``mode`` picks what goes wrong once the
transmission phase starts:

  ok              nothing
  bad-magic       every read reply starts with a wrong magic
  wrong-handle    every read reply names a handle that was never sent
  hang-mid-reply  a read reply's header and half its data, then nothing
  huge-extent     block status describes one extent of 4 GiB - 512 bytes
  bad-handshake   the greeting's magic is wrong

Served on a Unix socket in a thread; every connection gets its own thread.
"""
from __future__ import annotations

import socket
import struct
import threading

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
FLAG_HAS_FLAGS, FLAG_SEND_FLUSH = 1, 4
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_BLOCK_STATUS = 0, 1, 5
CONTEXT_ID = 1


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            raise ConnectionError("client went")
        buf += got
    return buf


class HostileServer:
    def __init__(self, path: str, size: int = 1 << 20, mode: str = "ok",
                 structured: bool = False):
        self.path = path
        self.data = bytearray(size)
        self.mode = mode
        self.structured = structured
        self.connections = 0
        self.requests: list[tuple[int, int, int]] = []   # (type, offset, length)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._handshake(conn):
                self._transmission(conn)
        except (ConnectionError, OSError):
            pass

    # -- handshake -------------------------------------------------------------------

    def _opt_reply(self, conn, opt: int, kind: int, payload: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, kind, len(payload)) + payload)

    def _handshake(self, conn) -> bool:
        magic = NBDMAGIC ^ 1 if self.mode == "bad-handshake" else NBDMAGIC
        conn.sendall(struct.pack(">QQH", magic, IHAVEOPT, 1 | 2))   # FIXED_NEWSTYLE | NO_ZEROES
        _recv(conn, 4)                                                # client flags
        self.structured_on = False
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
            data = _recv(conn, length)
            if opt == OPT_STRUCTURED_REPLY and self.structured:
                self.structured_on = True
                self._opt_reply(conn, opt, REP_ACK)
            elif opt == OPT_SET_META_CONTEXT and self.structured_on:
                (nlen,) = struct.unpack_from(">I", data)
                pos = 4 + nlen
                (count,) = struct.unpack_from(">I", data, pos)
                pos += 4
                for _ in range(count):
                    (qlen,) = struct.unpack_from(">I", data, pos)
                    query = data[pos + 4:pos + 4 + qlen]
                    pos += 4 + qlen
                    if query == b"base:allocation":
                        self._opt_reply(conn, opt, REP_META_CONTEXT,
                                        struct.pack(">I", CONTEXT_ID) + query)
                self._opt_reply(conn, opt, REP_ACK)
            elif opt == OPT_GO:
                flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH
                self._opt_reply(conn, opt, REP_INFO, struct.pack(">HQH", 0, len(self.data),
                                                                 flags))
                self._opt_reply(conn, opt, REP_ACK)
                return True
            elif opt == OPT_ABORT:
                self._opt_reply(conn, opt, REP_ACK)
                return False
            else:
                self._opt_reply(conn, opt, REP_ERR_UNSUP)

    # -- transmission ----------------------------------------------------------------

    def _transmission(self, conn) -> None:
        while True:
            magic, _flags, kind, handle, offset, length = struct.unpack(">IHHQQI",
                                                                        _recv(conn, 28))
            if magic != REQUEST_MAGIC:
                return
            self.requests.append((kind, offset, length))
            if kind == CMD_DISC:
                return
            if kind == CMD_WRITE:
                self.data[offset:offset + length] = _recv(conn, length)
                conn.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle))
            elif kind == CMD_FLUSH:
                conn.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle))
            elif kind == CMD_READ:
                self._read(conn, handle, offset, length)
            elif kind == CMD_BLOCK_STATUS:
                self._block_status(conn, handle, offset, length)
            else:
                conn.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 22, handle))   # EINVAL

    def _read(self, conn, handle: int, offset: int, length: int) -> None:
        payload = bytes(self.data[offset:offset + length])
        if self.mode == "wrong-handle":
            handle ^= 0x5A5A5A5A
        if self.structured_on:
            head = struct.pack(">IHHQIQ", STRUCTURED_MAGIC, REPLY_FLAG_DONE,
                               REPLY_TYPE_OFFSET_DATA, handle, 8 + length, offset)
        else:
            head = struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle)
        if self.mode == "bad-magic":
            head = b"\xde\xad\xbe\xef" + head[4:]
        if self.mode == "hang-mid-reply":
            conn.sendall(head + payload[:length // 2])
            self._stop.wait()          # nothing more, until the test ends
            return
        conn.sendall(head + payload)

    def _block_status(self, conn, handle: int, offset: int, length: int) -> None:
        if self.mode == "huge-extent":
            extents = [(0xFFFFFE00, 0)]
        else:
            extents = [(length, 0)]
        payload = struct.pack(">I", CONTEXT_ID) + b"".join(struct.pack(">II", n, f)
                                                          for n, f in extents)
        conn.sendall(struct.pack(">IHHQI", STRUCTURED_MAGIC, REPLY_FLAG_DONE,
                                 REPLY_TYPE_BLOCK_STATUS, handle, len(payload)) + payload)
