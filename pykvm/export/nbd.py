"""An NBD server over a BlockBackend (``pykvm serve --nbd``).

The protocol is the NBD project's doc/proto.md, fixed newstyle only (a client
that does not answer NBD_FLAG_C_FIXED_NEWSTYLE is refused; oldstyle is never
offered). One export, named by ``name``.

Handshake (every byte the client sends is hostile and checked once, here):
  S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
  C: u32 client flags (an unknown bit, or no FIXED_NEWSTYLE: the connection is closed)
  C: options, each "IHAVEOPT" u32 option u32 length + data; S: replies
     (magic 0x3e889045565a9, u32 option, u32 type, u32 length + data)
  EXPORT_NAME, GO: transmission begins; INFO, LIST, ABORT, STRUCTURED_REPLY,
  LIST_META_CONTEXT, SET_META_CONTEXT (base:allocation, qemu:allocation-depth)
  are answered; any other option NBD_REP_ERR_UNSUP.

Transmission: requests (magic 0x25609513, u16 flags, u16 type, u64 cookie,
u64 offset, u32 length, then the payload of a WRITE) are read while earlier
ones are in flight on the backend; each crosses into the backend as an integer
token mapped back in ``_reqs``, and its reply goes out when it completes, in
any order (the cookie names it). Simple replies, or structured ones once
negotiated (reads as OFFSET_DATA / OFFSET_HOLE chunks, errors as ERROR chunks
with a message, BLOCK_STATUS).

Bounds: payload lengths are checked against the maximum block size (32 MiB)
before anything is allocated; a connection stops reading requests while the
bytes of its requests in flight and of its unsent replies pass
MAX_INFLIGHT_BYTES, so a client that sends without reading gets backpressure
from its own socket, never the server's memory. A request the protocol names
an error for gets that error; a client that breaks the framing (a bad magic,
an option too long to hold) is disconnected with one log line; the other
connections go on.

One thread runs the event loop (epoll) for the listening socket, every
connection and the backend's notifier: all connections share one backend, so a
flush on any of them covers every write completed before it
(NBD_FLAG_CAN_MULTI_CONN is then true).
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import stat
import struct
import time

from ..errors import ConfigError
from ..block.driver import BlockDriver
from ..block.file import FileDriver
from ..block.raw import RawDriver

log = logging.getLogger("pykvm.export")

# -- protocol values (doc/proto.md, "Values") ------------------------------------------

NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9           # option replies
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0            # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0          # client flags
FLAG_C_NO_ZEROES = 1 << 1

FLAG_HAS_FLAGS = 1 << 0                 # transmission flags
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_FAST_ZERO = 1 << 11

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE = 1 << 0                     # base:allocation
STATE_ZERO = 1 << 1

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# a backend's -errno as the protocol's error values (anything else is EIO)
_ERRNO = {errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
          errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.EINVAL: NBD_EINVAL,
          errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
          errno.EOVERFLOW: NBD_EOVERFLOW, errno.EOPNOTSUPP: NBD_ENOTSUP,
          errno.ESHUTDOWN: NBD_ESHUTDOWN}

CONTEXTS = {"base:allocation": 1, "qemu:allocation-depth": 2}

MAX_BLOCK = 32 << 20                    # NBD_INFO_BLOCK_SIZE maximum (and payload bound)
PREFERRED_BLOCK = 4096
MAX_OPTION = 64 << 10                   # longer option data: the client is disconnected
MAX_NAME = 4096                         # the spec's limit on export names and queries
MAX_INFLIGHT_BYTES = 64 << 20           # per connection: reads, writes, unsent replies
MAX_EXTENTS = 16384                     # BLOCK_STATUS descriptors in one reply
SPARSE_READ_MIN = 64 << 10              # structured reads this big send holes as holes
POOL_MIN = 64 << 10                     # buffers this big are kept for reuse ...
POOL_BYTES = 64 << 20                   # ... up to this many bytes in all
HANDSHAKE_LIMIT = 10.0                  # seconds, as qemu-nbd's --handshake-limit default
RBUF = 256 << 10

_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_DATA = struct.Struct(">IHHQIQ")
_OPT_REPLY = struct.Struct(">QIII")
_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush",
          CMD_TRIM: "trim", CMD_WRITE_ZEROES: "write-zeroes", CMD_BLOCK_STATUS: "block-status"}
_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}


class _Close(Exception):
    """The connection must end; ``str()`` is the log line (empty: a quiet end)."""


# -- addresses ---------------------------------------------------------------------------

def parse_addr(addr: str):
    """``unix:PATH`` -> ("unix", PATH); ``HOST:PORT`` or ``[V6]:PORT`` -> ("tcp", (host, port))."""
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ConfigError(f"--nbd {addr}: no socket path after 'unix:'")
        return "unix", path
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--nbd {addr}: not unix:PATH or HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return "tcp", (host or "0.0.0.0", int(port))


def listen(addr: str, mode: int = 0o600, backlog: int = 16) -> socket.socket:
    """A listening socket for ``addr`` (parse_addr). A Unix socket replaces a
    stale one and is created ``mode`` (never wider than 0600 while it is bound)."""
    kind, where = parse_addr(addr)
    if kind == "unix":
        try:
            st = os.stat(where)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"--nbd {addr}: {where} exists and is not a socket")
            os.unlink(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 & ~(mode & 0o600))
        try:
            sock.bind(where)
            os.chmod(where, mode)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--nbd {addr}: cannot listen: {e.strerror}") from None
        finally:
            os.umask(old)
    else:
        host, port = where
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise ConfigError(f"--nbd {addr}: {e.strerror}") from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--nbd {addr}: cannot listen: {e.strerror}") from None
    sock.listen(backlog)
    return sock


# -- block status ------------------------------------------------------------------------

def block_status(drv: BlockDriver, offset: int, length: int, depth: int = 1):
    """(offset, length, base:allocation flags, allocation depth) runs of the
    graph below ``drv`` over [offset, offset+length), from the nodes' own views
    (SEEK_DATA/SEEK_HOLE of a raw file, ``map()`` of a format, down its backing
    chain), as ``pykvm img map`` reads them; no data is read. Depth 0:
    allocated nowhere in the chain."""
    inside = max(0, min(offset + length, drv.size) - offset)
    if isinstance(drv, (RawDriver, FileDriver)):
        for off, n, data in drv.allocated(offset, inside):
            yield off, n, 0 if data else STATE_HOLE | STATE_ZERO, depth
    else:
        for e in drv.map(offset, inside):
            if e.kind in ("data", "compressed"):
                yield e.offset, e.length, 0, depth
            elif e.kind == "zero":
                yield e.offset, e.length, STATE_HOLE | STATE_ZERO, depth
            elif drv.backing is not None:
                yield from block_status(drv.backing, e.offset, e.length, depth + 1)
            else:
                yield e.offset, e.length, STATE_HOLE | STATE_ZERO, 0
    if inside < length:             # a backing file shorter than its overlay: zeroes
        yield offset + inside, length - inside, STATE_HOLE | STATE_ZERO, 0


def _runs(drv, offset: int, length: int, one: bool):
    """Merged [offset, length, flags, depth] runs from ``offset``, at most
    MAX_EXTENTS of them (or one), looked up a window at a time."""
    out: list = []
    pos, end = offset, offset + length
    window = 64 << 20 if one else 1 << 30
    while pos < end and len(out) < MAX_EXTENTS:
        n = min(window, end - pos)
        for off, ln, flags, depth in block_status(drv, pos, n):
            if ln <= 0:
                continue
            if out and out[-1][2] == flags and out[-1][3] == depth and \
                    out[-1][0] + out[-1][1] == off:
                out[-1][1] += ln
            else:
                out.append([off, ln, flags, depth])
        pos += n
        if one and out and (len(out) > 1 or out[0][0] + out[0][1] < pos):
            break
    return out


def _descriptors(runs, field: int, one: bool) -> list[tuple[int, int]]:
    """(length, value) descriptors of one context (field 2: flags, 3: depth)."""
    out: list = []
    for r in runs:
        if out and out[-1][1] == r[field]:
            out[-1][0] += r[1]
        else:
            if one and out:
                break
            out.append([r[1], r[field]])
    return out[:MAX_EXTENTS]


# -- connections -------------------------------------------------------------------------

class _Conn:
    __slots__ = ("sock", "fd", "peer", "rbuf", "rview", "rpos", "rlen", "hs", "need", "tx",
                 "structured", "contexts", "no_zeroes", "out", "out_bytes", "inflight",
                 "inflight_bytes", "events", "payload", "payload_view", "payload_got",
                 "payload_req", "skip", "disc", "closed", "deadline", "errors", "queued",
                 "sent", "release")

    def __init__(self, sock, peer: str):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.rbuf = bytearray(RBUF)
        self.rview = memoryview(self.rbuf)
        self.rpos = self.rlen = 0
        self.hs = None              # the negotiation generator
        self.need = 0               # bytes it waits for
        self.tx = False             # in transmission
        self.structured = False
        self.contexts: list[int] = []
        self.no_zeroes = False
        self.out: collections.deque = collections.deque()
        self.out_bytes = 0
        self.inflight = 0
        self.inflight_bytes = 0
        self.events = 0
        self.payload = None         # a WRITE's buffer being received
        self.payload_view = None
        self.payload_got = 0
        self.payload_req = None
        self.skip = 0               # payload bytes of a refused WRITE still to drop
        self.disc = False
        self.closed = False
        self.deadline = time.monotonic() + HANDSHAKE_LIMIT
        self.errors = 0
        self.queued = 0             # bytes ever queued for sending, and sent
        self.sent = 0
        self.release: collections.deque = collections.deque()   # (queued mark, pooled buffer)


class _Req:
    __slots__ = ("conn", "cookie", "cmd", "flags", "offset", "length", "buf", "then_flush",
                 "holes", "cost")

    def __init__(self, conn, cookie, cmd, flags, offset, length, buf=None, cost=0):
        self.conn = conn
        self.cookie = cookie
        self.cmd = cmd
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buf = buf
        self.then_flush = False
        self.holes = None
        self.cost = cost


class NbdServer:
    """Serve ``backend`` as the export ``name`` on the listening socket
    ``listener`` (listen()). ``shared``: connections at once (qemu-nbd's -e; 0: any number;
    more wait in the listen backlog); ``persistent``: keep serving after the
    last client leaves (qemu-nbd's -t; without it serve_forever returns once a
    client has come and every client has gone). ``read_only``: refuse every
    change (NBD_EPERM), whatever the backend allows."""

    def __init__(self, backend, listener: socket.socket, name: str = "",
                 read_only: bool = False, shared: int = 1, persistent: bool = False,
                 description: str = ""):
        if len(name.encode()) > MAX_NAME:
            raise ConfigError(f"--export-name: longer than {MAX_NAME} bytes")
        if shared < 0:
            raise ConfigError(f"--shared {shared}: must be 0 (no limit) or more")
        self.backend = backend
        self.listener = listener
        self.listener.setblocking(False)
        self.name = name
        self.description = description
        self.read_only = read_only or backend.read_only
        self.shared = shared or 1 << 30
        self.persistent = persistent
        self.size = backend.size
        self.min_block = max(1, backend.align)
        self.conns: dict[int, _Conn] = {}
        self.served = 0             # connections accepted so far
        self._reqs: dict[int, _Req] = {}
        self._next = 1
        self._dirty: set = set()
        self._listening = False
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._stop_fd, select.EPOLLIN)
        self._ep.register(backend.notifier, select.EPOLLIN)
        self._listen(True)
        drv = backend.driver
        # FAST_ZERO can be honoured where zeroing is a file-system call (raw on a
        # file: punch or zero range) or a metadata change (qcow2 clusters)
        self._zero_granule = getattr(drv, "cluster_size", 0) if not drv.identity_mapped else 1
        self.counters = collections.Counter()
        # large buffers come back here once their reply is sent (or their write
        # done): a fresh 1 MiB bytearray is an mmap and 256 page faults each time
        self._pool: dict[int, list] = {}
        self._pooled = 0

    def _buffer(self, n: int) -> bytearray:
        if n >= POOL_MIN:
            free = self._pool.get(n)
            if free:
                self._pooled -= n
                return free.pop()
        return bytearray(n)

    def _give_back(self, buf) -> None:
        n = len(buf)
        if n >= POOL_MIN and self._pooled + n <= POOL_BYTES:
            self._pool.setdefault(n, []).append(buf)
            self._pooled += n

    # -- flags -----------------------------------------------------------------------

    def transmission_flags(self, conn: _Conn) -> int:
        f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA
        if self.read_only:
            f |= FLAG_READ_ONLY
        else:
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
            if self._zero_granule:
                f |= FLAG_SEND_FAST_ZERO
        if conn.structured:
            f |= FLAG_SEND_DF
        # one backend under every connection: a flush on one covers the writes
        # all of them completed. Only with room for more than one connection
        # (as qemu-nbd): a client that opens several (nbdcopy) would otherwise
        # wait for the ones kept in the backlog, forever.
        if self.shared > 1:
            f |= FLAG_CAN_MULTI_CONN
        return f

    # -- loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask serve_forever to return (async-signal-safe: one write)."""
        os.eventfd_write(self._stop_fd, 1)

    def serve_forever(self) -> None:
        while self.step():
            pass

    def step(self, timeout=-1) -> bool:
        """One turn of the event loop: wait up to ``timeout`` seconds (None:
        until something happens; the default: 1 s while a handshake runs, else
        None), handle what is ready. False once serve_forever must return
        (stop(), or without ``persistent`` the last client gone)."""
        if timeout == -1:
            timeout = self._timeout()
        try:
            events = self._ep.poll(timeout)
        except InterruptedError:
            return True
        notifier = self.backend.notifier
        lfd = self.listener.fileno()
        for fd, ev in events:
            if fd == notifier:
                self._reap()
            elif fd == lfd:
                self._accept()
            elif fd == self._stop_fd:
                return False
            else:
                c = self.conns.get(fd)
                if c is None:
                    continue
                self._dirty.add(c)      # its epoll interest is looked at again
                try:
                    if ev & select.EPOLLOUT:
                        self._send(c)
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and \
                            not c.closed:
                        self._readable(c)
                except _Close as e:
                    self._close(c, str(e))
        self._flush_dirty()
        if timeout is not None:
            self._expire()
        return self.persistent or not self.served or bool(self.conns)

    def _timeout(self):
        if any(not c.tx for c in self.conns.values()):
            return 1.0
        return None

    def _expire(self) -> None:
        now = time.monotonic()
        for c in list(self.conns.values()):
            if not c.tx and now > c.deadline:
                self._close(c, f"handshake not done in {HANDSHAKE_LIMIT:g} s")

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._ep.register(self.listener.fileno(), select.EPOLLIN)
        elif not on and self._listening:
            self._ep.unregister(self.listener.fileno())
        self._listening = on

    def _accept(self) -> None:
        while len(self.conns) < self.shared:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("nbd: accept: %s", e.strerror)
                break
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = "unix socket"
            c = _Conn(sock, peer)
            self.conns[c.fd] = c
            self.served += 1
            log.info("nbd: client %s connected", peer)
            c.events = select.EPOLLIN
            self._ep.register(c.fd, c.events)
            c.hs = self._negotiate(c)
            c.need = next(c.hs)
            self._dirty.add(c)
        if len(self.conns) >= self.shared:
            self._listen(False)

    def _close(self, c: _Conn, why: str = "") -> None:
        if c.closed:
            return
        if why:
            log.warning("nbd: client %s: %s; disconnected", c.peer, why)
        else:
            log.info("nbd: client %s disconnected", c.peer)
        c.closed = True
        c.out.clear()
        c.out_bytes = 0
        while c.release:                # what sendmsg took, the kernel has copied
            self._give_back(c.release.popleft()[1])
        self._dirty.discard(c)
        try:
            self._ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()
        del self.conns[c.fd]
        # its requests still in flight keep their buffers in _reqs until the
        # backend completes them; their replies are dropped
        if len(self.conns) < self.shared:
            self._listen(True)

    def _update(self, c: _Conn) -> None:
        """epoll interest: read unless paused, write while replies wait."""
        want = 0
        if not c.disc and (c.inflight_bytes + c.out_bytes) < MAX_INFLIGHT_BYTES:
            want |= select.EPOLLIN
        if c.out:
            want |= select.EPOLLOUT
        if want != c.events:
            c.events = want
            self._ep.modify(c.fd, want)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for c in dirty:
            if c.closed:
                continue
            try:
                self._send(c)
                if c.disc and not c.out and not c.inflight:
                    raise _Close("")
                if c.tx and not c.disc and c.rlen > c.rpos and self._may_read(c):
                    self._parse(c)          # requests left in the buffer when paused
                    self._send(c)
                self._update(c)
            except _Close as e:
                self._close(c, str(e))

    # -- output ------------------------------------------------------------------------

    def _queue(self, c: _Conn, *bufs) -> None:
        if c.closed:
            return
        out = c.out
        for b in bufs:
            if not len(b):
                continue        # (sendmsg of nothing but empty buffers sends 0: no progress)
            out.append(b)
            c.out_bytes += len(b)
            c.queued += len(b)
        self._dirty.add(c)

    def _send(self, c: _Conn) -> None:
        out = c.out
        while out:
            bufs = [out[i] for i in range(min(len(out), 256))]
            try:
                n = c.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise _Close(f"send: {e.strerror}" if e.errno not in
                             (errno.EPIPE, errno.ECONNRESET) else "") from None
            c.out_bytes -= n
            c.sent += n
            rel = c.release
            while rel and rel[0][0] <= c.sent:
                self._give_back(rel.popleft()[1])
            while n:
                b = out[0]
                ln = len(b)
                if n >= ln:
                    out.popleft()
                    n -= ln
                else:
                    out[0] = memoryview(b)[n:]
                    n = 0

    # -- input -------------------------------------------------------------------------

    def _may_read(self, c: _Conn) -> bool:
        return not c.disc and c.inflight_bytes + c.out_bytes < MAX_INFLIGHT_BYTES

    def _readable(self, c: _Conn) -> None:
        for _ in range(16):             # then the other connections get their turn
            if c.closed or not self._may_read(c):
                break
            if c.payload is not None and c.rpos == c.rlen:
                left = c.payload_req.length - c.payload_got
                try:
                    n = c.sock.recv_into(c.payload_view[c.payload_got:], left)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    raise _Close(f"recv: {e.strerror}") from None
                if n == 0:
                    raise _Close("end of stream inside a write's payload")
                c.payload_got += n
                if c.payload_got == c.payload_req.length:
                    self._write_received(c)
                continue
            if c.rpos == c.rlen:
                c.rpos = c.rlen = 0
            elif c.rlen == RBUF:
                left = c.rlen - c.rpos
                c.rbuf[:left] = c.rview[c.rpos:c.rlen]
                c.rpos, c.rlen = 0, left
            if c.rlen == RBUF:
                break                       # a full buffer waits for its parser
            try:
                n = c.sock.recv_into(c.rview[c.rlen:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise _Close(f"recv: {e.strerror}" if e.errno != errno.ECONNRESET else "") \
                    from None
            if n == 0:
                if c.tx and c.rpos == c.rlen and c.payload is None and not c.skip:
                    raise _Close("")        # hung up between requests (no DISC)
                raise _Close("end of stream inside a message" if c.tx or c.rlen > c.rpos
                             else "")
            c.rlen += n
            if c.tx:
                self._parse(c)
            else:
                self._handshake(c)
        self._dirty.add(c)

    def _handshake(self, c: _Conn) -> None:
        while not c.tx and not c.disc and c.rlen - c.rpos >= c.need:
            data = bytes(c.rview[c.rpos:c.rpos + c.need])
            c.rpos += c.need
            try:
                c.need = c.hs.send(data)
            except StopIteration:
                c.tx = True
                c.hs = None
                log.info("nbd: client %s: transmission (%s)", c.peer,
                         "structured replies" if c.structured else "simple replies")
        if c.tx:
            self._parse(c)
        elif not c.disc and c.need > RBUF:
            raise _Close(f"option of {c.need} bytes")

    def _parse(self, c: _Conn) -> None:
        """Every whole request in the buffer, their engine requests submitted
        as one batch (backend.plug)."""
        self.backend.plug()
        try:
            self._parse_plugged(c)
        finally:
            self.backend.unplug()

    def _parse_plugged(self, c: _Conn) -> None:
        view = c.rview
        while not c.closed and not c.disc:
            avail = c.rlen - c.rpos
            if c.skip:
                n = min(avail, c.skip)
                c.skip -= n
                c.rpos += n
                if c.skip:
                    return
                continue
            if c.payload is not None:
                need = c.payload_req.length - c.payload_got
                n = min(avail, need)
                if n:
                    c.payload_view[c.payload_got:c.payload_got + n] = \
                        view[c.rpos:c.rpos + n]
                    c.payload_got += n
                    c.rpos += n
                if c.payload_got < c.payload_req.length:
                    return
                self._write_received(c)
                continue
            if avail < 28 or not self._may_read(c):
                return
            magic, flags, cmd, cookie, offset, length = _REQ.unpack_from(view, c.rpos)
            c.rpos += 28
            if magic != REQUEST_MAGIC:
                raise _Close(f"bad request magic {magic:#x}")
            self._request(c, flags, cmd, cookie, offset, length)

    # -- negotiation -------------------------------------------------------------------

    def _negotiate(self, c: _Conn):
        """The handshake as a generator: ``yield n`` waits for n bytes; it
        returns when transmission begins, raises _Close to end the connection."""
        self._queue(c, struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                   FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", (yield 4))
        if not cflags & FLAG_C_FIXED_NEWSTYLE:
            raise _Close("client does not speak fixed newstyle negotiation (refused)")
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _Close(f"unknown client flags {cflags:#x}")
        c.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = struct.unpack(">QII", (yield 16))
            if magic != IHAVEOPT:
                raise _Close(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise _Close(f"option {opt} of {length} bytes (at most {MAX_OPTION})")
            data = (yield length) if length else b""
            if opt == OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != self.name:
                    raise _Close(f"unknown export {data[:64]!r} (NBD_OPT_EXPORT_NAME)")
                self._queue(c, struct.pack(">QH", self.size, self.transmission_flags(c)) +
                            (b"" if c.no_zeroes else bytes(124)))
                return
            if opt == OPT_ABORT:
                self._reply(c, opt, REP_ACK)
                c.disc = True               # closed once the ACK is out
                yield 1 << 62               # never satisfied: nothing more is read
            elif opt == OPT_LIST:
                if length:
                    self._reply(c, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                    continue
                name = self.name.encode()
                self._reply(c, opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                self._reply(c, opt, REP_ACK)
            elif opt == OPT_STRUCTURED_REPLY:
                if length:
                    self._reply(c, opt, REP_ERR_INVALID, b"takes no data")
                elif c.structured:
                    self._reply(c, opt, REP_ERR_INVALID, b"already negotiated")
                else:
                    c.structured = True
                    self._reply(c, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if self._info(c, opt, data) and opt == OPT_GO:
                    return
            elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                self._meta_context(c, opt, data)
            else:
                self._reply(c, opt, REP_ERR_UNSUP, f"option {opt} not supported".encode())

    def _reply(self, c: _Conn, opt: int, typ: int, data: bytes = b"") -> None:
        if typ & (1 << 31):
            log.info("nbd: client %s: option %d: %s", c.peer, opt, data.decode(errors="replace"))
        self._queue(c, _OPT_REPLY.pack(REPLY_MAGIC, opt, typ, len(data)) + data)

    def _info(self, c: _Conn, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / GO; True when the export was given (GO: transmission)."""
        if len(data) < 6:
            self._reply(c, opt, REP_ERR_INVALID, b"option data too short")
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > len(data) - 6:
            self._reply(c, opt, REP_ERR_INVALID, b"name length past the option's end")
            return False
        name = data[4:4 + nlen]
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * nreq:
            self._reply(c, opt, REP_ERR_INVALID, b"information requests do not fill the option")
            return False
        wanted = set(struct.unpack_from(f">{nreq}H", data, 6 + nlen))
        if name.decode("utf-8", "replace") != self.name:
            self._reply(c, opt, REP_ERR_UNKNOWN, b"unknown export " + name[:64])
            return False
        if opt == OPT_GO and self.min_block > 1 and INFO_BLOCK_SIZE not in wanted:
            # O_DIRECT: requests smaller than the alignment would fail (EINVAL)
            self._reply(c, opt, REP_ERR_BLOCK_SIZE_REQD,
                        f"requests must be aligned to {self.min_block} bytes".encode())
            return False
        self._reply(c, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size,
                                                  self.transmission_flags(c)))
        if INFO_NAME in wanted:
            self._reply(c, opt, REP_INFO, struct.pack(">H", INFO_NAME) + self.name.encode())
        if INFO_DESCRIPTION in wanted and self.description:
            self._reply(c, opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) +
                        self.description.encode())
        self._reply(c, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, self.min_block,
                                                  max(PREFERRED_BLOCK, self.min_block),
                                                  MAX_BLOCK))
        self._reply(c, opt, REP_ACK)
        return True

    def _meta_context(self, c: _Conn, opt: int, data: bytes) -> None:
        setting = opt == OPT_SET_META_CONTEXT
        if not c.structured:
            self._reply(c, opt, REP_ERR_INVALID, b"structured replies not negotiated")
            return
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4:4 + nlen]
            if len(name) != nlen:
                raise ValueError
            pos = 4 + nlen
            (nq,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (ql,) = struct.unpack_from(">I", data, pos)
                q = data[pos + 4:pos + 4 + ql]
                if len(q) != ql or ql > MAX_NAME:
                    raise ValueError
                queries.append(q.decode("utf-8", "replace"))
                pos += 4 + ql
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError):
            self._reply(c, opt, REP_ERR_INVALID, b"malformed meta context option")
            return
        if name.decode("utf-8", "replace") != self.name:
            self._reply(c, opt, REP_ERR_UNKNOWN, b"unknown export " + name[:64])
            return
        chosen: list[str] = []
        if not queries and not setting:
            chosen = list(CONTEXTS)
        for q in queries:
            for ctx in CONTEXTS:
                ns = ctx.split(":", 1)[0] + ":"
                if (q == ctx or (not setting and q == ns)) and ctx not in chosen:
                    chosen.append(ctx)
        for ctx in chosen:
            self._reply(c, opt, REP_META_CONTEXT,
                        struct.pack(">I", CONTEXTS[ctx] if setting else 0) + ctx.encode())
        if setting:
            c.contexts = [CONTEXTS[ctx] for ctx in chosen]
        self._reply(c, opt, REP_ACK)

    # -- requests ----------------------------------------------------------------------

    def _token(self, r: _Req) -> int:
        t = self._next
        self._next = (t + 1) & 0x7FFFFFFFFFFFFFFF or 1
        self._reqs[t] = r
        return t

    def _error(self, c: _Conn, cookie: int, err: int, msg: str, cmd: int = -1) -> None:
        """An error reply (structured, with ``msg``, once negotiated); its log line."""
        c.errors += 1
        self.counters["errors"] += 1
        if c.errors <= 16:
            log.warning("nbd: client %s: %s: %s", c.peer, _NAMES.get(cmd, f"command {cmd}"),
                        msg)
        if c.structured:
            m = msg.encode()[:4096]
            self._queue(c, _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                       cookie, 6 + len(m)) + struct.pack(">IH", err, len(m)) + m)
        else:
            self._queue(c, _SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, cookie))

    def _ok(self, c: _Conn, cookie: int) -> None:
        self._queue(c, _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def _request(self, c: _Conn, flags: int, cmd: int, cookie: int, offset: int,
                 length: int) -> None:
        """One request header, checked here once: its flags, length and range."""
        self.counters["requests"] += 1
        if cmd == CMD_WRITE:
            # the payload follows whatever the answer: take it off the stream first
            bad = self._check(c, cmd, flags, offset, length)
            if bad is not None:
                c.skip = length
                self._error(c, cookie, *bad, cmd)
                return
            r = _Req(c, cookie, cmd, flags, offset, length, cost=length)
            c.payload = self._buffer(length)
            c.payload_view = memoryview(c.payload)
            c.payload_got = 0
            c.payload_req = r
            c.inflight_bytes += length      # counted while it is received, too
            return
        if cmd == CMD_DISC:
            c.disc = True
            return
        if cmd not in _ALLOWED_FLAGS:
            self._error(c, cookie, NBD_EINVAL, f"unknown command {cmd}", cmd)
            return
        bad = self._check(c, cmd, flags, offset, length)
        if bad is not None:
            self._error(c, cookie, *bad, cmd)
            return
        b = self.backend
        if cmd == CMD_READ:
            if length == 0:
                self._read_reply(c, _Req(c, cookie, cmd, flags, offset, 0, b""))
                return
            r = _Req(c, cookie, cmd, flags, offset, length, cost=length)
            if c.structured and length >= SPARSE_READ_MIN and not flags & CMD_FLAG_DF:
                try:
                    r.holes = [(o, n, f & STATE_ZERO) for o, n, f, _ in
                               _runs(b.driver, offset, length, False)]
                except Exception:       # the read itself will say what is wrong
                    r.holes = None
                if r.holes and len(r.holes) == 1 and r.holes[0][2]:
                    self._read_reply(c, r)      # all zeroes: nothing to read
                    return
            r.buf = self._buffer(length)
            c.inflight += 1
            c.inflight_bytes += length
            # a memoryview: the backend slices the vector along the map, and
            # a slice of a bytearray would be a copy (iov_slice)
            b.readv(self._token(r), offset, [memoryview(r.buf)])
            return
        if cmd == CMD_BLOCK_STATUS:
            self._block_status(c, cookie, flags, offset, length)
            return
        r = _Req(c, cookie, cmd, flags, offset, length)
        r.then_flush = bool(flags & CMD_FLAG_FUA) and b.write_cache
        c.inflight += 1
        if cmd == CMD_FLUSH:
            b.flush(self._token(r))
        elif cmd == CMD_TRIM:
            b.discard(self._token(r), offset, length)
        elif cmd == CMD_WRITE_ZEROES:
            fast = bool(flags & CMD_FLAG_FAST_ZERO)
            if fast and not self._zero_is_fast(offset, length):
                c.inflight -= 1
                self._error(c, cookie, NBD_ENOTSUP, "fast zero not possible here", cmd)
                return
            b.write_zeroes(self._token(r), offset, length, not flags & CMD_FLAG_NO_HOLE,
                           no_fallback=fast)

    def _check(self, c: _Conn, cmd: int, flags: int, offset: int, length: int):
        """None, or the (error, message) the protocol names for this request."""
        bad = flags & ~_ALLOWED_FLAGS[cmd]
        if bad:
            return NBD_EINVAL, f"flags {bad:#x} not valid here"
        if flags & CMD_FLAG_DF and not c.structured:
            return NBD_EINVAL, "NBD_CMD_FLAG_DF without structured replies"
        if cmd in (CMD_READ, CMD_WRITE) and length > MAX_BLOCK:
            return (NBD_EOVERFLOW if cmd == CMD_READ else NBD_EINVAL), \
                f"length {length} over the maximum block size {MAX_BLOCK}"
        if cmd != CMD_FLUSH and offset + length > self.size:
            return NBD_EINVAL, f"[{offset}, +{length}) past the end ({self.size})"
        if self.read_only and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return NBD_EPERM, "read-only export"
        if cmd == CMD_BLOCK_STATUS:
            if not c.contexts:
                return NBD_EINVAL, "no metadata context negotiated"
            if length == 0:
                return NBD_EINVAL, "zero length"
        return None

    def _zero_is_fast(self, offset: int, length: int) -> bool:
        g = self._zero_granule
        if g == 0:
            return False
        end = offset + length
        return offset % g == 0 and (end % g == 0 or end == self.size)

    def _write_received(self, c: _Conn) -> None:
        r = c.payload_req
        r.buf = c.payload
        c_view = c.payload_view
        c.payload = c.payload_view = c.payload_req = None
        r.then_flush = bool(r.flags & CMD_FLAG_FUA) and self.backend.write_cache
        c.inflight += 1
        self.backend.writev(self._token(r), r.offset, [c_view])

    def _block_status(self, c: _Conn, cookie: int, flags: int, offset: int,
                      length: int) -> None:
        one = bool(flags & CMD_FLAG_REQ_ONE)
        try:
            runs = _runs(self.backend.driver, offset, length, one)
        except Exception as e:           # a node that cannot say: EIO, the export goes on
            self._error(c, cookie, NBD_EIO, f"block status: {e}", CMD_BLOCK_STATUS)
            return
        for i, ctx in enumerate(c.contexts):
            descs = _descriptors(runs, 2 if ctx == CONTEXTS["base:allocation"] else 3, one)
            body = struct.pack(">I", ctx) + b"".join(struct.pack(">II", n, v) for n, v in descs)
            self._queue(c, _CHUNK.pack(STRUCTURED_REPLY_MAGIC,
                                       REPLY_FLAG_DONE if i == len(c.contexts) - 1 else 0,
                                       REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body)

    # -- completions -------------------------------------------------------------------

    def _reap(self) -> None:
        reqs = self._reqs
        for token, result in self.backend.reap():
            r = reqs.pop(token, None)
            if r is None:
                continue
            c = r.conn
            if r.then_flush and result >= 0:
                r.then_flush = False        # FUA: the write is down, now make it durable
                self.backend.flush(self._token(r))
                continue
            c.inflight -= 1
            c.inflight_bytes -= r.cost
            if r.cmd == CMD_WRITE or c.closed or result < 0:
                if r.buf is not None and len(r.buf) >= POOL_MIN:
                    self._give_back(r.buf)      # the backend is done with it
                r.buf = None
            if c.closed:
                continue
            if result < 0:
                err = _ERRNO.get(-result, NBD_EIO)
                self._error(c, r.cookie, err, f"[{r.offset}, +{r.length}): "
                            f"{os.strerror(-result)}", r.cmd)
            elif r.cmd == CMD_READ:
                self._read_reply(c, r)
            else:
                self._ok(c, r.cookie)
            self._dirty.add(c)

    def _read_reply(self, c: _Conn, r: _Req) -> None:
        self._reply_read(c, r)
        if r.buf is not None and len(r.buf) >= POOL_MIN:
            c.release.append((c.queued, r.buf))   # reusable once sent this far

    def _reply_read(self, c: _Conn, r: _Req) -> None:
        if not c.structured:
            self._queue(c, _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, r.cookie), r.buf)
            return
        if r.length == 0:
            self._queue(c, _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE,
                                       r.cookie, 0))
            return
        if r.holes is None or len(r.holes) == 1 and not r.holes[0][2]:
            self._queue(c, _CHUNK_DATA.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                            REPLY_TYPE_OFFSET_DATA, r.cookie, 8 + r.length,
                                            r.offset), r.buf)
            return
        view = memoryview(r.buf) if r.buf is not None else None
        last = len(r.holes) - 1
        for i, (off, n, zero) in enumerate(r.holes):
            done = REPLY_FLAG_DONE if i == last else 0
            if zero:
                self._queue(c, _CHUNK.pack(STRUCTURED_REPLY_MAGIC, done, REPLY_TYPE_OFFSET_HOLE,
                                           r.cookie, 12) + struct.pack(">QI", off, n))
            else:
                rel = off - r.offset
                self._queue(c, _CHUNK_DATA.pack(STRUCTURED_REPLY_MAGIC, done,
                                                REPLY_TYPE_OFFSET_DATA, r.cookie, 8 + n, off),
                            view[rel:rel + n])
        self.counters["sparse_reads"] += 1

    # -- shutdown ----------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect every client, wait for the backend's requests in flight
        (their buffers stay alive until then); the backend stays open."""
        for c in list(self.conns.values()):
            self._close(c)
        for token, result in self.backend.drain():
            self._reqs.pop(token, None)
        self._reqs.clear()
        self._listen(False)
        self._ep.close()
        os.close(self._stop_fd)
        self.listener.close()
