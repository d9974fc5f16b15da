"""The ``nbd`` protocol node: a disk on an NBD server, through libnbd.

Spelled as QEMU's: ``file=nbd://HOST[:PORT]/EXPORT`` or
``file=nbd+unix:///EXPORT?socket=PATH`` (the NBD URI standard), or
``driver=nbd,server.type=inet,server.host=H,server.port=P,export=E`` and
``server.type=unix,server.path=PATH``; ``reconnect-delay=`` (seconds requests
wait for a lost server to come back before they fail; 0: fail at once) and
``open-timeout=`` (seconds to keep trying the first connection) as in QEMU;
``request-timeout=`` (seconds a connection may have requests in flight and
no reply before it is dropped as dead, which a server hanging mid-reply
needs; default 30, 0 never; QEMU has no such bound).

One connection (native/nbd.c) carries every request of the disk, from both
paths: without the server's CAN_MULTI_CONN a flush covers only the writes of
its own connection. Its requests are AIO requests on a *key descriptor*, an
eventfd no one reads: the C engines route requests on it to the connection
(nbd.c's table), the Python engine and the synchronous helpers of driver.py
through ``aio.ROUTES`` to :meth:`NbdDriver.execute`. A stray system call on
the key fails (ESPIPE) instead of reading another file.

The node maps guest byte N to export byte N (``identity_mapped``), so a raw
disk on it takes the backend's fast path and the C path serves it in C;
``allocated()`` asks the server's ``base:allocation`` block status, so
``img map``, ``img convert`` and detect-zeroes see its holes and zeroes.
"""
from __future__ import annotations

import os
import time
import urllib.parse

from .. import aio
from .._native import ffi, lib
from .driver import BlockDriver, BlockError, Extent, iov_slice, iov_zero, register

DEFAULT_PORT = 10809
# Extents of block status asked for at once (pairs of uint64), and bytes a
# block status request covers at most (the protocol's length is 32 bits).
MAX_EXTENTS = 4096
STATUS_CHUNK = 1 << 30
CONNECT_TIMEOUT_MS = 10_000    # a handshake that takes longer fails (a server that hangs)
REQUEST_TIMEOUT = 30           # seconds (the Linux nbd driver's default)
HOLE, ZERO = 1, 2              # base:allocation flags

_OPS = {aio.READ: lib.PYKVM_AIO_READ, aio.WRITE: lib.PYKVM_AIO_WRITE,
        aio.FLUSH: lib.PYKVM_AIO_FLUSH, aio.FALLOCATE: lib.PYKVM_AIO_FALLOCATE}


def uri_of(filename: str | None, server: dict | None, export: str | None) -> str:
    """The NBD URI of a node's options (QEMU's: a filename, or server.* and export)."""
    if filename is not None:
        if server is not None or export is not None:
            raise BlockError(filename, "give either an NBD URI (filename=) or server.* and "
                             "export=, not both")
        u = urllib.parse.urlsplit(filename)
        if u.scheme.startswith("nbds"):
            raise BlockError(filename, "NBD over TLS (nbds://) is not supported")
        if u.scheme not in ("nbd", "nbd+tcp", "nbd+unix"):
            raise BlockError(filename, "not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                             "nbd+unix:///EXPORT?socket=PATH)")
        query = urllib.parse.parse_qs(u.query)
        if u.scheme == "nbd+unix":
            if "socket" not in query or u.netloc:
                raise BlockError(filename, "an nbd+unix URI names no host and takes "
                                 "?socket=PATH")
        elif not u.hostname:
            raise BlockError(filename, "the NBD URI names no server (nbd://HOST[:PORT]/EXPORT)")
        else:
            try:
                u.port
            except ValueError:
                raise BlockError(filename, "the NBD URI's port is not a number") from None
        return filename
    if server is None:
        raise BlockError("nbd", "no server given (filename=nbd://... or server.type=, "
                         "server.host=, server.port=, server.path=)")
    kind = server.get("type", "inet" if "host" in server else "unix")
    name = urllib.parse.quote(export or "", safe="")
    if kind == "unix":
        if "path" not in server:
            raise BlockError("nbd", "server.type=unix needs server.path=")
        return f"nbd+unix:///{name}?socket={urllib.parse.quote(server['path'], safe='/')}"
    if "host" not in server:
        raise BlockError("nbd", "server.type=inet needs server.host=")
    host = server["host"]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"          # an IPv6 address
    port = server.get("port", str(DEFAULT_PORT))
    if not port.isdigit():
        raise BlockError("nbd", f"server.port={port} is not a port number")
    return f"nbd://{host}:{port}/{name}"


@register
class NbdDriver(BlockDriver):
    format_name = "nbd"
    kind = "protocol"
    supports_discard = True
    identity_mapped = True
    child_roles = ()
    address_options = ("filename", "server")
    options = {"filename": "str",
               "server": {"type": ("inet", "unix"), "host": "str", "port": "str",
                          "path": "str"},
               "export": "str", "reconnect-delay": "int", "open-timeout": "int",
               "request-timeout": "int"}
    is_block_device = False

    def __init__(self, filename: str | None = None, server: dict | None = None,
                 export: str | None = None, reconnect_delay: int = 0, open_timeout: int = 0,
                 request_timeout: int = REQUEST_TIMEOUT, read_only: bool = False,
                 direct: bool = False):
        self.uri = self.path = uri_of(filename, server, export)
        self.read_only = read_only
        self.conn = ffi.NULL
        self.fd = self.bfd = -1
        for name, v in (("reconnect-delay", reconnect_delay), ("open-timeout", open_timeout),
                        ("request-timeout", request_timeout)):
            if not 0 <= v <= 86400:
                raise BlockError(self.path, f"{name}={v} is not a number of seconds in "
                                 f"[0, 86400]")
        self.conn = self._connect(reconnect_delay, open_timeout, request_timeout)
        try:
            self._info = ffi.new("struct pykvm_nbd_info *")
            lib.pykvm_nbd_get_info(self.conn, self._info)
            info = self._info
            if info.read_only and not read_only:
                raise BlockError(self.path, "the NBD export is read-only (open it with "
                                 "read-only=on)")
            self.size = info.size
            self.block_min = info.block_min
            self.block_max = info.block_max
            self.can_trim = bool(info.can_trim)
            self.can_zero = bool(info.can_zero)
            self.can_block_status = bool(info.can_block_status)
            self.fd = self.bfd = os.eventfd(0, os.EFD_CLOEXEC)
            if lib.pykvm_nbd_route(self.fd, self.conn) < 0:
                raise BlockError(self.path, "too many NBD connections in this process")
            aio.ROUTES[self.fd] = self.execute
        except BaseException:
            self.close_node()
            raise

    def _connect(self, reconnect_delay: int, open_timeout: int, request_timeout: int):
        """The first connection: tried once, or again until open-timeout
        seconds have passed (QEMU's open-timeout)."""
        err = ffi.new("char[512]")
        deadline = time.monotonic() + open_timeout
        while True:
            conn = lib.pykvm_nbd_open(self.uri.encode(), reconnect_delay * 1000,
                                      CONNECT_TIMEOUT_MS, request_timeout * 1000, err,
                                      len(err))
            if conn != ffi.NULL:
                return conn
            if time.monotonic() >= deadline:
                raise BlockError(self.path, f"cannot connect to the NBD server: "
                                 f"{ffi.string(err).decode(errors='replace')}")
            time.sleep(0.5)

    @property
    def request_alignment(self) -> int:
        """The server's minimum block size (the guest sees it as its block size;
        O_DIRECT does not apply to a socket)."""
        return self.block_min

    def info_flags(self) -> dict:
        """What the server offers and what the connection has done (counters)."""
        lib.pykvm_nbd_get_info(self.conn, self._info)
        i = self._info
        return {k: getattr(i, k) for k in (
            "size", "read_only", "can_flush", "can_fua", "can_trim", "can_zero",
            "can_fast_zero", "can_multi_conn", "can_block_status", "block_min", "block_pref",
            "block_max", "connected", "reconnects", "requests", "failed")}

    # -- requests ----------------------------------------------------------------------

    def execute(self, req: aio.AioRequest) -> int:
        """One request, waited for (the Python engine's workers, synchronous
        helpers): bytes done or -errno. A read past the end of the export
        stops there, the rest zeroed, as a read past the end of a file."""
        iov = req.iov
        if req.op == aio.READ:
            total = sum(map(len, iov))
            if req.offset >= self.size:
                iov_zero(iov)
                return 0
            if req.offset + total > self.size:
                inside = self.size - req.offset
                iov_zero(iov_slice(iov, inside, total - inside))
                iov = iov_slice(iov, 0, inside)
        vec = ffi.new("struct iovec[]", max(len(iov), 1))
        keep = []
        for i, buf in enumerate(iov):
            ptr = ffi.from_buffer(buf, require_writable=req.op == aio.READ)
            keep.append(ptr)
            vec[i].iov_base = ptr
            vec[i].iov_len = len(buf)
        return lib.pykvm_nbd_sync(self.conn, _OPS[req.op], req.offset, vec, len(iov),
                                  req.mode, req.length)

    def _sync(self, op: str, offset: int = 0, mode: int = 0, length: int = 0) -> int:
        return self.execute(aio.AioRequest(op, self.fd, offset, [], mode=mode, length=length))

    def map(self, offset: int, length: int) -> list[Extent]:
        return [Extent("data", offset, length, self.fd, offset)]

    def data_at(self, offset: int, length: int, write: bool = False) -> int:
        return offset

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, has_data) runs from the server's base:allocation:
        has_data is False where the server says the range reads as zeroes."""
        end = min(offset + length, self.size)
        if not self.can_block_status:
            return [(offset, end - offset, True)] if end > offset else []
        out: list = []
        pairs = ffi.new("uint64_t[]", 2 * MAX_EXTENTS)
        pos = offset
        while pos < end:
            n = lib.pykvm_nbd_block_status(self.conn, pos, min(end - pos, STATUS_CHUNK),
                                           pairs, MAX_EXTENTS)
            if n < 0:
                raise BlockError(self.path, f"block status at {pos:#x}", -n)
            if n == 0:
                raise BlockError(self.path, f"block status at {pos:#x}: the server "
                                 f"described nothing")
            for i in range(n):
                run, flags = pairs[2 * i], pairs[2 * i + 1]
                data = not flags & ZERO
                if out and out[-1][2] == data and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + run, data)
                else:
                    out.append((pos, run, data))
                pos += run
        return out

    def erase_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return [(self.fd, offset, length)]     # (the key fd: routed to the connection)

    def discard(self, offset: int, length: int, punch: bool) -> None:
        """NBD_CMD_TRIM where the server offers it (a hint: refused is no error)."""
        if punch and self.can_trim and not self.read_only:
            self._sync(aio.FALLOCATE, offset, lib.PYKVM_NBD_TRIM, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> list[tuple[int, int]]:
        """NBD_CMD_WRITE_ZEROES (NO_HOLE unless ``unmap``); else left to write."""
        if not self.can_zero:
            return [(offset, length)]
        mode = lib.FALLOC_FL_PUNCH_HOLE if unmap else lib.FALLOC_FL_ZERO_RANGE
        rc = self._sync(aio.FALLOCATE, offset, mode | lib.FALLOC_FL_KEEP_SIZE, length)
        return [] if rc == 0 else [(offset, length)]

    def resize(self, size: int) -> None:
        raise BlockError(self.path, "cannot resize an NBD export (its size is the server's)")

    def lock(self, use) -> None:
        """Nothing to lock here: the server decides who shares its export."""

    def info(self) -> dict:
        return {"filename": self.path, "protocol-type": self.format_name,
                "file-length": self.size}

    @classmethod
    def create(cls, path: str, size: int, preallocation: str = "off") -> None:
        raise BlockError(path, "cannot create an NBD export here: make the image on the "
                         "server and export it")

    def abandon(self) -> None:
        self._closed = True
        self.close_node()

    def close_node(self) -> None:
        if self.fd >= 0:
            aio.ROUTES.pop(self.fd, None)
            lib.pykvm_nbd_unroute(self.fd)
        if self.conn != ffi.NULL:
            lib.pykvm_nbd_close(self.conn)
            self.conn = ffi.NULL
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = self.bfd = -1
